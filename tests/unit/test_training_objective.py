"""TPA's draws inside the distillation recipe: random streams, and candidates only among real tokens."""

import json

import pytest
import torch
from conftest import REPO, answer_starts, write_recipe
from recipe_scripts import train_script
from test_hooks_attention import batch_for, write_mixed
from transformers import AutoTokenizer

from aligntI.config import load_recipe
from aligntI.data.dataset import model_inputs
from aligntI.losses.tpa import scored_rows
from aligntI.models.builder import TextSpec, TinyModelSpec, VisionSpec, write_model_dir
from aligntI.training.objective import TPADraws, draw_seeds


def test_draw_streams_are_independent_and_reproducible():
    streams = draw_seeds(0, 7, 1, 3)  # TPA positions, TPA candidates, IVA rows
    assert len(set(streams)) == 3
    assert streams == draw_seeds(0, 7, 1, 3)
    assert len({draw_seeds(0, step, micro, rank) for step in range(3) for micro in range(2) for rank in range(2)}) == 12
    # On the CPU one seed means one stream: the candidates' Gumbel noise must not replay the positions' keys.
    a, b, c = (torch.rand(64, generator=torch.Generator().manual_seed(s)) for s in streams)
    for x, y in ((a, b), (a, c), (b, c)):
        assert not torch.equal(x, y) and abs(torch.corrcoef(torch.stack([x, y]))[0, 1]) < 0.5


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


def teacher_weights(objective, mb, t_cap) -> torch.Tensor:
    """The paper's α at the IVA layer, per position ``[B, L]``: 0 off the IVA samples' vision tokens."""
    from aligntI.hooks.attention import padded_positions
    from aligntI.losses.iva import instruction_to_vision_focus

    vis_idx, vis_valid = padded_positions(mb["vision_mask"])
    vis_valid = vis_valid & objective.iva_samples(mb)[:, None]
    focus = instruction_to_vision_focus(t_cap[objective.iva_layer], t_cap.inst_valid, vis_valid)
    per_position = torch.zeros(mb["vision_mask"].shape)
    rows = torch.arange(vis_idx.shape[0])[:, None].expand_as(vis_idx)
    per_position[rows[vis_valid], vis_idx[vis_valid]] = focus[vis_valid]
    return per_position


def budget_oracle(full: torch.Tensor, vision: torch.Tensor, k: int, choice: str, seed: int) -> torch.Tensor:
    """``full [B, L]`` weights moved onto the rows the objective's draw with ``seed`` picks, sample by sample."""
    from aligntI.losses.iva import budget_weights

    per_sample = [full[b][vision[b]] for b in range(full.shape[0])]
    width = max(len(w) for w in per_sample)
    stacked = torch.stack([torch.nn.functional.pad(w, (0, width - len(w))) for w in per_sample])
    chosen = budget_weights(stacked, k, choice, torch.Generator().manual_seed(seed))
    out = torch.zeros_like(full)
    for b in range(full.shape[0]):
        out[b][vision[b]] = chosen[b][: int(vision[b].sum())]
    return out


def iva_oracle(t_logits, s_logits, weights) -> torch.Tensor:
    """Σ over rows of weight · KL(p_T ‖ p_S), by ``F.kl_div``."""
    kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits.float(), -1), torch.log_softmax(t_logits.float(), -1),
                                    log_target=True, reduction="none").sum(-1)
    return (weights * kl).sum()


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
    draws, iva_seed = draws.tpa, draws.iva_seed
    targets, at = targets_full[keep], draws.rows[keep]
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
    iva_weights = teacher_weights(objective, mb, t_cap)
    if objective.cfg.iva.row_budget is not None:
        vision = mb["vision_mask"] & iva_rows[:, None]
        iva_weights = budget_oracle(iva_weights, vision, objective.cfg.iva.row_budget, objective.cfg.iva.row_choice,
                                    iva_seed)
    sums = {"sft": rows_ce_sum(s_logits, targets), "kd": weighted_divergence_sum(t_logits, s_logits, resp),
            "iva": iva_oracle(t_logits, s_logits, iva_weights[keep]),
            "tpa": weighted_divergence_sum(t_next, s_next, weights.flatten())}
    scale = {k: micro_loss_scale(counts[c], 1, objective.accumulation) for k, c in
             (("sft", "response_tokens"), ("kd", "response_tokens"), ("iva", "iva_samples"), ("tpa", "tpa_positions"))}
    return sum(scale[k] * v for k, v in sums.items()), sums


