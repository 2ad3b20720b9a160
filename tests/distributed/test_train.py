"""Real multi-process DeepSpeed runs on 2 CPU ranks (gloo): training, export, resume after a kill, Ctrl-C, a
restart on another number of ranks or with another recipe."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
import yaml
from conftest import REPO, kill_when, launch, launch_env, launcher_cmd, lines_repeated_per_step, write_recipe


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_data(digitgrid, tmp_path_factory):
    """DigitGrid plus text-only samples, so some ranks see image-free batches while others do not."""
    out = tmp_path_factory.mktemp("textonly")
    rows = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": "read top row"},
                                                  {"from": "gpt", "value": "none"}]} for i in range(40)]
    (out / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "text.jsonl"


def image_free_on_one_rank_only(digitgrid, mixed_data, steps: int) -> int:
    """How many (step, micro-batch) slots have an image-free batch on one rank and images on the other."""
    from aligntI.data.records import MixedRecords, RecordSource, ShardedResumableSampler

    records = MixedRecords([RecordSource(digitgrid / "train.json"), RecordSource(mixed_data)], [1.0, 4.0], seed=0)
    text_start = len(records.sources[0])
    streams = []
    for rank in range(2):
        it = iter(ShardedResumableSampler(records, rank, 2, global_batch_size=8))
        streams.append([next(it) >= text_start for _ in range(4 * steps)])  # 2 micro x 2 samples per step
    micro = [[all(s[i:i + 2]) for i in range(0, len(s), 2)] for s in streams]
    return sum(a != b for a, b in zip(*micro))


def test_zero3_two_ranks_trains_exports_and_reloads(tmp_path, tiny_model, digitgrid, mixed_data, zero3_partitioned):
    # The hang scenario (one rank's batch has no image, so only the other runs the vision tower) must occur here.
    assert image_free_on_one_rank_only(digitgrid, mixed_data, steps=30) > 0
    run_dir = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, digitgrid, run_dir, zero3_partitioned,
        model={"activation_checkpointing": True},
        data={"train": [{"path": str(digitgrid / "train.json")}, {"path": str(mixed_data), "weight": 4.0}]},
        optim={"lr": 3e-3, "projector_lr": 6e-3},
        train={"max_steps": 30, "save_every": 10},
        eval={"data": str(digitgrid / "test.json"), "max_new_tokens": 4, "batch_size": 8},
    )
    proc = launch(["recipes/train.py", "--config", str(recipe)], launcher="deepspeed")
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 31))
    first = sum(m["loss"] for m in metrics[:5]) / 5
    last = sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # an untrained model stays near ln(34) = 3.5
    assert all(m["grad_norm"] is not None and m["tokens_per_s"] > 0 for m in metrics)
    assert metrics[0]["lr"].keys() == {"model", "model_no_decay", "projector", "projector_no_decay"}
    assert metrics[-1]["lr"]["projector"] == pytest.approx(2 * metrics[-1]["lr"]["model"])
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["gradient_accumulation_steps"] == 2
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    scores = json.loads((run_dir / "eval" / "test_scores.json").read_text())
    assert scores["all"]["n"] == 48  # every test sample scored once across the two ranks
    assert "exact match on" in proc.stdout
    # keep_last=2 leaves the last two checkpoints; `latest` points at the final one
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000020", "step_00000030"]
    assert (ckpts / "latest").read_text().strip() == "step_00000030"

    # Export -> reload gives the same logits as DeepSpeed's own consolidation of the final checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForImageTextToText, AutoProcessor

    exported = AutoModelForImageTextToText.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    oracle = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="step_00000030")
    missing, unexpected = oracle.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    processor = AutoProcessor.from_pretrained(run_dir / "final")
    from PIL import Image

    image = Image.open(digitgrid / "images" / "test" / "000000.png")
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nsum top row"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, oracle(**inputs).logits, atol=1e-6, rtol=1e-6)
        assert not torch.equal(exported(**inputs).logits,
                               AutoModelForImageTextToText.from_pretrained(tiny_model)(**inputs).logits)
        out = exported.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    # `aligntI export` of the step-20 checkpoint reloads and matches DeepSpeed's consolidation of that step.
    launch(["-m", "aligntI.cli", "export", "--run", str(run_dir), "--tag", "step_00000020"], launcher="python")
    step20 = AutoModelForImageTextToText.from_pretrained(run_dir / "export_step_00000020", dtype=torch.float32)
    oracle.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="step_00000020"))
    with torch.no_grad():
        torch.testing.assert_close(step20(**inputs).logits, oracle(**inputs).logits)
    assert (run_dir / "export_step_00000020" / "processor_config.json").is_file()

    # The reloaded export, evaluated in one process with other batch shapes and padding, answers exactly as
    # the ZeRO-3-sharded evaluation inside the 2-rank run did.
    launch(["-m", "aligntI.cli", "eval", "--model", str(run_dir / "final"), "--data", str(digitgrid / "test.json"),
            "--max-new-tokens", "4", "--batch-size", "5", "--out", str(tmp_path / "reeval")], launcher="python")
    again = (tmp_path / "reeval" / "test_predictions.jsonl").read_text()
    assert again == (run_dir / "eval" / "test_predictions.jsonl").read_text()


def test_interrupted_run_resumes_with_identical_losses(tmp_path, tiny_model, digitgrid, zero3_partitioned):
    bad = tmp_path / "bad.jsonl"  # records whose image is missing: skipped, replaced and counted
    bad.write_text("".join(json.dumps({"id": f"bad-{i}", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat top-left ?"}, {"from": "gpt", "value": "7"}]}) + "\n"
        for i in range(8)) + json.dumps({"id": "ok", "conversations": [
        {"from": "human", "value": "read top row"}, {"from": "gpt", "value": "none"}]}) + "\n")
    common = dict(train={"max_steps": 40, "save_every": 8, "keep_last": 3},
                  data={"num_workers": 1, "on_bad_sample": "skip",
                        "train": [{"path": str(digitgrid / "train.json")}, {"path": str(bad), "weight": 10.0}]})
    straight = write_recipe(tmp_path / "a.yaml", tiny_model, digitgrid, tmp_path / "a", zero3_partitioned, **common)
    broken = write_recipe(tmp_path / "b.yaml", tiny_model, digitgrid, tmp_path / "b", zero3_partitioned, **common)
    first = launch(["recipes/train.py", "--config", str(straight)], launcher="torchrun")
    skipped = re.search(r"data: (\d+) bad samples skipped", first.stdout)
    assert skipped and int(skipped.group(1)) > 0, first.stdout[-2000:]

    # Kill the whole job (SIGKILL, no clean-up) right after its step-8 checkpoint completes.
    kill_when(["recipes/train.py", "--config", str(broken)],
              tmp_path / "b" / "checkpoints" / "step_00000008" / "COMPLETE")
    done_before_kill = read_metrics(tmp_path / "b")[-1]["step"]
    assert done_before_kill < 40

    proc = launch(["recipes/train.py", "--config", str(broken)], launcher="torchrun")
    assert "resumed from" in proc.stdout + proc.stderr
    assert f"data: {skipped.group(1)} bad samples skipped" in proc.stdout  # counted once over the whole run
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 41))  # lines after the checkpoint were not duplicated
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5), x["step"]
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9), x["step"]


def test_ctrl_c_on_two_ranks_keeps_the_work_and_one_rank_continues(tmp_path, tiny_model, digitgrid):
    """Ctrl-C on a 2-rank run started from another folder: every rank finishes its step, the run checkpoints and
    says how to go on, with no traceback. The same command then continues on 1 rank (a requeue onto fewer
    nodes: same global batch, so the same samples per step) with the losses of an uninterrupted run. The ranks'
    logs never grow by a line per step."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    train_py = str(REPO / "recipes" / "train.py")
    # ds_configs/... is relative to the repository root, whatever the current folder.
    common = dict(train={"max_steps": 16, "save_every": 0})
    straight = write_recipe(tmp_path / "a.yaml", tiny_model, digitgrid, tmp_path / "a", "ds_configs/zero3_cpu.json",
                            **common)
    stopped = write_recipe(tmp_path / "b.yaml", tiny_model, digitgrid, tmp_path / "b", "ds_configs/zero3_cpu.json",
                           **common)
    first = launch([train_py, "--config", str(straight)], launcher="torchrun", cwd=elsewhere)
    assert lines_repeated_per_step(first.stderr, 16) == {}

    logs = tmp_path / "logs"  # each rank's own output, apart from the launcher's
    job = subprocess.Popen(launcher_cmd("torchrun") + ["--log-dir", str(logs), "--redirects", "3", train_py,
                                                       "--config", str(stopped)],
                           cwd=elsewhere, env=launch_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    while job.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: launcher and ranks at once
    assert job.wait(timeout=120) != 0
    out = {p.parent.name + "/" + p.stem: p.read_text() for p in logs.rglob("*.log")}
    assert sorted(out) == ["0/stderr", "0/stdout", "1/stderr", "1/stdout"]
    said = re.findall(r"SIGINT: stopped after step (\d+), checkpoint (\S+); the same command resumes", out["0/stdout"])
    assert len(said) == 1, out
    step = int(said[0][0])
    assert 2 <= step < 16 and said[0][1] == str(tmp_path / "b" / "checkpoints" / f"step_{step:08d}")
    assert (tmp_path / "b" / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    assert not (tmp_path / "b" / "final").exists()
    assert "Traceback" not in out["0/stderr"] + out["1/stderr"] and "SIGINT" not in out["1/stdout"]

    # The same command, on 1 rank, from yet another folder.
    again = launch([train_py, "--config", str(stopped)], launcher="python", cwd=tmp_path)
    assert f"resumed from {tmp_path / 'b' / 'checkpoints' / f'step_{step:08d}'} at step {step}" in again.stdout
    assert lines_repeated_per_step(again.stderr, 16 - step) == {}
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 17))
    for x, y in zip(a, b):  # the same samples per step; only the order of float sums differs
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5), x["step"]
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9), x["step"]
    starts = [yaml.safe_load(p.read_text()) for p in sorted((tmp_path / "b" / "starts").glob("*.yaml"))]
    assert [(s["resolved"]["world_size"], s["start"]["from_step"]) for s in starts] == [(2, 0), (1, step)]


