"""Distillation on 2 CPU ranks with ZeRO-3 (real launchers): teacher integrity, capture, resume, export, errors."""

import json

import pytest
import torch
from conftest import REPO, kill_when, launch, lines_repeated_per_step, write_recipe, write_tiny_model
from test_hooks_attention import write_mixed

TERMS = ("loss", "sft", "kd", "iva", "tpa", "top1_agreement")


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def distill_recipe(tmp_path, name, student, teacher_dir, digitgrid, ds_config, **sections):
    base = dict(teacher={"path": str(teacher_dir)}, loss={"sft": 1.0, "kd": 1.0, "iva": 1.0, "tpa": 1.0},
                iva={"layer": "auto"}, irs={"samples": 16})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return write_recipe(tmp_path / f"{name}.yaml", student, digitgrid, tmp_path / name, ds_config, **base)


def test_distill_zero3_two_ranks(tmp_path, tiny_model, tiny_student, digitgrid, zero3_partitioned):
    text_only = tmp_path / "text.jsonl"  # image-free samples: some micro-batches have nothing for IVA
    text_only.write_text("".join(json.dumps({"id": f"t{i}", "conversations": [
        {"from": "human", "value": "read top row"}, {"from": "gpt", "value": "none"}]}) + "\n" for i in range(20)))
    recipe = distill_recipe(
        tmp_path, "run", tiny_student, tiny_model, digitgrid, zero3_partitioned,
        model={"activation_checkpointing": True},
        teacher={"placement": "offload"},
        data={"padding_side": "left",
              "train": [{"path": str(digitgrid / "train.json")}, {"path": str(text_only), "weight": 2.0}]},
        train={"max_steps": 12, "save_every": 6},
    )
    out = tmp_path / "probe.json"
    proc = launch(["tests/distributed/distill_probe.py", str(recipe), str(write_mixed(tmp_path, digitgrid)), str(out)],
                  launcher="torchrun")
    probe = json.loads(out.read_text())
    # The teacher: untouched and gradient-free after training, against a fresh load from disk.
    assert probe["teacher_params"] > 0
    assert probe["teacher_max_abs_diff"] == 0.0 and probe["teacher_params_with_grad"] == 0
    # Capture under ZeRO-3 (teacher engine; student with activation checkpointing) equals eager attention maps.
    assert len(probe["instruction_lengths"]) > 2
    assert probe["teacher_capture_max_err"] <= 1e-5 and probe["student_capture_max_err"] <= 1e-5
    # TPA under ZeRO-3: candidate logits of both engines equal separate forwards of prefix + candidate, and the
    # candidates are the configured source's draw (distinct, never the ground truth) for all three sources.
    assert probe["tpa_candidates"] > 20
    assert probe["tpa_teacher_max_err"] <= 2e-5 and probe["tpa_student_max_err"] <= 2e-5
    assert probe["joint_gt_max_err"] <= 2e-5 and probe["joint_candidates_max_err"] <= 2e-5
    assert probe["tpa_source_matches"] == {"student": True, "teacher": True, "gt_bigram": True}
    assert probe["bigram_total"] == probe["response_tokens"] > 0

    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for m in metrics:
        assert all(m[k] == m[k] and m[k] >= 0 for k in TERMS), m  # finite, logged every step
        assert m["loss"] == pytest.approx(m["sft"] + m["kd"] + m["iva"] + m["tpa"], rel=1e-6)
        assert 0 <= m["top1_agreement"] <= 1 and m["iva_samples"] > 0
        assert m["tpa_positions"] == m["response_tokens"] > 0  # every response position, no cap
    irs = json.loads((run / "irs.json").read_text())
    assert irs["samples"] == 16 and len(irs["irs"]) == 2 and f"iva.layer {irs['chosen_layer']}" in proc.stdout
    assert "nothing to score for iva" in proc.stdout  # image-free micro-batches were logged, not divided by 0
    # The exported student is the student (not the teacher) and reloads.
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(run / "final")
    assert exported.config.text_config.hidden_size == 16
    student_params = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(tiny_student).parameters())
    assert sum(p.numel() for p in exported.parameters()) == student_params
    ckpt_bytes = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000012").glob("*model_states.pt"))
    teacher_bytes = (tiny_model / "model.safetensors").stat().st_size
    assert ckpt_bytes < teacher_bytes  # the student is a fraction of the teacher: no teacher inside


@pytest.mark.parametrize(("placement", "student_passes", "iva"), [
    ("sharded", "auto", {"top_ratio": 0.5}), ("replicated", "joint", {"row_budget": 3}),
    ("offload", "separate", {"top_ratio": 0.5})])
