"""Strict recipe loading: unknown keys, wrong types and inconsistent values are errors naming the key."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aligntI.cli import AssembleRecipe, main
from aligntI.config import (
    ConfigError,
    RecipeConfig,
    check_ds_config,
    from_dict,
    load_recipe,
    resolve_batching,
    zero_stage,
)
from aligntI.eval.recipe import load_eval_recipe
from aligntI.models.builder import TinyModelSpec
from aligntI.yamlconf import load

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "run_dir": "runs/x",
    "model": {"path": "m"},
    "data": {"train": [{"path": "d.json"}]},
    "optim": {"lr": 1e-3},
    "train": {"global_batch_size": 32, "micro_batch_size": 4, "max_steps": 10},
    "engine": {"ds_config": str(REPO / "ds_configs" / "zero3.json")},
}


def write(tmp_path, data, header="# test\n"):
    path = tmp_path / "r.yaml"
    path.write_text(header + yaml.safe_dump(data))
    return path


def error_of(tmp_path, data, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, data), overrides)
    return str(info.value)


def test_valid_recipe_loads_with_defaults(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE))
    assert cfg.model.trainable == ["projector", "llm"]  # vision tower frozen by default
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML reads "1e-3" as a string; floats accept it
    assert cfg.data.on_bad_sample == "error"


@pytest.mark.parametrize("patch, key", [
    ({"model": {"path": "m", "pathh": "x"}}, "model.pathh"),
    ({"data": {"train": [{"path": "d.json", "wieght": 2}]}}, "data.train.0.wieght"),
    ({"bogus": 1}, "bogus"),
])
def test_unknown_key_is_named(tmp_path, patch, key):
    msg = error_of(tmp_path, {**BASE, **patch})
    assert f"{key}: unknown key" in msg and "r.yaml" in msg


@pytest.mark.parametrize("patch, key, fragment", [
    ({"train": {**BASE["train"], "micro_batch_size": "four"}}, "train.micro_batch_size", "expected an integer"),
    ({"train": {**BASE["train"], "micro_batch_size": 4.5}}, "train.micro_batch_size", "expected an integer"),
    ({"model": {"path": "m", "activation_checkpointing": "yes"}}, "model.activation_checkpointing", "true/false"),
    ({"data": {"train": [{"path": "d.json"}], "padding_side": "middle"}}, "data.padding_side", "not one of"),
    ({"engine": {**BASE["engine"], "precision": "fp16"}}, "engine.precision", "not one of"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "expected a number"),
    ({"data": {"train": {"path": "d.json"}}}, "data.train", "expected a list"),
    ({"model": {"path": " "}}, "model.path", "must not be empty"),
    ({"run_dir": ""}, "run_dir", "must not be empty"),
])
def test_wrong_type_is_named(tmp_path, patch, key, fragment):
    msg = error_of(tmp_path, {**BASE, **patch})
    assert key in msg and fragment in msg


def test_missing_required_key(tmp_path):
    data = {k: v for k, v in BASE.items() if k != "optim"}
    assert "optim: required key is missing" in error_of(tmp_path, data)


def test_inconsistent_values(tmp_path):
    assert "give exactly one" in error_of(tmp_path, {**BASE, "train": {**BASE["train"], "epochs": 1}})
    assert "model.trainable: unknown part 'decoder'" in error_of(
        tmp_path, {**BASE, "model": {"path": "m", "trainable": ["decoder"]}})
    assert "optim.warmup_ratio" in error_of(tmp_path, {**BASE, "optim": {"lr": 1e-3, "warmup_ratio": 1.5}})


def test_the_zero_stage_comes_from_the_ds_json(tmp_path):
    stated = {**BASE, "engine": {**BASE["engine"], "zero_stage": 3}}
    assert "engine.zero_stage: unknown key" in error_of(tmp_path, stated)
    assert "teacher.offload_params: unknown key" in error_of(tmp_path, {**BASE, "teacher": {
        "path": "t", "offload_params": True}})  # teacher.placement: offload replaced it
    for stage in ("3", 4, True):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        msg = error_of(tmp_path, {**BASE, "engine": {"ds_config": str(path)}})
        assert f"{path} has zero_optimization.stage {stage!r}; ZeRO's stages are 0, 1, 2 and 3" in msg
    path.write_text(json.dumps({"gradient_clipping": 1.0}))  # no zero_optimization: DeepSpeed's stage 0
    cfg = load_recipe(write(tmp_path, {**BASE, "engine": {"ds_config": str(path)}}))
    assert zero_stage(check_ds_config(cfg.engine)) == 0


def test_ds_json_may_not_own_recipe_keys(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    ds["train_batch_size"] = 16
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    msg = error_of(tmp_path, {**BASE, "engine": {"ds_config": str(path)}})
    assert "optimizer" in msg and "train_batch_size" in msg


def test_ds_json_auto_values_rejected(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    msg = error_of(tmp_path, {**BASE, "engine": {"ds_config": str(path)}})
    assert "zero_optimization.stage3_prefetch_bucket_size is 'auto'" in msg


def test_overrides(tmp_path):
    cfg = load_recipe(write(tmp_path, BASE), ["optim.lr=2e-5", "data.train.0.weight=0.5", "train.epochs=null",
                                               "data.train.0.max_samples=100"])
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.data.train[0].weight == 0.5 and cfg.data.train[0].max_samples == 100
    assert "optim.lrr: unknown key" in error_of(tmp_path, BASE, ["optim.lrr=1"])
    assert "not an index" in error_of(tmp_path, BASE, ["data.train.3.weight=1"])
    assert "expected an integer" in error_of(tmp_path, BASE, ["train.max_steps=abc"])


def test_batching_arithmetic():
    cfg = from_dict(RecipeConfig, BASE)
    assert resolve_batching(cfg.train, 4).gradient_accumulation_steps == 2
    with pytest.raises(ConfigError, match="train.global_batch_size: 32 is not divisible"):
        resolve_batching(cfg.train, 3)
    cfg.train.gradient_accumulation_steps = 4
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps: micro_batch_size 4 x "
                                          "gradient_accumulation_steps 4 x world size 4 = 64"):
        resolve_batching(cfg.train, 4)
    assert resolve_batching(cfg.train, 2).global_batch_size == 32


def all_yamls():
    return sorted((REPO / "recipes").rglob("*.yaml"))


def composed_files(path: Path) -> set[Path]:
    """``path`` and every file it includes through ``base:``, recursively."""
    bases = yaml.safe_load(path.read_text()).get("base") or []
    out = {path}
    for base in [bases] if isinstance(bases, str) else bases:
        out |= composed_files((path.parent / base).resolve())
    return out


def test_there_are_recipes():
    assert any(p.parent.name == "mini" for p in all_yamls())


@pytest.mark.parametrize("path", all_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_yaml_validates_and_documents_itself(path):
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path} must open with a comment: purpose, prerequisites, command"
    if path.name.startswith("_"):  # a fragment, included by recipes through base:
        assert any(path in composed_files(r) for r in all_yamls() if not r.name.startswith("_")), \
            f"{path} is included by no recipe"
        return
    assert any("Command:" in h for h in header) and any("Needs:" in h for h in header), path
    if path.parent.name == "models":
        from_dict(TinyModelSpec, yaml.safe_load(path.read_text()))
    elif path.parent.name == "eval":
        load_eval_recipe(path)
    elif path.name == "assemble.yaml":
        load(path, None, AssembleRecipe)
    else:
        load_recipe(path)


def test_shipped_ds_configs_differ_only_where_documented():
    load = lambda name: json.loads((REPO / "ds_configs" / name).read_text())  # noqa: E731
    gpu, cpu, offload = load("zero3.json"), load("zero3_cpu.json"), load("zero3_offload.json")
    assert cpu["zero_optimization"].pop("stage3_param_persistence_threshold") == 0
    gpu["zero_optimization"].pop("stage3_param_persistence_threshold")
    assert cpu == gpu
    assert offload["zero_optimization"].pop("offload_optimizer")["device"] == "cpu"
    assert offload["zero_optimization"].pop("offload_param")["device"] == "cpu"
    offload["zero_optimization"].pop("stage3_param_persistence_threshold")
    assert offload == gpu
    assert load("zero2.json")["zero_optimization"]["stage"] == 2


DISTILL = {**BASE, "teacher": {"path": "t"}}


def test_distillation_defaults_are_filled_and_dumped(tmp_path):
    cfg = load_recipe(write(tmp_path, DISTILL))
    assert (cfg.loss.sft, cfg.loss.kd, cfg.loss.iva, cfg.loss.tpa) == (1.0, 1.0, 1.0, 1.0)  # the paper: every λ is 1
    assert cfg.kd.divergence == "forward_kl" and cfg.kd.temperature == 1.0
    assert cfg.iva.layer == "auto" and cfg.iva.mode == "weighted_kl" and cfg.iva.weights == "teacher_attention"
    assert cfg.irs.samples == 256 and cfg.irs.pairing == "any"
    assert (cfg.tpa.candidates, cfg.tpa.source, cfg.tpa.exclude_gt, cfg.tpa.weighting, cfg.tpa.max_positions) == \
        (4, "student", True, "uniform", None)  # the paper's TPA
    assert load_recipe(write(tmp_path, {**DISTILL, "iva": {"layer": 3}})).iva.layer == 3


@pytest.mark.parametrize("patch, fragment", [
    ({"kd": {"temperature": 2.0}}, "kd: distillation settings need a teacher"),
    ({"iva": {"layer": 1}}, "iva: distillation settings need a teacher"),
    ({"tpa": {"candidates": 2}}, "tpa: distillation settings need a teacher"),
])
def test_distillation_sections_need_a_teacher(tmp_path, patch, fragment):
    assert fragment in error_of(tmp_path, {**BASE, **patch})


@pytest.mark.parametrize("patch, fragment", [
    ({"kd": {"divergence": "kl"}}, "kd.divergence: 'kl' is not one of"),
    ({"kd": {"divergence": "jsd", "jsd_beta": 1.0}}, "kd.jsd_beta: must be in (0, 1)"),
    ({"kd": {"temperature": 0}}, "kd.temperature: must be > 0"),
    ({"iva": {"layer": "last"}}, "iva.layer: 'last' matches none of"),
    ({"iva": {"layer": -1}}, "iva.layer: must be >= 0"),
    ({"iva": {"weights": "uniform", "top_ratio": 0.5}}, "iva.top_ratio: only applies"),
    ({"iva": {"mode": "attention", "weights": "uniform"}}, "iva.weights: uniform is a weighted_kl baseline"),
    ({"iva": {"student_layer": 1}}, "iva.student_layer: only used by iva.mode: attention"),
    ({"iva": {"row_budget": 0}}, "iva.row_budget: must be >= 1"),
    ({"iva": {"row_budget": 8, "mode": "attention"}}, "iva.row_budget: only used by iva.mode: weighted_kl"),
    ({"iva": {"row_budget": 8, "top_ratio": 0.5}}, "iva.row_budget: set either it or iva.top_ratio"),
    ({"iva": {"row_budget": 8, "row_choice": "top_k", "weights": "uniform"}}, "iva.row_choice: top_k needs"),
    ({"iva": {"row_choice": "first"}}, "iva.row_choice: 'first' is not one of"),
    ({"iva": {"queries": "response"}}, "iva.queries: 'response' is not one of"),
    ({"iva": {"queries": "both", "weights": "uniform"}}, "iva.queries: only used with the teacher's attention"),
    ({"irs": {"pairing": "same_question"}}, "irs.pairing: 'same_question' is not one of"),
    ({"irs": {"images": "imgs/"}}, "irs.images: only used with irs.data"),
    ({"loss": {"sft": 0, "kd": 0, "iva": 0, "tpa": 0}}, "loss: every weight is 0"),
    ({"loss": {"tpa": "yes"}}, "loss.tpa: expected a number"),
    ({"tpa": {"candidates": 0}}, "tpa.candidates: must be >= 1"),
    ({"tpa": {"source": "uniform"}}, "tpa.source: 'uniform' is not one of"),
    ({"tpa": {"weighting": "teacher_prob"}}, "tpa.weighting: 'teacher_prob' is not one of"),
    ({"tpa": {"max_positions": 0}}, "tpa.max_positions: must be >= 1"),
    ({"tpa": {"d": 4}}, "tpa.d: unknown key"),
    ({"teacher": {"path": "t", "placement": "cpu"}}, "teacher.placement: 'cpu' is not one of"),
    ({"tpa": {"student_passes": "both"}}, "tpa.student_passes: 'both' is not one of"),
])
def test_distillation_errors_name_the_key(tmp_path, patch, fragment):
    assert fragment in error_of(tmp_path, {**DISTILL, **patch})


def test_teacher_ds_config_is_derived_from_the_students():
    from aligntI.engine import teacher_ds_config

    student = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    student.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=16,
                   bf16={"enabled": True})
    teacher = teacher_ds_config(student, "offload")
    assert "offload_optimizer" not in teacher["zero_optimization"] and "gradient_clipping" not in teacher
    assert teacher["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert teacher["train_micro_batch_size_per_gpu"] == 4 and teacher["bf16"] == {"enabled": True}
    assert "offload_optimizer" in student["zero_optimization"]  # the student's config is not modified
    sharded = teacher_ds_config(student, "auto")["zero_optimization"]
    assert sharded["stage"] == 3 and "offload_param" not in sharded
    assert sharded["stage3_max_live_parameters"] == student["zero_optimization"]["stage3_max_live_parameters"]
    assert teacher_ds_config(student, "replicated")["zero_optimization"] == {"stage": 0}
    zero2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    assert teacher_ds_config(zero2, "auto")["zero_optimization"] == {"stage": 0}
    # A teacher sharded or offloaded beside a ZeRO-2 student: its own ZeRO-3 section.
    assert teacher_ds_config(zero2, "sharded")["zero_optimization"] == {"stage": 3}
    assert teacher_ds_config(zero2, "offload")["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_base_files_merge_and_vars_are_substituted(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "paths.yaml").write_text("# paths\nvars: {models: /m, runs: /r}\n")
    common = {**BASE, "base": "paths.yaml", "run_dir": "${runs}/${row}", "model": {"path": "${models}/student"},
              "train": {**BASE["train"], "micro_batch_size": "${micro}"}, "vars": {"row": "sft", "micro": 4}}
    (tmp_path / "base" / "common.yaml").write_text("# common\n" + yaml.safe_dump(common))
    row = tmp_path / "kd.yaml"
    row.write_text("# a row\n" + yaml.safe_dump({"base": "base/common.yaml", "vars": {"row": "kd"},
                                                  "optim": {"weight_decay": 0.1}}))
    cfg = load_recipe(row)
    assert cfg.run_dir == "/r/kd" and cfg.model.path == "/m/student"  # the row's var wins; others from bases
    assert cfg.train.micro_batch_size == 4  # a whole-string variable keeps its type
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.weight_decay == pytest.approx(0.1)  # maps merge
    assert cfg.data.train[0].path == str(REPO / "d.json")
    # A user sets a location once on the command line; overrides apply before substitution.
    assert load_recipe(row, ["vars.runs=/scratch"]).run_dir == "/scratch/kd"
    assert load_recipe(row, ["run_dir=elsewhere"]).run_dir == str(REPO / "elsewhere")


def test_composition_errors_name_the_file_and_key(tmp_path):
    missing = tmp_path / "a.yaml"
    missing.write_text("# a\nbase: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"recipe not found: .*nowhere.yaml \(base of .*a.yaml\)"):
        load_recipe(missing)
    (tmp_path / "b.yaml").write_text("# b\nbase: c.yaml\n")
    (tmp_path / "c.yaml").write_text("# c\nbase: b.yaml\n")
    with pytest.raises(ConfigError, match="base cycle"):
        load_recipe(tmp_path / "b.yaml")
    assert "run_dir: unknown variable ${runs} (vars defines ['x'])" in error_of(
        tmp_path, {**BASE, "run_dir": "${runs}/a", "vars": {"x": 1}})
    assert "vars.a: refers to itself through a -> b -> a" in error_of(
        tmp_path, {**BASE, "run_dir": "${a}", "vars": {"a": "${b}", "b": "${a}"}})
    assert "vars.x: expected a string or a number" in error_of(tmp_path, {**BASE, "vars": {"x": [1]}})


@pytest.mark.parametrize("text, fragment", [
    (b"# r\nmodel: {path: m\n", "not valid YAML at line 3, column 1"),  # an unclosed flow mapping
    (b"# r\nmodel:\n  path: m\n path2: x\n", "not valid YAML at line 4"),  # bad indentation
    (b"# r\n- a\n- b\n", "the top level must be a mapping of keys; got list"),
    (b"# only a comment\n", "the top level must be a mapping of keys; the file is empty"),
    (b"# r\nrun_dir: caf\xe9\n", "not valid UTF-8 at byte 16"),
])
def test_recipe_that_does_not_parse_is_one_line_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


@pytest.mark.parametrize("text, fragment", [
    (b'{"zero_optimization": {"stage": 3,}}', "is not valid JSON"),
    (b'[{"zero_optimization": {"stage": 3}}]', "must be a JSON object"),
    (b'{"zero_optimization": [3]}', "must be a JSON object (with zero_optimization an object)"),
    (b'{"zero_optimization": {"stage": 3}, "x": "\xff"}', "not valid UTF-8"),
])
def test_ds_json_that_does_not_parse_names_the_file(tmp_path, text, fragment):
    ds = tmp_path / "ds.json"
    ds.write_bytes(text)
    message = error_of(tmp_path, {**BASE, "engine": {"ds_config": str(ds)}})
    assert str(ds) in message and fragment in message, message


def test_override_that_does_not_parse_names_the_override(tmp_path):
    assert "override 'train.max_steps=[1,': the value is not valid YAML" in error_of(
        tmp_path, BASE, ["train.max_steps=[1,"])
    assert "override 'seed.x=1': the key goes through a value that is not a mapping" in error_of(
        tmp_path, {**BASE, "seed": 3}, ["seed.x=1"])


def test_images_outside_their_folder_are_refused_by_default(tmp_path):
    assert load_recipe(write(tmp_path, BASE)).data.allow_images_outside is False
    assert load_recipe(write(tmp_path, BASE), ["data.allow_images_outside=true"]).data.allow_images_outside


# Every path of a recipe, relative: each resolves against the repository root.
RELATIVE = {
    **BASE,
    "run_dir": "runs/rel",
    "model": {"path": "models/student"},
    "teacher": {"path": "models/teacher"},
    "data": {"train": [{"path": "data/a.json", "images": "data/img"}, {"path": "data/b.json"}],
             "chat_template": "templates/mine.jinja"},
    "engine": {"ds_config": "ds_configs/zero3.json"},  # opened while loading: found from any folder
    "eval": {"data": "data/test.json", "images": "data/test_img"},
    "irs": {"data": "data/calib.json", "images": "data/calib_img"},
}


def recipe_paths(cfg) -> dict:
    return {"run_dir": cfg.run_dir, "model.path": cfg.model.path, "teacher.path": cfg.teacher.path,
            "data.train.0.path": cfg.data.train[0].path, "data.train.0.images": cfg.data.train[0].images,
            "data.train.1.path": cfg.data.train[1].path, "data.chat_template": cfg.data.chat_template,
            "engine.ds_config": cfg.engine.ds_config, "eval.data": cfg.eval.data, "eval.images": cfg.eval.images,
            "irs.data": cfg.irs.data, "irs.images": cfg.irs.images}


def test_recipe_paths_are_relative_to_the_repository_root_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(write(tmp_path, RELATIVE))
    assert recipe_paths(cfg) == {
        "run_dir": str(REPO / "runs/rel"), "model.path": str(REPO / "models/student"),
        "teacher.path": str(REPO / "models/teacher"), "data.train.0.path": str(REPO / "data/a.json"),
        "data.train.0.images": str(REPO / "data/img"), "data.train.1.path": str(REPO / "data/b.json"),
        "data.chat_template": str(REPO / "templates/mine.jinja"),
        "engine.ds_config": str(REPO / "ds_configs/zero3.json"), "eval.data": str(REPO / "data/test.json"),
        "eval.images": str(REPO / "data/test_img"), "irs.data": str(REPO / "data/calib.json"),
        "irs.images": str(REPO / "data/calib_img")}
    assert cfg.data.train[1].images is None  # an unset path stays unset
    # What the run's config.yaml records (the recipe as dataclasses.asdict) is where everything was.
    assert dataclasses.asdict(cfg)["data"]["train"][0]["images"] == str(REPO / "data/img")


def test_overrides_are_recipe_values_and_follow_the_same_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(write(tmp_path, {**RELATIVE, "vars": {"root": "somewhere"}}),
                      ["model.path=other/student", "data.train.1.images=more/img", "vars.root=shared",
                       "run_dir=${root}/run", "engine.ds_config=ds_configs/zero2.json"])
    assert cfg.model.path == str(REPO / "other/student")
    assert cfg.data.train[1].images == str(REPO / "more/img")
    assert cfg.run_dir == str(REPO / "shared/run")
    assert cfg.engine.ds_config == str(REPO / "ds_configs/zero2.json")


def test_absolute_paths_stay_home_is_expanded_and_template_names_are_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ds = str(REPO / "ds_configs" / "zero3.json")
    cfg = load_recipe(write(tmp_path, RELATIVE), [
        "run_dir=/abs/run", "model.path=~/student", f"engine.ds_config={ds}", "data.chat_template=llava_v1"])
    assert cfg.run_dir == "/abs/run" and cfg.engine.ds_config == ds
    assert cfg.model.path == str(tmp_path / "home" / "student")
    assert cfg.data.chat_template == "llava_v1"  # a shipped template, not a file
    assert load_recipe(write(tmp_path, RELATIVE), ["data.chat_template=null"]).data.chat_template is None
    assert "model.path: cannot expand the ~ of '~no_such_user_x/m'" in error_of(
        tmp_path, RELATIVE, ["model.path=~no_such_user_x/m"])


def test_a_missing_ds_config_names_its_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = error_of(tmp_path, {**BASE, "engine": {"ds_config": "ds_configs/none.json"}})
    assert f"engine.ds_config: file not found: {REPO / 'ds_configs' / 'none.json'}" in msg


def test_evaluation_recipe_paths_follow_the_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = REPO / "recipes" / "eval" / "paper_benchmarks.yaml"
    cfg = load_eval_recipe(recipe, ["vars.data=/d", "out=evals/x", "chat_template=t/eval.jinja"])
    assert cfg.model == str(REPO / "runs/paper/students/qwen2.5-1.5b/align_ti/final")  # vars.runs of _paths.yaml
    assert cfg.out == str(REPO / "evals/x") and cfg.chat_template == str(REPO / "t/eval.jinja")
    gqa = cfg.benchmarks[0]
    assert (gqa.data, gqa.images) == ("/d/eval/gqa/llava_gqa_testdev_balanced.jsonl", "/d/eval/gqa/data/images")
    assert cfg.benchmarks[-1].images is None
    assert load_eval_recipe(recipe, ["chat_template=llava_v1"]).chat_template == "llava_v1"


def test_plan_runs_from_another_folder(tmp_path):
    """The issue: started outside the checkout, a shipped recipe failed on its ds_config."""
    proc = subprocess.run([sys.executable, "-m", "aligntI.cli", "plan", "--config",
                           str(REPO / "recipes" / "mini" / "align_ti.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"no config.json in {REPO / 'data/digitgrid/models/student_init'}" in proc.stdout


def test_assemble_recipe_takes_its_folders_from_the_paths_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = REPO / "recipes" / "paper" / "assemble.yaml"
    cfg = load(recipe, ["vars.models=/hub", "vars.llm=Qwen3-8B", "vars.name=qwen3-8b"], AssembleRecipe)
    assert (cfg.vision, cfg.llm) == ("/hub/siglip-so400m-patch14-384", "/hub/Qwen3-8B")
    assert cfg.out == str(REPO / "runs/paper/init/qwen3-8b")  # _paths.yaml's runs, from the repository root
    # The defaults are assemble()'s.
    assert (cfg.chat_template, cfg.dtype, cfg.seed) == ("llava_v1", "bfloat16", 0)
    assert load(recipe, ["vars.models=models"], AssembleRecipe).vision == str(
        REPO / "models/siglip-so400m-patch14-384")
    with pytest.raises(ConfigError, match="dtype: 'float16' is not one of"):
        load(recipe, ["dtype=float16"], AssembleRecipe)
    with pytest.raises(ConfigError, match="visoin: unknown key"):
        load(recipe, ["visoin=x"], AssembleRecipe)


@pytest.mark.parametrize("argv, fragment", [
    (["--config", "r.yaml", "--dtype", "float32"], "give --config (an assemble recipe) or the flags, not both "
                                                   "(got --dtype)"),
    (["--vision", "v", "--llm", "l"], "--out required (or --config)"),
    (["--vision", "v", "--llm", "l", "--out", "o", "seed=1"], "only apply to --config recipes"),
])
def test_assemble_takes_a_recipe_or_flags(argv, fragment, capsys):
    assert main(["assemble", *argv]) == 2
    assert fragment in capsys.readouterr().err
