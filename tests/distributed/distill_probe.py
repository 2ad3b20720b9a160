"""Run a distillation recipe under a real launcher, then check it from inside the job against oracles.

Usage (2 CPU ranks): torchrun --nproc_per_node 2 tests/distributed/distill_probe.py <recipe.yaml> <probe_data.json> <out.json>

After training, on every rank:
* the teacher's parameters (gathered from their ZeRO-3 shards) equal a fresh load from disk, and have no grads;
* the teacher engine (ZeRO-3, eval) and the student engine (ZeRO-3, train mode, activation checkpointing, backward
  run inside the capture) capture instruction→vision probabilities equal to eager ``output_attentions`` of a plain
  model holding the same weights;
* TPA: both engines' candidate logits equal separate forwards of prefix + candidate of those plain models (padded
  batch; the student's pass also runs backward), and their joint pass gives the same ground-truth and candidate
  logits; the candidates come from the configured source (same draw as
  ``draw_candidates`` on that source's scores), are distinct and never the ground truth; the gt_bigram table
  merged over ranks counts every response token of the training data once.
"""

import json
import sys

import torch
from recipe_scripts import train_script
from test_hooks_transitions import separate_candidate_logits

from aligntI import engine as ds
from aligntI.config import AttentionConfig, DataConfig, DataSource, load_recipe
from aligntI.data.dataset import model_inputs
from aligntI.data.loader import build_sequential_loader
from aligntI.hooks.attention import AttentionCapture, decoder_layers, padded_positions
from aligntI.hooks.transitions import CandidateBatch, JointPass, PrefixCache
from aligntI.losses.tpa import candidate_weights, draw_candidates, scored_rows
from aligntI.models.loading import load_model
from aligntI.training.interrupts import Interrupts
from aligntI.training.objective import TPADraws, count_response_bigrams


def eager_probs(model, batch, layer):
    with torch.no_grad():
        full = model(**model_inputs(batch), output_attentions=True, use_cache=False).attentions[layer]
    inst_idx, inst_valid = padded_positions(batch["instruction_mask"])
    vis_idx, vis_valid = padded_positions(batch["vision_mask"])
    rows = full.gather(2, inst_idx[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))
    ref = rows.gather(3, vis_idx[:, None, None, :].expand(-1, full.shape[1], rows.shape[2], -1))
    return ref * (inst_valid[:, None, :, None] & vis_valid[:, None, None, :])


def plain_copy(path, engine_module):
    """An eager, unsharded model with the engine's current weights (gathered from all ranks)."""
    plain = load_model(path, AttentionConfig("eager", "eager")).eval()
    with ds.gathered_parameters(engine_module):
        state = {k: v.detach().clone() for k, v in engine_module.state_dict().items()}
    plain.load_state_dict(state)
    return plain


def check_tpa(run, batch, plain_teacher, plain_student) -> dict:
    inputs = model_inputs(batch)
    rows = scored_rows(batch["labels"])
    targets = batch["labels"][:, 1:][rows[:, :-1]]
    objective, student = run.objective, run.student
    t_prefix, s_prefix = PrefixCache(objective.teacher.module), PrefixCache(student.module)
    t_logits = objective.teacher(**inputs, logits_to_keep=rows, use_cache=False, prefix_cache=t_prefix).logits
    s_logits = student(**inputs, logits_to_keep=rows, use_cache=False, prefix_cache=s_prefix).logits
    draws = TPADraws(rows, 1234)
    out = {"tpa_source_matches": {}}
    objective.bigrams = count_response_bigrams(run.processor, run.cfg, run.dist)
    response_tokens = sum(int((b["labels"] != -100).sum()) for b in build_sequential_loader(
        run.processor, run.cfg.data, batch_size=64))
    out["bigram_total"], out["response_tokens"] = objective.bigrams.total, response_tokens
    bigram_scores = objective.bigrams.scores(batch["input_ids"][rows])
    for source, scores in (("student", s_logits), ("teacher", t_logits), ("gt_bigram", bigram_scores)):
        run.cfg.tpa.source = source
        candidates = objective.candidates(draws, inputs, targets, None if source == "gt_bigram" else scores)
        weights = candidate_weights(s_logits.detach(), candidates, run.cfg.tpa.weighting)
        oracle = draw_candidates(scores, targets, run.cfg.tpa.candidates, exclude_gt=True,
                                 generator=torch.Generator().manual_seed(1234),
                                 never=(run.processor.image_token_id,))
        distinct = all(len(set(c)) == len(c) for c in candidates.tolist())
        out["tpa_source_matches"][source] = bool(torch.equal(candidates, oracle)) and distinct and \
            not (candidates == targets[:, None]).any().item() and bool(torch.allclose(weights.sum(-1), torch.ones(1))) \
            and not (candidates == run.processor.image_token_id).any().item()
    layout = CandidateBatch(rows, candidates, inputs["attention_mask"], inputs["position_ids"])
    t_next = layout.in_candidate_order(objective.teacher(**layout.model_inputs(t_prefix)).logits)
    s_next = layout.in_candidate_order(student(**layout.model_inputs(s_prefix)).logits)
    student.backward(s_next.float().logsumexp(-1).mean() + s_logits.float().pow(2).mean())
    student.engine.zero_grad()
    # The joint pass (ground truth and candidates in one forward) through both engines.
    joint = {}
    for name, model in (("teacher", objective.teacher), ("student", student)):
        layout_of = JointPass(model.module, layout, inputs, rows)
        joint[name] = layout_of.split(model(**layout_of.inputs).logits)
    student.backward(joint["student"][1].float().logsumexp(-1).mean() + joint["student"][0].float().pow(2).mean())
    student.engine.zero_grad()
    out["joint_gt_max_err"] = max(float((joint["teacher"][0] - t_logits).abs().max()),
                                  float((joint["student"][0] - s_logits).abs().max()))
    out["joint_candidates_max_err"] = max(float((joint["teacher"][1] - t_next).abs().max()),
                                          float((joint["student"][1] - s_next).abs().max()))
    with torch.no_grad():
        out["tpa_teacher_max_err"] = float((t_next - separate_candidate_logits(plain_teacher, batch, rows,
                                                                               candidates)).abs().max())
        out["tpa_student_max_err"] = float((s_next.detach() - separate_candidate_logits(plain_student, batch, rows,
                                                                                        candidates)).abs().max())
    out["tpa_candidates"] = candidates.numel()
    return out


