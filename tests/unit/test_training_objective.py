"""TPA's draws inside the distillation recipe: random streams, and candidates only among real tokens."""

import json

import pytest
import torch
from conftest import write_recipe
from recipe_scripts import train_script
from test_hooks_attention import batch_for, write_mixed
from transformers import AutoTokenizer

from aligntI.config import load_recipe
from aligntI.data.dataset import model_inputs
from aligntI.losses.tpa import scored_rows, tpa_seeds
from aligntI.models.builder import TextSpec, TinyModelSpec, VisionSpec, write_model_dir
from aligntI.training.objective import TPADraws


def test_position_and_candidate_streams_are_independent_and_reproducible():
    positions, candidates = tpa_seeds(0, 7, 1, 3)
    assert positions != candidates
    assert (positions, candidates) == tpa_seeds(0, 7, 1, 3)
    assert len({tpa_seeds(0, step, micro, rank) for step in range(3) for micro in range(2) for rank in range(2)}) == 12
    # On the CPU one seed means one stream: the candidates' Gumbel noise must not replay the positions' keys.
    a = torch.rand(64, generator=torch.Generator().manual_seed(positions))
    b = torch.rand(64, generator=torch.Generator().manual_seed(candidates))
    assert not torch.equal(a, b) and abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.5


@pytest.fixture(scope="module")
def padded_pair(digitgrid, tmp_path_factory):
    """Teacher and student whose embeddings have padding rows past the tokenizer's ids, as Qwen2.5's do."""
    root = tmp_path_factory.mktemp("padded")
    tokenizer = AutoTokenizer.from_pretrained(digitgrid / "tokenizer")
    vision = VisionSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    spec = TinyModelSpec(text=TextSpec(hidden_size=32, num_layers=2, intermediate_size=64), vision=vision,
                         vocab_multiple=64)
    teacher = write_model_dir(root / "teacher", spec, tokenizer)
    student = write_model_dir(root / "student", spec, tokenizer, vision_from=teacher)
    return teacher, student, len(tokenizer)


@pytest.mark.parametrize("source", ["student", "teacher", "gt_bigram"])
def test_candidates_are_never_embedding_padding_rows(source, padded_pair, digitgrid, tmp_path, zero3_partitioned):
    teacher, student, n_tokens = padded_pair
    recipe_path = write_recipe(tmp_path / "r.yaml", student, digitgrid, tmp_path / "run", zero3_partitioned,
                               teacher={"path": str(teacher)}, loss={"iva": 0.0},
                               tpa={"source": source, "candidates": 4})
    objective = train_script.build(load_recipe(recipe_path), []).objective
    assert objective.shared.size % 64 == 0 and objective.shared.token_ids == n_tokens < objective.shared.size
    batch = batch_for(student, write_mixed(tmp_path, digitgrid), "right")
    rows = scored_rows(batch["labels"])
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)[rows]
    logits = torch.zeros(int(rows.sum()), objective.shared.size)
    logits[:, n_tokens:] = 30.0  # the padding rows are by far the likeliest "tokens"
    candidates = objective.candidates(TPADraws(rows, 5), model_inputs(batch), targets,
                                      None if source == "gt_bigram" else logits)
    assert candidates.shape == (int(rows.sum()), 4)
    assert int(candidates.max()) < n_tokens