@pytest.mark.parametrize("student_passes,row_budget", [("joint", None), ("separate", None), ("joint", 3)])
def test_one_teacher_pass_gives_the_two_pass_losses_and_gradients(student_passes, row_budget, tiny_model,
                                                                  tiny_student, digitgrid, tmp_path):
    """The teacher's joint pass (and the student's, for joint) against the two-pass step on the same draws;
    with an IVA row budget the student's joint pass projects only the drawn rows."""
    teacher, student = tiny_model, tiny_student
    plain = tmp_path / "zero0.json"  # gradients stay whole in .grad
    plain.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    recipe_path = write_recipe(tmp_path / "r.yaml", student, digitgrid, tmp_path / "run", str(plain), teacher={"path": str(teacher)},
                               iva={"layer": 1, "row_budget": row_budget},
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


def budget_step(tiny_model, tiny_student, digitgrid, tmp_path, **iva):
    """An IVA-only objective (ZeRO-0, so gradients stay whole) and one micro-batch of its step."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    plain = tmp_path / "zero0.json"
    plain.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_student, digitgrid, tmp_path / "run", str(plain),
                               teacher={"path": str(tiny_model)}, iva={"layer": 1, **iva}, loss={"tpa": 0.0})
    run = train_script.build(load_recipe(recipe_path), [])
    mb = batch_for(tiny_student, write_mixed(tmp_path, digitgrid), "left")
    return run, mb, run.objective.plan([mb], step=1)


@pytest.mark.parametrize("choice", ["sampled", "top_k"])
def test_iva_row_budget_projects_only_its_rows_and_gives_their_loss_and_gradients(choice, tiny_model, tiny_student,
                                                                                 digitgrid, tmp_path):
    from aligntI.hooks.attention import AttentionCapture
    from aligntI.losses.kd import weighted_divergence_sum
    from aligntI.losses.sft import rows_ce_sum
    from aligntI.training.accounting import micro_loss_scale

    k = 3
    run, mb, plan = budget_step(tiny_model, tiny_student, digitgrid, tmp_path, row_budget=k, row_choice=choice)
    objective, draws = run.objective, plan.draws[0]
    assert draws.iva_seed is not None
    params = [p for p in run.student.module.parameters() if p.requires_grad]
    projected = {"teacher": [], "student": []}  # the rows each LM head projects, per call
    hooks = [engine.module.get_output_embeddings().register_forward_hook(
        lambda module, args, out, name=name: projected[name].append(args[0].shape[0]))
        for name, engine in (("teacher", objective.teacher), ("student", run.student))]

    def gradients(loss):
        run.student.backward(loss)
        out = [p.grad.clone() for p in params]
        run.student.engine.zero_grad()
        return out

    with objective.loss(mb, draws, plan.counts) as out:
        grads = gradients(out.loss)
    for hook in hooks:
        hook.remove()
    # The oracle: both models' logits at every vision row, then the same draw's weights.
    size = objective.shared.size
    inputs = model_inputs(mb)
    targets_full = torch.nn.functional.pad(mb["labels"][:, 1:], (0, 1), value=-100)
    vision = mb["vision_mask"] & objective.iva_samples(mb)[:, None]
    keep = (targets_full != -100) | vision
    with AttentionCapture(objective.teacher.module, [objective.iva_layer], mb["instruction_mask"], mb["vision_mask"],
                          mb["attention_mask"]) as t_cap, torch.no_grad():
        t_logits = objective.teacher(**inputs, logits_to_keep=keep, use_cache=False).logits[:, :size]
    s_logits = objective.student(**inputs, logits_to_keep=keep, use_cache=False).logits[:, :size]
    vis_rows = budget_oracle(teacher_weights(objective, mb, t_cap), vision, k, choice, draws.iva_seed)
    weights = vis_rows[keep]
    assert ((vis_rows > 0).sum(-1) <= k).all() and (vis_rows > 0).sum() < vision.sum()
    # Each model projected the response rows and the chosen vision rows, nothing else.
    rows = int((targets_full != -100).sum() + (vis_rows > 0).sum())
    assert projected == {"teacher": [rows], "student": [rows]}
    resp = (targets_full[keep] != -100).float()
    sums = {"sft": rows_ce_sum(s_logits, targets_full[keep]), "kd": weighted_divergence_sum(t_logits, s_logits, resp),
            "iva": iva_oracle(t_logits, s_logits, weights)}
    for term, value in sums.items():
        torch.testing.assert_close(out.sums[term], value.detach(), atol=1e-5, rtol=1e-5, msg=term)
    scale = {k: micro_loss_scale(plan.counts[c], 1, objective.accumulation) for k, c in
             (("sft", "response_tokens"), ("kd", "response_tokens"), ("iva", "iva_samples"))}
    oracle = sum(scale[t] * getattr(objective.cfg.loss, t) * v for t, v in sums.items())
    for g, o in zip(grads, gradients(oracle)):
        torch.testing.assert_close(g, o, atol=1e-6, rtol=1e-4)


def test_drawn_iva_rows_estimate_the_all_row_loss_without_bias(tiny_model, tiny_student, digitgrid, tmp_path):
    from aligntI.training.objective import MicroDraws

    run, mb, plan = budget_step(tiny_model, tiny_student, digitgrid, tmp_path / "all")
    with torch.no_grad(), run.objective.loss(mb, plan.draws[0], plan.counts) as out:
        full = float(out.sums["iva"])
    run, mb, plan = budget_step(tiny_model, tiny_student, digitgrid, tmp_path / "drawn", row_budget=2)
    estimates = []
    for seed in range(120):
        with torch.no_grad(), run.objective.loss(mb, MicroDraws(None, seed), plan.counts) as out:
            estimates.append(float(out.sums["iva"]))
    estimates = torch.tensor(estimates)
    standard_error = float(estimates.std() / len(estimates) ** 0.5)
    assert len(set(estimates.tolist())) > 60  # the draws do vary: this is an estimate, not the full loss
    assert abs(float(estimates.mean()) - full) < 4 * standard_error


def test_row_budget_refuses_a_student_that_projects_before_the_teacher(tiny_model, tiny_student, digitgrid, tmp_path):
    from aligntI.config import ConfigError

    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_student, digitgrid, tmp_path / "run",
                               str(REPO / "ds_configs" / "zero2.json"), teacher={"path": str(tiny_model)},
                               iva={"layer": 1, "row_budget": 4}, tpa={"student_passes": "separate"})
    with pytest.raises(ConfigError, match="iva.row_budget: the rows are chosen from the teacher's weights"):
        train_script.build(load_recipe(recipe_path), [])


def test_sft_projects_only_the_response_rows_and_gives_the_full_forward_loss(tiny_student, digitgrid, tmp_path):
    plain = tmp_path / "zero0.json"
    plain.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    run = train_script.build(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_student, digitgrid, tmp_path / "run",
                                                      str(plain))), [])
    mb = batch_for(tiny_student, write_mixed(tmp_path, digitgrid), "left")
    plan = run.objective.plan([mb], step=1)
    projected = []
    hook = run.student.module.get_output_embeddings().register_forward_hook(
        lambda module, args, out: projected.append(args[0].shape[0]))
    with torch.no_grad(), run.objective.loss(mb, plan.draws[0], plan.counts) as out:
        pass
    hook.remove()
    responses = int((mb["labels"][:, 1:] != -100).sum())
    assert projected == [responses] and responses < mb["labels"].numel() // 2
    with torch.no_grad():  # the oracle: every position's logits, HF's shift
        logits = run.student(**model_inputs(mb), use_cache=False).logits
    oracle = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), mb["labels"][:, 1:].flatten(),
                                               reduction="sum")
    torch.testing.assert_close(out.sums["sft"], oracle, atol=1e-5, rtol=1e-5)


def test_iva_focus_from_the_answer_start_rows_against_eager_attention(tiny_model, tiny_student, digitgrid, tmp_path):
    """``iva.queries: answer_start``: the IVA weights the objective builds are the teacher's attention from the
    position that predicts the answer's first token, as eager attention gives it (not the question's rows)."""
    from aligntI.config import AttentionConfig
    from aligntI.models.loading import load_model

    run, mb, plan = budget_step(tiny_model, tiny_student, digitgrid, tmp_path, queries="answer_start")
    objective = run.objective
    vision = mb["vision_mask"]
    keep = (torch.nn.functional.pad(mb["labels"][:, 1:], (0, 1), value=-100) != -100) | vision
    masks = {"vision_mask": vision, "attention_mask": mb["attention_mask"], "queries": objective._queries(mb)}
    iva_rows = objective.iva_samples(mb)
    with torch.no_grad(), objective._capture(objective.teacher.module, objective.iva_layer, masks) as cap:
        objective.teacher(**model_inputs(mb), logits_to_keep=keep, use_cache=False)
    weights, _ = objective._iva_rows(masks, iva_rows, None).choose(cap, keep)

    eager = load_model(tiny_model, AttentionConfig("eager", "eager"), torch.float32).eval()
    with torch.no_grad():
        attentions = eager(**model_inputs(mb), output_attentions=True, use_cache=False).attentions[objective.iva_layer]

    def oracle(rows_of):
        out = torch.zeros(vision.shape)
        for b in iva_rows.nonzero().squeeze(-1).tolist():  # samples with an image (the others weigh 0)
            probs = attentions[b].mean(0)[rows_of(b)][:, vision[b]].mean(0)
            out[b][vision[b]] = probs / probs.sum()
        return out

    labels = mb["labels"]
    starts = oracle(lambda b: answer_starts(labels[b]))
    question = oracle(lambda b: mb["instruction_mask"][b].nonzero().squeeze(-1).tolist())
    assert iva_rows.sum() >= 3
    torch.testing.assert_close(weights, starts, atol=1e-5, rtol=1e-4)
    # The untrained model attends almost uniformly, but the two query sets still differ far beyond the match.
    assert (starts - question).abs().max() > 1e-4 > 100 * (weights - starts).abs().max()


def test_attention_mode_aligns_the_answer_start_focus_of_both_models(tiny_model, tiny_student, digitgrid, tmp_path):
    """``iva.mode: attention`` with ``iva.queries: answer_start``: the IVA sum is KL(teacher ‖ student) between the
    two models' attention from the answer-start position to the image, as eager attention gives each."""
    from aligntI.config import AttentionConfig
    from aligntI.models.loading import load_model

    run, mb, plan = budget_step(tiny_model, tiny_student, digitgrid, tmp_path, mode="attention",
                                queries="answer_start")
    objective = run.objective
    with torch.no_grad(), objective.loss(mb, plan.draws[0], plan.counts) as out:
        got = out.sums["iva"]
    vision, labels = mb["vision_mask"], mb["labels"]
    samples = objective.iva_samples(mb).nonzero().squeeze(-1).tolist()

    def focus(model_dir, layer):
        model = load_model(str(model_dir), AttentionConfig("eager", "eager"), torch.float32).eval()
        with torch.no_grad():
            att = model(**model_inputs(mb), output_attentions=True, use_cache=False).attentions[layer]
        rows = []
        for b in samples:
            (start,) = answer_starts(labels[b])
            a = att[b].mean(0)[start][vision[b]]
            rows.append(a / a.sum())
        return torch.stack(rows)

    t, s = focus(tiny_model, objective.iva_layer), focus(tiny_student, objective.student_layer)
    oracle = torch.nn.functional.kl_div(s.log(), t, reduction="sum")
    assert len(samples) >= 3 and oracle > 1e-6  # untrained models attend nearly uniformly: a small KL, not 0
    torch.testing.assert_close(got, oracle, atol=1e-9, rtol=1e-3)
