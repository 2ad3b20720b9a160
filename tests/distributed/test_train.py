"""Real multi-process DeepSpeed runs on 2 CPU ranks (gloo): training, export, resume after a kill."""

import json
import re

import pytest
import torch
import yaml
from conftest import REPO, kill_when, launch, write_recipe


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

    # Resuming on another world size cannot be exact: a clear error, before any step.
    proc = launch(["recipes/train.py", "--config", str(broken)], launcher="python", check=False)
    assert proc.returncode == 2
    assert "an exact resume needs the same world size" in proc.stderr and "'world_size': 2" in proc.stderr


def test_single_process_zero2_with_python(tmp_path, tiny_model, digitgrid):
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_model, digitgrid, tmp_path / "run", str(REPO / "ds_configs" / "zero2.json"),
        train={"max_steps": 3, "global_batch_size": 4},
    )
    launch(["recipes/train.py", "--config", str(recipe), "train.micro_batch_size=2"], launcher="python")
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


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
