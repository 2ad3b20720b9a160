"""Shared fixtures: tiny real tokenizers, processors, LLaVA model directories and DigitGrid data on disk."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = {"distributed": "distributed", "slurm": "slurm"}  # every test of the folder


def pytest_collection_modifyitems(items):
    for item in items:
        folder = Path(item.path).resolve().relative_to(TESTS).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    """In-process code that starts torch.distributed gets a fresh one-rank group on its own port."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield
    from aligntI.engine import destroy

    destroy()


@pytest.fixture(scope="session")
def word_tokenizer():
    from aligntI.models.builder import wordlevel_tokenizer
    from aligntI.tasks.digitgrid import vocabulary

    return wordlevel_tokenizer(["USER: ASSISTANT: hello world is the image fine", " ".join(vocabulary())])


@pytest.fixture(scope="session")
def digitgrid(tmp_path_factory):
    """A small DigitGrid dataset with its tokenizer (the CLI path users run)."""
    from aligntI.cli import main

    out = tmp_path_factory.mktemp("digitgrid")
    assert main(["digitgrid", "--out", str(out), "--train-size", "320", "--val-size", "16",
                 "--test-size", "48"]) == 0
    return out


def answer_starts(labels) -> list[int]:
    """A test's own reading of ``iva.queries: answer_start`` for one sample's labels (a list or 1-D tensor): the
    positions whose label is unset and whose next label is set, i.e. whose logits predict an answer's first token."""
    labels = [int(v) for v in labels]
    return [t for t in range(len(labels) - 1) if labels[t] == -100 and labels[t + 1] != -100]


def write_tiny_model(out: Path, tokenizer_dir: Path, vision_from: Path | None = None, image_size: int = 32,
                     **text) -> Path:
    """A fast tiny teacher-shaped model (CLI path)."""
    import yaml

    from aligntI.cli import main

    spec = {
        "text": {"family": "qwen2", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                 "intermediate_size": 64, **text},
        "vision": {"family": "siglip", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                   "intermediate_size": 64, "image_size": image_size, "patch_size": 8},
        "chat_template": "llava_v1_compact",
    }
    spec_path = out.with_suffix(".yaml")
    spec_path.write_text(yaml.safe_dump(spec))
    extra = ["--vision-from", str(vision_from)] if vision_from else []
    assert main(["init-model", "--spec", str(spec_path), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 *extra]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(digitgrid, tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", digitgrid / "tokenizer")


@pytest.fixture(scope="session")
def tiny_student(digitgrid, tiny_model, tmp_path_factory):
    """A narrower student of ``tiny_model`` (the teacher) sharing its vision tower; GQA with 2 query heads per KV."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "student", digitgrid / "tokenizer",
                            vision_from=tiny_model, hidden_size=16, num_heads=4, num_kv_heads=2,
                            intermediate_size=32)


def write_recipe(path: Path, model_dir: Path, data_dir: Path, run_dir: Path, ds_config: str, **sections) -> Path:
    """A recipe YAML for the tests, written like a user would write one."""
    import yaml

    recipe = {
        "run_dir": str(run_dir),
        "seed": 0,
        "model": {"path": str(model_dir), "trainable": ["projector", "llm"]},
        "data": {"train": [{"path": str(data_dir / "train.json")}], "chat_template": "llava_v1_compact",
                 "max_length": 64, "num_workers": 0},
        "optim": {"lr": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.1},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 12, "save_every": 0},
        "engine": {"ds_config": ds_config},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text("# test recipe\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def zero3_partitioned() -> str:
    """ZeRO-3 with every parameter partitioned (tiny models would stay below zero3.json's threshold)."""
    cfg = REPO / "ds_configs" / "zero3_cpu.json"
    assert json.loads(cfg.read_text())["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    return str(cfg)


def launcher_cmd(launcher: str, nproc: int = 2) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port", port]
    if launcher == "torchrun":
        return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc),
                "--master_port", port]
    return [sys.executable]


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    # A launched test script (tests/distributed/distill_probe.py) imports the suite's shared builders.
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS / "unit"), *filter(None, [env.get("PYTHONPATH")])])
    return env


@functools.cache
def distributed_problem() -> str | None:
    """Start one bare process group before the first launch, or say why it cannot start.

    DeepSpeed JIT-builds its CPU shared-memory op (under ``TORCH_EXTENSIONS_DIR``) when a process group starts;
    built here once, the ranks of the tests do not race for it. A build that was killed leaves a ``lock`` file
    that makes every later start wait forever: one clear failure here instead of a timeout in every test.
    """
    probe = [sys.executable, "-c", "from aligntI.engine import init_distributed; init_distributed()"]
    try:
        proc = subprocess.run(probe, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        ext = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
        return (f"starting a one-process group did not finish in 900 s: look for a stale build lock "
                f"({ext}/*/deepspeed_shm_comm/lock) left by an interrupted build and delete it")
    return None if proc.returncode == 0 else f"starting a one-process group failed:\n{proc.stderr[-4000:]}"


def launch(args: list[str], launcher: str = "deepspeed", nproc: int = 2, timeout: int = 600,
           check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``recipes/train.py`` (or another module) on ``nproc`` CPU ranks with a real launcher."""
    if problem := distributed_problem():
        pytest.fail(problem)
    cmd = launcher_cmd(launcher, nproc)
    proc = subprocess.run(cmd + args, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def lines_repeated_per_step(stderr: str, steps: int) -> dict[str, int]:
    """The lines of ``stderr`` (progress-bar redraws split apart) seen at least once per step: a log that grows
    with the run's length. Numbers are blanked, so "step 3" and "step 4" count as one line."""
    counts: dict[str, int] = {}
    for line in re.split(r"[\r\n]+", stderr):
        line = re.sub(r"\d+(\.\d+)?", "N", line.strip())
        if line:
            counts[line] = counts.get(line, 0) + 1
    return {line: n for line, n in counts.items() if n >= steps}


def processes_with(entry: str) -> list[int]:
    """Live processes whose environment holds ``entry`` (``NAME=value``): a launch and all it started."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{entry}\0".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except (OSError, ValueError):  # ended while we looked
            continue
    return found


def kill_when(args: list[str], marker: Path, launcher: str = "torchrun", timeout: int = 300) -> None:
    """Start a 2-rank job and SIGKILL it, launcher and ranks, (no clean-up) as soon as ``marker`` exists."""
    import signal
    import time

    if problem := distributed_problem():
        pytest.fail(problem)
    tag = f"ALIGNTI_KILL_WHEN={marker}"  # ranks may run in sessions of their own: find them by environment
    env = {**launch_env(), "ALIGNTI_KILL_WHEN": str(marker)}
    job = subprocess.Popen(launcher_cmd(launcher) + args, cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in processes_with(tag):  # the launcher and every rank at once
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    while processes_with(tag) and time.time() < deadline + 30:  # killed ranks must be gone before a resume
        time.sleep(0.05)
    assert marker.exists() and job.returncode != 0, "the job had to be killed mid-run"
