"""``aligntI irs --config <distillation recipe>``: the teacher, calibration data and settings of the recipe, as
its ``iva.layer: auto`` reads them; the same scores as the flags spelling them out."""

import json

from conftest import REPO, write_recipe

from aligntI.cli import main

DS_CONFIG = str(REPO / "ds_configs" / "zero3_cpu.json")


def test_irs_of_a_recipe_equals_the_flags_spelling_it_out(tmp_path, tiny_model, digitgrid, capsys):
    recipe = write_recipe(tmp_path / "kd.yaml", tiny_model, digitgrid, tmp_path / "run", DS_CONFIG,
                          teacher={"path": str(tiny_model)}, irs={"samples": 6})
    assert main(["irs", "--config", str(recipe), "--out", str(tmp_path / "recipe")]) == 0
    # The recipe's first training source, template, max length, seed and micro-batch (2); sdpa, instruction rows.
    assert main(["irs", "--model", str(tiny_model), "--data", str(digitgrid / "train.json"), "--samples", "6",
                 "--chat-template", "llava_v1_compact", "--max-length", "64", "--batch-size", "2",
                 "--out", str(tmp_path / "flags")]) == 0
    ours, theirs = (json.loads((tmp_path / d / "irs.json").read_text()) for d in ("recipe", "flags"))
    assert ours == theirs and ours["samples"] == 6
    # Overrides follow the recipe: irs.data replaces the training source.
    assert main(["irs", "--config", str(recipe), f"irs.data={digitgrid / 'test.json'}", "irs.samples=4",
                 "--out", str(tmp_path / "test")]) == 0
    assert json.loads((tmp_path / "test" / "irs.json").read_text())["samples"] == 4
    capsys.readouterr()


def test_irs_takes_a_recipe_or_flags(tmp_path, tiny_model, digitgrid, capsys):
    sft = write_recipe(tmp_path / "sft.yaml", tiny_model, digitgrid, tmp_path / "run", DS_CONFIG)
    assert main(["irs", "--config", str(sft)]) == 2
    assert "has no teacher: section; --config takes a distillation recipe" in capsys.readouterr().err
    assert main(["irs", "--config", str(sft), "--samples", "8", "--chat-template", "llava_v1"]) == 2
    assert "irs: with --config, the recipe gives --samples, --chat-template" in capsys.readouterr().err
    assert main(["irs", "--model", str(tiny_model)]) == 2
    assert "irs: --model and --data are required (or --config)" in capsys.readouterr().err
    assert main(["irs", "--model", str(tiny_model), "--data", str(digitgrid / "test.json"), "irs.samples=4"]) == 2
    assert "only apply to --config recipes" in capsys.readouterr().err