def two_pass_oracle(objective, mb, draws, counts):
    """Today's Align-TI step the long way: each model's ground-truth pass (recording its prefix), the
    candidates from the student's, then each model's candidate pass. Returns (total loss, per-term sums)."""
    from aligntI.hooks.attention import AttentionCapture
    from aligntI.hooks.transitions import CandidateBatch, PrefixCache
    from aligntI.losses.kd import weighted_divergence_sum
    from aligntI.losses.sft import rows_ce_sum
    from aligntI.losses.tpa import candidate_weights
    from aligntI.training.accounting import micro_loss_scale
    from aligntI.training.objective import to_device

    teacher, student, size = objective.teacher, objective.student, objective.shared.size
    inputs = to_device(mb, torch.device("cpu"), torch.float32)
    targets_full = torch.nn.functional.pad(mb["labels"][:, 1:], (0, 1), value=-100)
    iva_rows = objective.iva_samples(mb)
    keep = (targets_full != -100) | (mb["vision_mask"] & iva_rows[:, None])
    targets, at = targets_full[keep], draws.rows[keep]
    masks = {k: mb[k] for k in ("vision_mask", "instruction_mask", "attention_mask")}
    t_prefix, s_prefix = PrefixCache(teacher.module), PrefixCache(student.module)
    with AttentionCapture(teacher.module, [objective.iva_layer], mb["instruction_mask"], mb["vision_mask"],
                          mb["attention_mask"]) as t_cap:
        t_logits = teacher(**inputs, logits_to_keep=keep, use_cache=False, prefix_cache=t_prefix).logits[:, :size]
    s_logits = student(**inputs, logits_to_keep=keep, use_cache=False, prefix_cache=s_prefix).logits[:, :size]
    candidates = objective.candidates(draws, inputs, targets[at], s_logits[at].detach())
    layout = CandidateBatch(draws.rows, candidates, inputs["attention_mask"], inputs["position_ids"])
    t_next = layout.in_candidate_order(teacher(**layout.model_inputs(t_prefix)).logits[:, :size])
    s_next = layout.in_candidate_order(student(**layout.model_inputs(s_prefix)).logits[:, :size])
    weights = candidate_weights(s_logits[at].detach(), candidates, objective.cfg.tpa.weighting)
    resp = (targets != -100).float()
    sums = {"sft": rows_ce_sum(s_logits, targets), "kd": weighted_divergence_sum(t_logits, s_logits, resp),
            "iva": objective._iva_sum(t_logits, s_logits, keep, masks, iva_rows, t_cap, None),
            "tpa": weighted_divergence_sum(t_next, s_next, weights.flatten())}
    scale = {k: micro_loss_scale(counts[c], 1, objective.accumulation) for k, c in
             (("sft", "response_tokens"), ("kd", "response_tokens"), ("iva", "iva_samples"), ("tpa", "tpa_positions"))}
    return sum(scale[k] * v for k, v in sums.items()), sums


@pytest.mark.parametrize("student_passes", ["joint", "separate"])
def test_one_teacher_pass_gives_the_two_pass_losses_and_gradients(student_passes, tiny_model, tiny_student,
                                                                  digitgrid, tmp_path):
    """The teacher's joint pass (and the student's, for joint) against the two-pass step on the same draws."""
    teacher, student = tiny_model, tiny_student
    plain = tmp_path / "zero0.json"  # gradients stay whole in .grad
    plain.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    recipe_path = write_recipe(tmp_path / "r.yaml", student, digitgrid, tmp_path / "run", str(plain), teacher={"path": str(teacher)}, iva={"layer": 1},
                               tpa={"candidates": 3, "student_passes": student_passes, "max_positions": 4})
    run = train_script.build(load_recipe(recipe_path), [])
    objective = run.objective
    assert objective.student_joint == (student_passes == "joint")
    mb = batch_for(student, write_mixed(tmp_path, digitgrid), "left")
    plan = objective.plan([mb], step=1)
    params = [p for p in run.student.module.parameters() if p.requires_grad]

    def gradients(loss):
        run.student.backward(loss)
        out = [p.grad.clone() for p in params]
        run.student.engine.zero_grad()
        return out

    with objective.loss(mb, plan.draws[0], plan.counts) as out:
        grads = gradients(out.loss)
    oracle_loss, oracle_sums = two_pass_oracle(objective, mb, plan.draws[0], plan.counts)
    oracle_grads = gradients(oracle_loss)
    assert oracle_sums["tpa"] > 0 and oracle_sums["iva"] > 0
    for term, value in oracle_sums.items():
        torch.testing.assert_close(out.sums[term], value.detach(), atol=1e-5, rtol=1e-5, msg=term)
    torch.testing.assert_close(out.loss.detach(), oracle_loss.detach(), atol=1e-6, rtol=1e-5)
    for g, o in zip(grads, oracle_grads):
        torch.testing.assert_close(g, o, atol=1e-6, rtol=1e-4)