def test_distill_resume_is_exact(tmp_path, tiny_model, tiny_student, digitgrid, zero3_partitioned, placement,
                                 student_passes, iva):
    """Every teacher placement, both ways the student scores TPA candidates, and IVA's drawn rows (a row budget)
    train and resume exactly."""
    common = dict(iva={"layer": 1, **iva}, kd={"divergence": "jsd", "temperature": 2.0},
                  tpa={"candidates": 3, "weighting": "student_prob", "max_positions": 2,
                       "student_passes": student_passes},
                  teacher={"placement": placement},
                  train={"max_steps": 16, "save_every": 6}, data={"num_workers": 1})
    straight = distill_recipe(tmp_path, "a", tiny_student, tiny_model, digitgrid, zero3_partitioned, **common)
    broken = distill_recipe(tmp_path, "b", tiny_student, tiny_model, digitgrid, zero3_partitioned, **common)
    first = launch(["recipes/train.py", "--config", str(straight)], launcher="torchrun")
    assert lines_repeated_per_step(first.stderr, 16) == {}  # no rank's log grows by a line per step

    kill_when(["recipes/train.py", "--config", str(broken)],
              tmp_path / "b" / "checkpoints" / "step_00000006" / "COMPLETE")
    assert read_metrics(tmp_path / "b")[-1]["step"] < 16

    proc = launch(["recipes/train.py", "--config", str(broken)], launcher="torchrun")
    assert "resumed from" in proc.stdout + proc.stderr
    stage = {"sharded": 3, "replicated": 0, "offload": 3}[placement]
    assert f"ZeRO stage {stage}, placement {placement}" in proc.stdout
    if student_passes != "auto":
        joint = student_passes == "joint"
        assert f"student: {'sampling pass + joint pass' if joint else 'ground-truth + candidate pass'}" in proc.stdout
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 17))
    for x, y in zip(a, b):
        for key in TERMS:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    from transformers import AutoModelForImageTextToText

    a_final = AutoModelForImageTextToText.from_pretrained(tmp_path / "a" / "final")
    b_final = AutoModelForImageTextToText.from_pretrained(tmp_path / "b" / "final")
    for (name, p), q in zip(a_final.named_parameters(), b_final.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_mismatched_pair_is_refused_before_training(tmp_path, tiny_model, digitgrid, zero3_partitioned):
    wide = write_tiny_model(tmp_path / "wide_images", digitgrid / "tokenizer", image_size=48, hidden_size=16)
    recipe = distill_recipe(tmp_path, "run", wide, tiny_model, digitgrid, zero3_partitioned)
    proc = launch(["recipes/train.py", "--config", str(recipe)], launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[image layout]" in proc.stderr and "image tokens per image teacher 16 / student 36" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_iva_without_any_image_is_an_error(tmp_path, tiny_model, tiny_student, digitgrid, zero3_partitioned):
    text_only = tmp_path / "text.json"
    text_only.write_text(json.dumps([{"id": f"t{i}", "conversations": [
        {"from": "human", "value": "read top row"}, {"from": "gpt", "value": "none"}]} for i in range(8)]))
    recipe = distill_recipe(tmp_path, "run", tiny_student, tiny_model, digitgrid, zero3_partitioned,
                            iva={"layer": 0}, data={"train": [{"path": str(text_only)}]},
                            train={"global_batch_size": 4})
    proc = launch(["recipes/train.py", "--config", str(recipe)], launcher="python", check=False)
    assert proc.returncode != 0
    assert "step 1: loss.iva is 1.0 but no sample in the whole global batch has an image" in proc.stderr
    # the same data with IVA off trains
    proc = launch(["recipes/train.py", "--config", str(recipe), "loss.iva=0", f"run_dir={tmp_path / 'ok'}",
                   "train.max_steps=2"], launcher="python")
    assert len(read_metrics(tmp_path / "ok")) == 2


def test_single_process_zero2_attention_mode(tmp_path, tiny_model, tiny_student, digitgrid):
    """ZeRO-2 student (the teacher then runs as a whole replica) with IVA aligning attention maps directly."""
    recipe = distill_recipe(
        tmp_path, "run", tiny_student, tiny_model, digitgrid, str(REPO / "ds_configs" / "zero2.json"),
        iva={"layer": "auto", "mode": "attention"}, kd={"divergence": "reverse_kl"},
        train={"max_steps": 3, "global_batch_size": 4},
    )
    proc = launch(["recipes/train.py", "--config", str(recipe)], launcher="python")
    assert "ZeRO stage 0" in proc.stdout and "student layer" in proc.stdout
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 3 and all(m["iva"] > 0 and m["iva"] == m["iva"] for m in metrics)
    proc = launch(["recipes/train.py", "--config", str(recipe), "iva.layer=7", f"run_dir={tmp_path / 'bad'}"],
                  launcher="python", check=False)
    assert proc.returncode == 2 and "iva.layer: 7 is out of range; the teacher has 2 decoder layers" in proc.stderr


@pytest.mark.parametrize("source", ["teacher", "gt_bigram"])
def test_tpa_candidate_sources_train(tmp_path, tiny_model, tiny_student, digitgrid, source):
    """The reviewers' ablations: candidates from the teacher or from ground-truth bigrams (single process, ZeRO-2)."""
    recipe = distill_recipe(
        tmp_path, "run", tiny_student, tiny_model, digitgrid, str(REPO / "ds_configs" / "zero2.json"),
        loss={"iva": 0.0}, tpa={"source": source, "candidates": 2, "max_positions": 1},
        train={"max_steps": 3, "global_batch_size": 4},
    )
    proc = launch(["recipes/train.py", "--config", str(recipe)], launcher="python")
    assert f"2 candidates per response position from the {source}" in proc.stdout
    if source == "gt_bigram":
        assert "TPA gt_bigram source:" in proc.stdout
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 3
    for m in metrics:
        assert m["tpa"] > 0 and m["tpa"] == m["tpa"]
        assert m["tpa_positions"] <= 4 < m["response_tokens"]  # one position per sample
