"""What a restart may change against its checkpoint's recipe: refused, passed or accepted, and the record."""

import json
import math

import pytest
import yaml
from conftest import REPO, write_recipe

from aligntI.config import ConfigError, load_recipe
from aligntI.training.resume import check_restart, comparable, compare, describe, record_start
from aligntI.training.state import ResumePoint
from aligntI.yamlconf import flatten

ZERO3 = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
ZERO2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())


@pytest.fixture
def recipe(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "student", tmp_path / "data", tmp_path / "run",
                        str(REPO / "ds_configs" / "zero3_cpu.json"), teacher={"path": str(tmp_path / "teacher")})

    def load(*overrides, ds=ZERO3):
        return comparable(load_recipe(path, list(overrides)), ds)

    return load


def verdicts(saved, current, accept=()):
    return {c.key: c.verdict for c in compare(saved, current, list(accept)).changes}


def test_flatten_names_every_leaf():
    assert flatten({"a": {"b": [1, {"c": 2}], "d": {}}, "e": None}) == {"a.b.0": 1, "a.b.1.c": 2, "a.d": {}, "e": None}


def test_the_same_recipe_has_no_changes(recipe):
    assert compare(recipe(), recipe(), []).changes == []


def test_what_cannot_change_the_result_passes(recipe):
    saved = recipe()
    current = recipe("train.log_every=5", "train.save_every=3", "logging.tensorboard=true", "data.num_workers=4",
                     "train.micro_batch_size=1", "teacher.placement=replicated", "kd.chunk_size=64",
                     "model.attn_implementation.text=eager", "eval.data=test.json")
    assert set(verdicts(saved, current).values()) == {"passes"}
    assert "eval" in verdicts(saved, current)  # a section added as a whole
    check_restart(saved, current, [], REPO)  # does not raise


def test_what_decides_the_model_is_refused_listing_each_key_and_the_ways_on(recipe, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_restart(recipe(), recipe("optim.lr=5e-3", "seed=3", "loss.tpa=0", "train.max_steps=20",
                                       f"teacher.path={tmp_path / 'other'}", "train.log_every=2"),
                      [], tmp_path / "checkpoints" / "step_00000005")
    message = str(err.value)
    assert message.startswith(f"resume: {tmp_path / 'checkpoints' / 'step_00000005'} was trained under another recipe")
    for change in ("optim.lr: 0.001 -> 0.005", "seed: 0 -> 3", "loss.tpa: 1.0 -> 0.0", "train.max_steps: 12 -> 20",
                   f"teacher.path: '{tmp_path / 'teacher'}' -> '{tmp_path / 'other'}'"):
        assert change in message
    assert "log_every" not in message  # what passes is not in the way
    assert "a new run_dir" in message and "resume: never" in message
    # Only what may be accepted is offered, and the optimizer's settings are not.
    assert "accept_changes=[loss.tpa,teacher.path,train.max_steps]" in message


def test_the_deepspeed_settings_that_decide_the_result_are_compared(recipe):
    assert verdicts(recipe(), recipe(ds=ZERO2)) == {"deepspeed.zero_optimization.stage": "refused"}
    assert verdicts(recipe(), recipe(ds={**ZERO3, "gradient_clipping": 0.5})) == {
        "deepspeed.gradient_clipping": "refused"}
    # Bucket sizes and the like, and the file's own path, pass.
    tuned = {**ZERO3, "zero_optimization": {**ZERO3["zero_optimization"], "reduce_bucket_size": 123}}
    assert verdicts(recipe(), recipe(ds=tuned)) == {}


def test_named_changes_are_accepted_where_they_take_effect(recipe, tmp_path):
    saved, current = recipe(), recipe("train.max_steps=20", f"model.path={tmp_path / 'moved'}", "loss.kd=2",
                                      "optim.lr=5e-3")
    got = verdicts(saved, current, ["train.max_steps", "model.path", "loss", "optim.lr"])
    assert got == {"train.max_steps": "accepted", "model.path": "accepted", "loss.kd": "accepted",
                   "optim.lr": "refused"}
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.005 \(cannot be accepted: the optimizer's restored "
                                          r"state carries its own settings\)"):
        check_restart(saved, current, ["train.max_steps", "model.path", "loss", "optim.lr"], tmp_path)
    verdict = check_restart(saved, recipe("train.max_steps=20"), ["train.max_steps"], tmp_path)
    assert verdict.record() == [{"key": "train.max_steps", "was": 12, "now": 20, "verdict": "accepted",
                                 "effect": "the cosine schedule is recomputed for the new length"}]


def test_accept_changes_must_name_keys_of_the_recipe(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "m", tmp_path / "d", tmp_path / "run",
                        str(REPO / "ds_configs" / "zero3_cpu.json"))
    assert load_recipe(path, ["accept_changes=[train.max_steps,data]"]).accept_changes == ["train.max_steps", "data"]
    with pytest.raises(ConfigError, match=r"accept_changes.1: 'train.max_step' names no key of this recipe"):
        load_recipe(path, ["accept_changes=[data,train.max_step]"])


def test_a_new_length_recomputes_the_schedule_and_says_what_it_does_to_the_lr(recipe, tmp_path):
    cfg = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "m", tmp_path / "d", tmp_path / "run",
                                   str(REPO / "ds_configs" / "zero3_cpu.json")))
    verdict = check_restart(recipe(), recipe("train.max_steps=20"), ["train.max_steps"], tmp_path)
    point = ResumePoint("step_00000008", 8, {"total_steps": 12})
    lines = describe(verdict, point, 20, cfg.optim)
    # lr 1e-3, warm-up 10%: ceil(1.2) = 2 steps of 12, ceil(2.0) = 2 of 20; cosine after them.
    before = 1e-3 * 0.5 * (1 + math.cos(math.pi * (8 - 2) / (12 - 2)))
    after = 1e-3 * 0.5 * (1 + math.cos(math.pi * (8 - 2) / (20 - 2)))
    assert lines == [
        "resume: train.max_steps: 12 -> 20 (accepted: the cosine schedule is recomputed for the new length)",
        f"resume: the cosine schedule is recomputed for 20 steps (was 12): the lr of step 9 is {after:.3g} "
        f"(it would have been {before:.3g})",
    ]


def test_every_start_is_recorded(recipe, tmp_path):
    cfg = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "m", tmp_path / "d", tmp_path / "run",
                                   str(REPO / "ds_configs" / "zero3_cpu.json")))
    run = tmp_path / "run"
    first = record_start(run, cfg, {"world_size": 2}, None, 0, None)
    verdict = compare(recipe(), recipe("train.log_every=3"), [])
    second = record_start(run, cfg, {"world_size": 1}, verdict, 5, run / "checkpoints" / "step_00000005")
    assert (first.name, second.name) == ("001.yaml", "002.yaml")
    record = yaml.safe_load(second.read_text())
    assert record["resolved"] == {"world_size": 1} and record["model"]["path"] == str(tmp_path / "m")
    assert record["start"]["number"] == 2 and record["start"]["from_step"] == 5
    assert record["start"]["changes"] == [{"key": "train.log_every", "was": 1, "now": 3, "verdict": "passes"}]
    assert (run / "config.yaml").read_text() == second.read_text()  # the newest start
    assert yaml.safe_load(first.read_text())["start"]["checkpoint"] is None