def main(recipe_path, probe_data, out_path):
    cfg = load_recipe(recipe_path)
    run = train_script.build(cfg, [])
    train_script.train(run, Interrupts())  # no signal arrives: the whole run
    result = {}

    # The teacher: unchanged against a fresh load from disk, and gradient-free.
    fresh = load_model(cfg.teacher.path, AttentionConfig()).state_dict()
    teacher = run.objective.teacher.module
    with ds.gathered_parameters(teacher) as params:
        names = [n for n, _ in teacher.named_parameters()]
        result["teacher_max_abs_diff"] = max(float((p.detach() - fresh[n]).abs().max())
                                             for n, p in zip(names, params))
        result["teacher_params_with_grad"] = sum(p.grad is not None or p.requires_grad for p in params)
    result["teacher_params"] = len(names)

    # Capture under ZeRO-3 against eager output_attentions of plain copies.
    data = DataConfig(train=[DataSource(probe_data, images="/")], chat_template=cfg.data.chat_template,
                      max_length=64, padding_side=cfg.data.padding_side, num_workers=0)
    batch = next(iter(build_sequential_loader(run.processor, data, batch_size=16)))
    masks = [batch[k] for k in ("instruction_mask", "vision_mask", "attention_mask")]
    n_teacher = len(decoder_layers(teacher))
    with AttentionCapture(teacher, list(range(n_teacher)), *masks) as cap:
        run.objective.teacher(**model_inputs(batch), use_cache=False)
    plain_teacher = plain_copy(cfg.teacher.path, teacher)
    result["teacher_capture_max_err"] = max(float((cap[i] - eager_probs(plain_teacher, batch, i)).abs().max())
                                            for i in range(n_teacher))

    student = run.student.module
    plain_student = plain_copy(cfg.model.path, student)  # before the step below changes nothing: no optimizer step
    run.student.train()
    assert student.is_gradient_checkpointing, "the probe recipe must enable activation checkpointing"
    n_student = len(decoder_layers(student))
    with AttentionCapture(student, list(range(n_student)), *masks) as cap:
        logits = run.student(**model_inputs(batch), use_cache=False).logits
        loss = sum(cap[i].sum() for i in range(n_student)) + logits.float().pow(2).mean()
        run.student.backward(loss)  # recomputes the checkpointed layers (and their captures) in backward
    result["student_capture_max_err"] = max(float((cap[i].detach() - eager_probs(plain_student, batch, i)).abs().max())
                                            for i in range(n_student))
    result["instruction_lengths"] = sorted(set(batch["instruction_mask"].sum(-1).tolist()))
    run.student.engine.zero_grad()
    result.update(check_tpa(run, batch, plain_teacher, plain_student))
    train_script.finish(run)
    if run.dist.is_main:
        with open(out_path, "w") as f:
            json.dump(result, f)
    ds.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:4])
