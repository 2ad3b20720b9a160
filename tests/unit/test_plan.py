"""The dry run / ``aligntI plan``: parameter counts from configs only, ZeRO memory arithmetic, steps, the CLI."""

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch
from conftest import REPO, write_recipe, write_tiny_model
from recipe_scripts import train_script

from aligntI.cli import main
from aligntI.config import load_recipe, resolve_batching
from aligntI.engine import build_ds_config, teacher_ds_config
from aligntI.plan import (
    ModelShape,
    count_samples,
    format_plan,
    make_plan,
    model_shape,
    student_memory,
    teacher_memory,
)

ZERO3_OFFLOAD = str(REPO / "ds_configs" / "zero3_offload.json")
ZERO3 = str(REPO / "ds_configs" / "zero3.json")


def real_counts(path):
    """Oracle: the real model loaded on CPU from its weights, grouped by parameter name (tied weights once)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    parts = {"vision_tower": 0, "projector": 0, "llm": 0}
    for name, p in model.named_parameters():
        if name.startswith("model.vision_tower."):
            parts["vision_tower"] += p.numel()
        elif name.startswith("model.multi_modal_projector."):
            parts["projector"] += p.numel()
        else:
            assert name.startswith(("model.language_model.", "lm_head.")), name
            parts["llm"] += p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"parts": parts, "total": sum(p.numel() for p in model.parameters()), "largest": largest,
            "config": model.config}


@pytest.fixture(scope="module")
def models(tmp_path_factory, word_tokenizer):
    """A teacher and a narrower student as config-only model directories (weights deleted after the oracle)."""
    root = tmp_path_factory.mktemp("plan_models")
    word_tokenizer.save_pretrained(root / "tokenizer")
    teacher = write_tiny_model(root / "teacher", root / "tokenizer")
    student = write_tiny_model(root / "student", root / "tokenizer", vision_from=teacher, hidden_size=16,
                               num_heads=4, num_kv_heads=2, intermediate_size=32)
    oracle = {"teacher": real_counts(teacher), "student": real_counts(student)}
    for d in (teacher, student):
        for f in d.glob("*.safetensors"):
            f.unlink()
        assert (d / "config.json").is_file() and not list(d.glob("*.safetensors"))
    return {"teacher": teacher, "student": student, "oracle": oracle}


def records(n: int) -> list[dict]:
    return [{"id": str(i), "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}]}
            for i in range(n)]


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(records(10)))
    # JSONL with a blank line: the index counts records, not lines.
    (d / "more.jsonl").write_text("\n".join(json.dumps(r) for r in records(7)[:4]) + "\n\n"
                                  + "\n".join(json.dumps(r) for r in records(7)[4:]) + "\n")
    return d


def recipe(tmp_path, models, data_dir, ds_config=ZERO3, distill=False, **sections):
    if distill:
        sections["teacher"] = {"path": str(models["teacher"]), **sections.get("teacher", {})}
    return write_recipe(tmp_path / "recipe.yaml", models["student"], data_dir, tmp_path / "run", ds_config,
                        **sections)


def test_parameter_counts_come_from_the_config_alone(models):
    for role in ("teacher", "student"):
        shape, oracle = model_shape(models[role]), models["oracle"][role]
        assert shape.parts == oracle["parts"]
        assert shape.params == oracle["total"] == sum(oracle["parts"].values())
        assert shape.largest_module_params == oracle["largest"]
        text, vision = oracle["config"].text_config, oracle["config"].vision_config
        assert (shape.layers, shape.hidden, shape.intermediate, shape.vocab) == (
            text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.vocab_size)
        assert shape.kv_dim == text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
        assert shape.image_tokens == (vision.image_size // vision.patch_size) ** 2 == 16
    assert model_shape(models["student"]).trainable(["projector", "llm"]) == \
        models["oracle"]["student"]["parts"]["projector"] + models["oracle"]["student"]["parts"]["llm"]


# A hand-made model: 1,120 parameters, of which projector + llm (trainable by default) 1,020.
SHAPE = ModelShape(path="hand", parts={"vision_tower": 100, "projector": 20, "llm": 1000}, largest_module="big",
                   largest_module_params=300, layers=2, hidden=8, kv_dim=4, intermediate=16, heads=2, vocab=50,
                   vision_layers=1, vision_hidden=4, vision_intermediate=8, image_tokens=9)


def hand_recipe(tmp_path, stage: int, zero_extra: dict | None = None, **sections):
    ds = tmp_path / f"zero{stage}.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage, **(zero_extra or {})}}))
    data = tmp_path / "d"
    data.mkdir(exist_ok=True)
    path = write_recipe(tmp_path / f"r{stage}.yaml", tmp_path / "model", data, tmp_path / "run", str(ds),
                        **sections)
    return load_recipe(path)


def memory(cfg, world=4):
    ds = build_ds_config(cfg.engine, resolve_batching(cfg.train, world), device="cuda")
    return student_memory(SHAPE, cfg, ds, world), ds


def test_zero3_and_zero2_arithmetic_by_hand(tmp_path):
    # bf16 on the GPU (precision auto): b = 2; N = 4; trainable 1,020 of P = 1,120; T = 2 x 64 = 128 tokens.
    z3, ds3 = memory(hand_recipe(tmp_path, 3, {"stage3_prefetch_bucket_size": 500}))
    assert ds3["bf16"] == {"enabled": True}
    assert z3["parameters"] == 1120 * 2 / 4 == 560
    assert z3["gathered (ZeRO-3)"] == (300 + 500) * 2
    assert z3["gradients"] == 1020 * 2 / 4
    assert z3["optimizer state"] == 12 * 1020 / 4
    # Per decoder layer and token (5h + 2kv + 4I)·b = (40 + 8 + 64)·2 = 224 bytes; 2 layers, no checkpointing.
    assert z3["activations (LLM)"] == 2 * 128 * 224
    assert z3["activations (vision)"] == 2 * 9 * (5 * 4 + 2 * 4 + 4 * 8) * 2  # frozen: one layer, 18 image tokens
    assert z3["logits + grad"] == 2 * 128 * 50 * 2
    assert z3["loss fp32 chunks"] == 128 * 50 * 4 * 3  # SFT: all rows at once in fp32
    assert z3.total == pytest.approx(sum(i.bytes for i in z3.items))

    z2, _ = memory(hand_recipe(tmp_path, 2))
    assert z2["parameters"] == 1120 * 2 and z2["gathered (ZeRO-3)"] == 0
    assert z2["gradients"] == 1020 * 2 / 4 and z2["optimizer state"] == 12 * 1020 / 4
    z1, _ = memory(hand_recipe(tmp_path, 1))
    assert z1["gradients"] == 1020 * 2 and z1["optimizer state"] == 12 * 1020 / 4
    z0, _ = memory(hand_recipe(tmp_path, 0))
    assert z0["gradients"] == 1020 * 2 and z0["optimizer state"] == 12 * 1020

    # Activation checkpointing keeps each layer's input (T·h·b) plus one whole layer; fp32 doubles the bytes.
    ck, _ = memory(hand_recipe(tmp_path, 3, {"stage3_prefetch_bucket_size": 500},
                               model={"activation_checkpointing": True}))
    assert ck["activations (LLM)"] == 2 * 128 * 8 * 2 + 128 * 224
    fp32, ds = memory(hand_recipe(tmp_path, 3, {"stage3_prefetch_bucket_size": 500},
                                  engine={"precision": "fp32"}))
    assert ds["bf16"] == {"enabled": False} and fp32["parameters"] == 1120 * 4 / 4


def test_teacher_estimate_by_hand(tmp_path):
    cfg = hand_recipe(tmp_path, 3, {"stage3_prefetch_bucket_size": 500}, teacher={"path": "t"},
                      loss={"sft": 1.0, "kd": 1.0, "iva": 0.0, "tpa": 1.0}, tpa={"candidates": 3, "max_positions": 5})
    student_ds = build_ds_config(cfg.engine, resolve_batching(cfg.train, 4), device="cuda")
    t = teacher_memory(SHAPE, cfg, teacher_ds_config(student_ds, False, device="cuda"), 4)
    assert t["parameters"] == 560 and t["gathered (ZeRO-3)"] == 1600
    assert t["gradients"] == 0 and t["optimizer state"] == 0
    assert t["activations (LLM)"] == 128 * 224  # no_grad: one layer at a time
    assert t["logits"] == 128 * 50 * 2
    assert t["TPA logits"] == 2 * 5 * 3 * 50 * 2  # micro 2 x 5 positions x d 3 rows of V
    assert t["IVA capture"] == 0  # loss.iva 0
    s = student_memory(SHAPE, cfg, student_ds, 4)
    assert s["TPA logits + grad"] == 2 * (2 * 5 * 3) * 50 * 2
    assert s["loss fp32 chunks"] == 128 * 50 * 4 * 3  # kd.chunk_size 1024 > T: one chunk of T rows
    # ZeRO-2 student: the teacher is a whole replica (stage 0).
    cfg2 = hand_recipe(tmp_path, 2, teacher={"path": "t"})
    ds2 = build_ds_config(cfg2.engine, resolve_batching(cfg2.train, 4), device="cuda")
    t2 = teacher_memory(SHAPE, cfg2, teacher_ds_config(ds2, "auto", device="cuda"), 4)
    assert t2.zero_stage == 0 and t2["parameters"] == 1120 * 2 and t2["gathered (ZeRO-3)"] == 0


def test_offload_moves_optimizer_state_and_parameters_off_the_gpu(tmp_path, models, data_dir):
    path = recipe(tmp_path, models, data_dir, ZERO3_OFFLOAD, distill=True, teacher={"placement": "offload"})
    plan = make_plan(path, world_size=2)
    assert plan.student["optimizer state"] == 0 and plan.student["parameters"] == 0
    assert plan.student["gradients"] > 0 and plan.student["gathered (ZeRO-3)"] > 0  # gathered for forward
    assert plan.teacher["parameters"] == 0
    # The plan is for the GPU run even here on a CPU: bf16, pinned offload memory.
    assert plan.student_ds["bf16"] == {"enabled": True} == plan.teacher_ds["bf16"]
    assert plan.teacher_ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    on_gpu = make_plan(recipe(tmp_path, models, data_dir, ZERO3, distill=True), world_size=2)
    trainable = models["oracle"]["student"]["parts"]["projector"] + models["oracle"]["student"]["parts"]["llm"]
    assert on_gpu.student["optimizer state"] == 12 * trainable / 2
    assert on_gpu.student["parameters"] == models["oracle"]["student"]["total"] * 2 / 2


def test_steps_count_the_data_like_the_sampler(tmp_path, models, data_dir, capsys):
    # 10 JSON records cut to 6 (max_samples), 7 JSONL records drawn 1.3 x = round(9.1) = 9: 15 per epoch;
    # global batch 4 -> 3 steps per epoch; 2 epochs -> 6 steps.
    sources = [{"path": str(data_dir / "train.json"), "max_samples": 6},
               {"path": str(data_dir / "more.jsonl"), "weight": 1.3}]
    path = recipe(tmp_path, models, data_dir, data={"train": sources},
                  train={"global_batch_size": 4, "micro_batch_size": 2, "max_steps": None, "epochs": 2})
    plan = make_plan(path, world_size=2)
    assert plan.data.samples == 15 and plan.steps.per_epoch == 3 and plan.steps.total == 6
    assert plan.batching.gradient_accumulation_steps == 1
    assert [f[1:] for f in plan.data.per_file] == [(6, 1.0, 6), (7, 1.3, 9)]
    assert count_samples(load_recipe(path).data).samples == 15
    assert make_plan(path, world_size=2, train_samples=101).steps.total == 2 * (101 // 4)

    missing = str(data_dir / "not_downloaded.jsonl")
    gone = make_plan(path, ["data.train.1.path=" + missing], world_size=2)
    assert gone.data.samples is None and gone.data.missing == [missing] and gone.steps.total is None
    assert main(["plan", "--config", str(path), "--world-size", "2", "data.train.1.path=" + missing]) == 0
    text = capsys.readouterr().out
    assert "samples       unknown: data file(s) not found: " + missing in text and "steps         unknown" in text
    # max_steps does not need the data; --train-samples stands in for missing files.
    assert make_plan(path, ["data.train.1.path=" + missing, "train.max_steps=7", "train.epochs=null"],
                     world_size=2).steps.total == 7
    assert make_plan(path, ["data.train.1.path=" + missing], world_size=2, train_samples=40).steps.total == 20


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, models, data_dir, capsys, monkeypatch):
    import torch.distributed

    path = recipe(tmp_path, models, data_dir, distill=True)
    assert train_script.main(["--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "aligntI dry run" in out and "world size    1 (default: one process)" in out
    assert "micro 2 x accumulation 4 x world 1 = global 8" in out
    assert "samples       10 per epoch (data files) -> 1 steps per epoch of 8" in out
    assert "12 optimizer steps (train.max_steps" in out
    assert "DeepSpeed config, student" in out and "DeepSpeed config, teacher" in out
    assert "ESTIMATE" in out and "CUDA context" in out and "teacher + student:" in out and "FITS" in out
    assert not (tmp_path / "run").exists() and not torch.distributed.is_initialized()

    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it
    assert train_script.main(["--config", str(path), "--dry-run", "--local_rank=0"]) == 0
    assert "micro 2 x accumulation 2 x world 2 = global 8" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")  # the other ranks say nothing
    assert train_script.main(["--config", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    assert main(["plan", "--config", str(path), "--world-size", "4", "--gpu-memory-gib", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "world size    4 (--world-size)" in out and "DOES NOT FIT" in out
    assert not (tmp_path / "run").exists()


def test_train_script_dry_run_under_a_launcher_env_never_imports_deepspeed(tmp_path, models, data_dir):
    path = recipe(tmp_path, models, data_dir, ZERO3_OFFLOAD, distill=True)
    code = ("import runpy, sys\n"
            f"sys.argv = ['recipes/train.py', '--config', {str(path)!r}, '--dry-run']\n"
            "try:\n    runpy.run_path('recipes/train.py', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
            "sys.exit(rc)\n")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size    2 (WORLD_SIZE)" in proc.stdout and "DeepSpeed config, teacher" in proc.stdout
    assert not (tmp_path / "run").exists()


CPU_ONLY = not torch.cuda.is_available() and find_spec("flash_attn") is None and find_spec("flash_attn_interface") is None


@pytest.mark.skipif(not CPU_ONLY, reason="what a machine without CUDA and flash-attn lacks")
def test_the_plan_says_what_this_machine_lacks(tmp_path, models, data_dir, capsys):
    flash3 = {"text": "flash_attention_3", "vision": "flash_attention_3"}
    path = recipe(tmp_path, models, data_dir, distill=True, engine={"precision": "bf16"},
                  model={"attn_implementation": {"text": "flash_attention_2", "vision": "sdpa"}},
                  teacher={"attn_implementation": flash3})
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out[out.index("\nThis machine"):].splitlines()[1:] == [
        "This machine lacks or cannot check what the recipe requests; the job needs these on its compute nodes "
        "(a login node without a GPU usually lacks them):",
        "  flash_attention_2 (model.attn_implementation.text): the flash_attn package is not installed",
        "  flash_attention_3 (teacher.attn_implementation.text, teacher.attn_implementation.vision): the "
        "flash_attn_interface package is not installed",
        "  bf16 (engine.precision: bf16): no CUDA device, so bf16 support cannot be checked"]

    assert train_script.main(["--config", str(path), "--dry-run", "engine.precision=auto"]) == 0
    out = capsys.readouterr().out  # auto is bf16 only where the device has it: nothing to lack
    assert out.endswith("flash_attn_interface package is not installed\n") and "bf16 (" not in out

    assert main(["plan", "--config", str(path), "engine.precision=fp32", "teacher.attn_implementation.text=sdpa",
                 "teacher.attn_implementation.vision=eager", "model.attn_implementation.text=sdpa"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n\nThis machine: lacks nothing the recipe requests (attention backends, precision)\n")


def test_a_global_batch_that_does_not_divide_names_the_key(tmp_path, models, data_dir, capsys):
    path = recipe(tmp_path, models, data_dir)
    assert main(["plan", "--config", str(path), "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "train.global_batch_size: 8 is not divisible" in err and "world size (3)" in err
    assert train_script.main(["--config", str(path), "--dry-run", "train.gradient_accumulation_steps=2"]) == 2
    assert "train.gradient_accumulation_steps: micro_batch_size 2 x gradient_accumulation_steps 2" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("student_passes", ["joint", "separate"])
def test_traffic_per_placement_from_parameter_counts(tmp_path, models, data_dir, student_passes):
    """Per-step gathers by placement, against the parameter counts of the real models (bf16, 2 GPUs)."""
    path = recipe(tmp_path, models, data_dir, ZERO3, distill=True, tpa={"student_passes": student_passes})
    plan = make_plan(path, world_size=2)
    accumulation = plan.batching.gradient_accumulation_steps
    teacher, student = models["oracle"]["teacher"], models["oracle"]["student"]
    by_name = {p.name: p for p in plan.placements}
    assert [p.name for p in plan.placements] == ["sharded", "replicated", "offload"] and by_name["sharded"].chosen
    # One joint teacher pass: every teacher parameter gathered once per micro-batch.
    assert by_name["sharded"].traffic.gathered == teacher["total"] * 2 * accumulation
    assert by_name["replicated"].traffic.gathered == 0 == by_name["sharded"].traffic.from_host
    assert by_name["offload"].traffic.from_host == by_name["offload"].traffic.gathered / 2 > 0
    assert by_name["offload"].teacher_bytes < by_name["sharded"].teacher_bytes  # no parameter shard on the GPU
    parts = student["parts"]
    backward = parts["llm"] + parts["projector"]  # the frozen vision tower has no backward
    per_micro = (2 * student["total"] if student_passes == "joint" else student["total"] + 2 * parts["llm"]) + backward
    traffic, _ = plan.student_traffic
    assert traffic.gathered == per_micro * 2 * accumulation
    assert traffic.reduced == backward * 2 * accumulation
    text = format_plan(plan)
    assert "Teacher placement (teacher.placement; * = this recipe)" in text and "sharded *" in text
