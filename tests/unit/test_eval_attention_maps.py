"""`aligntI attention-maps`: maps against eager ``output_attentions``, the similarity numbers, layer choice,
the pictures' layout, the CLI end to end and its errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import answer_starts, write_tiny_model
from PIL import Image

from aligntI.cli import main
from aligntI.config import AttentionConfig, DataConfig, DataSource
from aligntI.data.dataset import model_inputs
from aligntI.data.loader import build_sequential_loader
from aligntI.eval.attention_maps import (
    compute_attention_maps,
    figure_pixels,
    irs_layer,
    resolve_layers,
    to_grid,
    write_attention_maps,
)
from aligntI.hooks.attention import decoder_layers
from aligntI.models.loading import load_model, load_processor

SAMPLES = [0, 5, 9]


def sharpened(src, dst, factor=16.0):
    """A copy of ``src`` with q/k projections scaled: random init attends almost uniformly (every weight
    ≈ 1/16), which would make a wrong map pass a 1e-5 comparison; scaled logits give distinct, peaked maps."""
    model = load_model(src, AttentionConfig())
    with torch.no_grad():
        for layer in decoder_layers(model):
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(factor)
                if proj.bias is not None:
                    proj.bias.mul_(factor)
    model.save_pretrained(dst)
    load_processor(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def deep_teacher(digitgrid, tmp_path_factory):
    """A 4-layer teacher, so the students' relative-depth layer differs from the teacher's."""
    base = tmp_path_factory.mktemp("models")
    return sharpened(write_tiny_model(base / "teacher4", digitgrid / "tokenizer", num_layers=4), base / "sharp")


@pytest.fixture(scope="module")
def student(tiny_student, tmp_path_factory):
    """A 2-layer student."""
    return sharpened(tiny_student, tmp_path_factory.mktemp("models") / "student")


@pytest.fixture(scope="module")
def result(deep_teacher, student, digitgrid):
    # "clone" is the teacher itself: its map must match the teacher's exactly.
    models = {"teacher": deep_teacher, "before": student, "clone": deep_teacher}
    layers, _ = resolve_layers(models, "teacher", teacher_layer=3)
    return compute_attention_maps(models, digitgrid / "test.json", SAMPLES, layers, chat_template="llava_v1_compact",
                                  batch_size=2)


def eager_focus(model_dir, data, layer, rows, queries="instruction"):
    """The oracle: eager output_attentions of a whole batch, query rows (the instruction's, or the answer start)
    × vision columns averaged over heads and query positions, renormalised over the vision columns and reshaped
    row-major."""
    processor = load_processor(model_dir)
    cfg = DataConfig(train=[DataSource(str(data))], chat_template="llava_v1_compact", max_length=64,
                     padding_side="left", num_workers=0)
    batch = next(iter(build_sequential_loader(processor, cfg, batch_size=max(rows) + 1)))
    model = load_model(model_dir, AttentionConfig("eager", "eager")).eval()
    with torch.no_grad():
        att = model(**model_inputs(batch), output_attentions=True, use_cache=False).attentions[layer]
    out = []
    for b in rows:
        inst = (batch["instruction_mask"][b].nonzero()[:, 0] if queries == "instruction"
                else torch.tensor(answer_starts(batch["labels"][b])))
        vis = batch["vision_mask"][b].nonzero()[:, 0]
        a = att[b][:, inst][:, :, vis].mean(dim=(0, 1))
        a = a / a.sum()
        g = int(len(vis) ** 0.5)
        out.append(a.reshape(g, g))
    return torch.stack(out)


def test_layers_follow_relative_depth(result):
    # teacher layer 3 of 4 -> the 2-layer student's layer 1 (same relative depth); the 4-layer clone keeps 3
    assert result.layers == {"teacher": 3, "before": 1, "clone": 3}
    assert result.num_layers == {"teacher": 4, "before": 2, "clone": 4}


def test_maps_match_eager_attention(result, deep_teacher, student, digitgrid):
    data = digitgrid / "test.json"
    for name, model_dir in (("teacher", deep_teacher), ("before", student)):
        maps = result.maps[name]
        assert maps.shape == (3, 4, 4)  # 32x32 image, patch 8: 16 tokens in a 4x4 grid
        torch.testing.assert_close(maps, eager_focus(model_dir, data, result.layers[name], SAMPLES),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(maps.sum((1, 2)), torch.ones(3))
        assert maps.max() > 1.5 / 16  # peaked, not uniform: the comparison above can fail
    other = eager_focus(deep_teacher, data, 2, SAMPLES)  # a neighbouring layer is clearly another map
    assert (result.maps["teacher"] - other).abs().max() > 1e-2
    assert [s["index"] for s in result.samples] == SAMPLES
    records = json.loads(data.read_text())
    for s in result.samples:
        rec = records[s["index"]]
        assert s["id"] == rec["id"] and s["reference"] == rec["conversations"][1]["value"]
        assert s["question"] == rec["conversations"][0]["value"].replace("<image>\n", "")
    # the background is the image as the model saw it: DigitGrid's PNG, undone normalisation
    png = torch.from_numpy(np.array(Image.open(digitgrid / records[5]["image"]).convert("RGB"))).float() / 255
    torch.testing.assert_close(result.views[1], png, atol=2 / 255, rtol=0)


def test_similarity_numbers(result):
    t = result.maps["teacher"].flatten(1).double()
    s = result.maps["before"].flatten(1).double()
    cos = (t * s).sum(-1) / (t.norm(dim=-1) * s.norm(dim=-1))
    l1 = (t - s).abs().sum(-1)
    sim = result.similarity["before"]
    assert sim["cosine"] == pytest.approx(cos.tolist(), abs=1e-12)
    assert sim["l1"] == pytest.approx(l1.tolist(), abs=1e-12)
    assert sim["tv"] == pytest.approx((l1 / 2).tolist(), abs=1e-12)
    assert result.summary()["before"]["cosine"] == pytest.approx(cos.mean().item(), abs=1e-12)
    assert result.summary()["before"]["tv"] == pytest.approx(l1.mean().item() / 2, abs=1e-12)
    assert max(sim["tv"]) > 0.05  # a random student does not look exactly where the teacher looks
    assert result.summary()["clone"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result.summary()["clone"]["tv"] == pytest.approx(0.0, abs=1e-6)
    assert "teacher" not in result.similarity


def test_pictures_and_json(result, tmp_path):
    paths = write_attention_maps(result, tmp_path)
    assert [p.name for p in paths["samples"]] == ["sample_000000.png", "sample_000005.png", "sample_000009.png"]
    one = figure_pixels(1, 3)
    assert one == (round((4 * 2.25 + 0.75) * 100), 300)
    for p in paths["samples"]:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == one
            assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # drawn, not blank
    with Image.open(paths["overview"]) as im:
        assert im.size == (one[0], 3 * one[1])  # one row per question
    report = json.loads(paths["json"].read_text())
    assert report["models"]["before"] == {"path": str(result.models["before"]), "layer": 1, "num_layers": 2,
                                          "grid": [4, 4]}
    assert len(report["samples"]) == 3
    s = report["samples"][1]
    assert s["index"] == 5 and len(s["maps"]["teacher"]) == 4 and len(s["maps"]["teacher"][0]) == 4
    assert torch.tensor(s["maps"]["before"]).tolist() == result.maps["before"][1].tolist()
    assert s["vs_teacher"]["before"]["tv"] == result.similarity["before"]["tv"][1]
    assert report["summary"]["before"] == result.summary()["before"]


def test_cli_reads_the_layer_from_irs_json(tmp_path, deep_teacher, student, digitgrid, result, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "irs.json").write_text(json.dumps({"model": str(deep_teacher), "irs": [0.1, 0.2, 0.3, 0.5],
                                              "chosen_layer": 3, "samples": 8, "pairing": "any"}))
    after = tmp_path / "after"
    shutil.copytree(deep_teacher, after)  # a student that learned everything: the teacher's own weights
    preds = tmp_path / "test_predictions.jsonl"
    preds.write_text(json.dumps({"id": "test-000005", "prediction": "7"}) + "\n")
    out = tmp_path / "maps"
    assert main(["attention-maps", "--teacher", str(deep_teacher), "--irs", str(run),
                 "--student", f"before={student}", "--student", f"after={after}",
                 "--data", str(digitgrid / "test.json"), "--samples", "0,5,9",
                 "--chat-template", "llava_v1_compact", "--predictions", f"after={preds}",
                 "--device", "cpu", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "teacher layer 3" in stdout and "after" in stdout
    report = json.loads((out / "attention_maps.json").read_text())
    assert report["teacher_layer_from"] == str(run)
    assert {n: m["layer"] for n, m in report["models"].items()} == {"teacher": 3, "before": 1, "after": 3}
    assert report["samples"][1]["maps"]["before"] == result.maps["before"][1].tolist()
    assert report["samples"][1]["predictions"] == {"after": "7"}
    assert report["summary"]["after"]["tv"] == pytest.approx(0.0, abs=1e-6)
    assert {p.name for p in out.glob("*.png")} == {"overview.png", "sample_000000.png", "sample_000005.png",
                                                    "sample_000009.png"}


def test_errors(tmp_path, deep_teacher, student, digitgrid, capsys):
    with pytest.raises(ValueError, match="do not form a square patch grid"):
        to_grid(torch.rand(2, 17))
    assert to_grid(torch.arange(9.0)).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # row-major
    models = {"teacher": deep_teacher, "s": student}
    with pytest.raises(ValueError, match=r"teacher: layer 4 is out of range; the model has 4 decoder layers"):
        resolve_layers(models, "teacher", teacher_layer=4)
    with pytest.raises(ValueError, match=r"s: layer 2 is out of range; the model has 2"):
        resolve_layers(models, "teacher", teacher_layer=0, student_layer=2)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_layers(models, "teacher")
    (tmp_path / "irs.json").write_text(json.dumps({"model": "other", "irs": [0.1, 0.2], "chosen_layer": 1}))
    with pytest.raises(ValueError, match="scores 2 layers .* the teacher has 4"):
        irs_layer(tmp_path, 4)
    with pytest.raises(FileNotFoundError, match="no irs.json"):
        irs_layer(tmp_path / "nowhere")
    args = ["attention-maps", "--teacher", str(deep_teacher), "--student", f"s={student}",
            "--data", str(digitgrid / "test.json"), "--out", str(tmp_path / "out")]
    assert main(args + ["--teacher-layer", "9"]) == 2
    assert "teacher: layer 9 is out of range" in capsys.readouterr().err
    assert main(args + ["--teacher-layer", "0", "--samples", "0,100000"]) == 2
    assert "sample 100000 is out of range" in capsys.readouterr().err
    assert main(args + ["--teacher-layer", "0", "--samples", "0,five"]) == 2
    assert "--samples: expected comma-separated record indices" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_square_token_count_is_a_clear_error(tmp_path, digitgrid, capsys):
    """A CLIP tower that keeps its CLS token ("full" selection): 1 + 4x4 = 17 vision tokens per image."""
    import yaml

    spec = {"text": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64},
            "vision": {"family": "clip", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                       "intermediate_size": 64, "image_size": 32, "patch_size": 8},
            "chat_template": "llava_v1_compact"}
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump(spec))
    model = tmp_path / "clip"
    assert main(["init-model", "--spec", str(tmp_path / "clip.yaml"), "--tokenizer", str(digitgrid / "tokenizer"),
                 "--out", str(model)]) == 0
    for name in ("config.json", "processor_config.json"):
        cfg = json.loads((model / name).read_text())
        cfg["vision_feature_select_strategy"] = "full"
        (model / name).write_text(json.dumps(cfg))
    assert main(["attention-maps", "--teacher", str(model), "--teacher-layer", "1", "--data",
                 str(digitgrid / "test.json"), "--first", "2", "--chat-template", "llava_v1_compact",
                 "--out", str(tmp_path / "out")]) == 2
    assert "teacher (" in (err := capsys.readouterr().err) and "17 vision tokens per image do not form a square" in err


def test_answer_start_maps_are_eager_attention_from_the_answer_start(deep_teacher, digitgrid):
    """``queries="answer_start"``: the map is the attention from the one position whose logits predict the
    answer's first token, as eager attention gives it."""
    from aligntI.eval.attention_maps import model_focus

    data = digitgrid / "test.json"
    maps, _ = model_focus(deep_teacher, 3, data, None, SAMPLES, chat_template="llava_v1_compact", batch_size=2,
                          queries="answer_start")
    oracle = eager_focus(deep_teacher, data, 3, SAMPLES, queries="answer_start").flatten(1)
    torch.testing.assert_close(maps, oracle, atol=1e-5, rtol=0)
    assert (maps - eager_focus(deep_teacher, data, 3, SAMPLES).flatten(1)).abs().max() > 1e-3  # not the question's
