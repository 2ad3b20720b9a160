"""``logging:`` TensorBoard and W&B copies of metrics.jsonl: a real run read back from their own files, resume,
missing packages, the strict schema. W&B runs offline with no way to reach a server; nothing needs a service."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, launch, processes_with, write_recipe

from aligntI.config import ConfigError, LoggingConfig, load_recipe
from aligntI.training.metrics import read_metrics
from aligntI.training.trackers import TensorBoardTracker, open_trackers


def expected_scalars(records: list[dict]) -> dict[tuple[str, int], float]:
    """(metric, step) -> value for every metric of metrics.jsonl; a mapping (``lr``) as ``lr/<group>``."""
    out = {}
    for r in records:
        for key, value in r.items():
            if isinstance(value, dict):
                out.update({(f"{key}/{name}", r["step"]): v for name, v in value.items()})
            elif key != "step" and value is not None:
                out[(key, r["step"])] = value
    return out


def tensorboard_scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    """Every scalar TensorBoard shows for ``log_dir``, as TensorBoard's own reader loads it; one per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        steps = [p.step for p in points]
        assert steps == sorted(set(steps)), (tag, steps)  # no step shown twice
        out.update({(tag, p.step): p.value for p in points})
    return out


def wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file: W&B's LevelDB-style log of 32 KiB blocks, each record a
    chain of chunks (7-byte header: CRC, length, type FULL=1 / FIRST / MIDDLE / LAST=4), after a 7-byte file header."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its config/cache under tmp_path, a server address that refuses at once; returns an
    environment entry that every process of the run inherits."""
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a request, if any, fails instead of waiting
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "60")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    marker = f"ALIGNTI_TRACKER_TEST={tmp_path}"
    monkeypatch.setenv(*marker.split("=", 1))
    return marker


@pytest.mark.distributed
def test_every_metric_reaches_tensorboard_and_wandb_across_a_resume(tmp_path, tiny_model, digitgrid,
                                                                    offline_wandb):
    run_dir = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, digitgrid, run_dir, str(REPO / "ds_configs" / "zero2.json"),
        train={"max_steps": 4, "global_batch_size": 4},
        logging={"tensorboard": True, "wandb": True, "wandb_project": "tracker-test"},
        eval={"data": str(digitgrid / "test.json"), "max_samples": 6, "max_new_tokens": 4},
    )
    run_dir.mkdir()
    (run_dir / "stop_request").touch()  # the first start checkpoints after step 1 and stops; the second resumes
    launch(["recipes/train.py", "--config", str(recipe)], launcher="python")
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    proc = launch(["recipes/train.py", "--config", str(recipe)], launcher="python")
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    expected = expected_scalars(metrics)
    assert {"loss", "grad_norm", "lr/model"} <= {tag for tag, _ in expected}
    # The evaluation after training, at the last step.
    scores = json.loads((run_dir / "eval" / "test_scores.json").read_text())
    expected.update({(f"eval/test/{category}", 4): s["accuracy"] for category, s in scores.items()})
    assert ("eval/test/all", 4) in expected

    # TensorBoard: every (metric, step) once, at float32 (what a TensorBoard scalar holds).
    shown = tensorboard_scalars(run_dir / "tensorboard")
    assert shown.keys() == expected.keys()
    assert all(shown[k] == float(np.float32(v)) for k, v in expected.items())

    # W&B: one run id over both starts; its history, read back from the offline files, holds every metric.
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{first_id}/run-{first_id}.wandb"))
    assert len(files) == 2, list((run_dir / "wandb").iterdir())
    history, configs = {}, []
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                        assert (key, step) not in history
                        history[(key, step)] = json.loads(item.value_json)
            elif kind == "run":
                assert record.run.project == "tracker-test" and record.run.display_name == str(run_dir)
                configs.append({u.key: json.loads(u.value_json) for u in record.run.config.update})
    assert history == expected
    # The W&B config of each start is that start's resolved recipe (starts/NNN.yaml; config.yaml is the newest).
    starts = [yaml.safe_load(p.read_text()) for p in sorted((run_dir / "starts").glob("*.yaml"))]
    assert starts[-1] == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert starts[0]["logging"] == {"tensorboard": True, "wandb": True, "wandb_project": "tracker-test"}
    assert len(configs) == 2
    for config, start in zip(configs, starts):
        assert {k: v for k, v in config.items() if k != "_wandb"} == start

    # Neither start left a W&B service (or anything else) running.
    deadline = time.time() + 30
    while (left := processes_with(offline_wandb)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]


def test_tensorboard_hides_what_an_interrupted_run_logged_after_its_checkpoint(tmp_path):
    first = TensorBoardTracker(tmp_path, resume_step=0)
    for step in range(1, 6):
        first.log({"step": step, "loss": float(step), "lr": {"model": 0.5}, "grad_norm": None})
    first.close()  # the run logged step 5, then died; its last checkpoint is step 3
    resumed = TensorBoardTracker(tmp_path, resume_step=3)
    for step in (4, 5):
        resumed.log({"step": step, "loss": 10.0 * step, "lr": {"model": 0.25}, "grad_norm": None})
    resumed.close()
    assert tensorboard_scalars(tmp_path / "tensorboard") == {
        **{("loss", s): v for s, v in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]},
        **{("lr/model", s): 0.5 if s <= 3 else 0.25 for s in range(1, 6)},
    }
    # A fresh start in the same run directory (resume: never) hides the old run entirely.
    fresh = TensorBoardTracker(tmp_path, resume_step=0)
    fresh.log({"step": 1, "loss": 7.0, "lr": {"model": 1.0}})
    fresh.close()
    assert tensorboard_scalars(tmp_path / "tensorboard") == {("loss", 1): 7.0, ("lr/model", 1): 1.0}


@pytest.mark.parametrize("key, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_names_the_key_and_the_package(tmp_path, monkeypatch, key, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` meets when the package is not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # so it imports tensorboard again
    with pytest.raises(ConfigError, match=f"logging.{key}: true needs the {module} package.*pip install {module}"):
        open_trackers(LoggingConfig(**{key: True}), tmp_path, 0)


def test_off_by_default_and_nothing_imported(tmp_path, monkeypatch):
    for module in ("tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of either would raise
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    assert open_trackers(LoggingConfig(), tmp_path, 0) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, message", [
    ("logging.tensorbord=true", "logging.tensorbord: unknown key"),
    ("logging.wandb=1", "logging.wandb: expected true/false"),
    ("logging.wandb_project=[a]", "logging.wandb_project: expected a string"),
])
def test_the_logging_section_is_strict(tmp_path, override, message):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path, tmp_path, tmp_path / "run",
                          str(REPO / "ds_configs" / "zero2.json"))
    assert load_recipe(recipe).logging == LoggingConfig()
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe, [override])