def test_single_process_zero2_with_python(tmp_path, tiny_model, digitgrid):
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, digitgrid, tmp_path / "run", str(REPO / "ds_configs" / "zero2.json"),
        train={"max_steps": 3, "global_batch_size": 4},
    )
    launch(["recipes/train.py", "--config", str(recipe), "train.micro_batch_size=2"], launcher="python")
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_a_restart_under_another_recipe_or_model_is_refused_and_leaves_the_run_intact(tmp_path, tiny_model,
                                                                                      tiny_student, digitgrid):
    """Changed settings or another student on restart: one line, exit 2, nothing in the run folder written, so
    the run's checkpoints still export. A named, acceptable change goes on and is recorded."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, digitgrid, tmp_path / "run",
                          str(REPO / "ds_configs" / "zero2.json"), train={"max_steps": 2, "global_batch_size": 4})
    launch(["recipes/train.py", "--config", str(recipe)], launcher="python")
    run = tmp_path / "run"

    def snapshot() -> dict:
        return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    before = snapshot()
    changed = launch(["recipes/train.py", "--config", str(recipe), "optim.lr=5e-3", "seed=3", "train.log_every=2"],
                     launcher="python", check=False)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert changed.stderr.strip().splitlines()[-1].startswith(
        f"aligntI: config error: resume: {run / 'checkpoints' / 'step_00000002'} was trained under another recipe: "
        "optim.lr: 0.001 -> 0.005; seed: 0 -> 3. Ways on: a new run_dir; resume: never")
    other_model = launch(["recipes/train.py", "--config", str(recipe), f"model.path={tiny_student}",
                          "accept_changes=[model.path]"], launcher="python", check=False)
    assert other_model.returncode == 2 and "Traceback" not in other_model.stderr
    assert (f"holds a model trained from {tiny_model} that does not fit model.path {tiny_student}: "
            in other_model.stderr.strip().splitlines()[-1])
    assert snapshot() == before
    launch(["-m", "aligntI.cli", "export", "--run", str(run)], launcher="python")
    assert (run / "export_step_00000002" / "config.json").is_file()

    longer = launch(["recipes/train.py", "--config", str(recipe), "train.max_steps=3",
                     "accept_changes=[train.max_steps]"], launcher="python")
    assert "resume: train.max_steps: 2 -> 3 (accepted: the cosine schedule is recomputed" in longer.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    starts = [yaml.safe_load(p.read_text()) for p in sorted((run / "starts").glob("*.yaml"))]
    assert [s["train"]["max_steps"] for s in starts] == [2, 3]
    assert starts[1]["start"]["changes"] == [{"key": "train.max_steps", "was": 2, "now": 3, "verdict": "accepted",
                                              "effect": "the cosine schedule is recomputed for the new length"}]


def test_stop_request_checkpoints_and_the_same_command_resumes(tmp_path, tiny_model, digitgrid):
    """What slurm/*.sh do on SLURM's preemption warning: ``run_dir/stop_request`` -> checkpoint, stop, resume."""
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, digitgrid, tmp_path / "run", str(REPO / "ds_configs" / "zero2.json"),
        train={"max_steps": 3, "global_batch_size": 4},
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stop_request").touch()
    proc = launch(["recipes/train.py", "--config", str(recipe)], launcher="python")
    assert "stopped on request" in proc.stdout and "after step 1" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "stop_request").exists()
    proc = launch(["recipes/train.py", "--config", str(recipe)], launcher="python")
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_config_error_exits_cleanly_naming_the_key(tmp_path, tiny_model, digitgrid):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, digitgrid, tmp_path / "run",
                          str(REPO / "ds_configs" / "zero3.json"))
    proc = launch(["recipes/train.py", "--config", str(recipe), "train.micro_batchsize=2"], launcher="python",
                  check=False)
    assert proc.returncode == 2
    assert "train.micro_batchsize: unknown key" in proc.stderr and "Traceback" not in proc.stderr


def test_bf16_zero3_single_process(tmp_path, tiny_model, digitgrid, zero3_partitioned):
    """The precision GPU runs use, on CPU: bf16 weights and pixel values, fp32 loss, export in bf16."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, digitgrid, tmp_path / "run", zero3_partitioned,
                          engine={"precision": "bf16"}, train={"max_steps": 4, "global_batch_size": 4})
    launch(["recipes/train.py", "--config", str(recipe)], launcher="python")
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 4 and all(m["loss"] == m["loss"] and m["loss"] < 10 for m in metrics)  # finite
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["resolved"]["deepspeed"]["bf16"] == {
        "enabled": True}
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "final")
    assert model.dtype == torch.bfloat16
