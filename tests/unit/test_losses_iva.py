"""IVA focus, weights and attention KL, against hand-computed numbers and torch's kl_div."""

import math

import pytest
import torch
import torch.nn.functional as F

from aligntI.losses.iva import (
    attention_kl_sum,
    budget_weights,
    focus_queries,
    instruction_to_vision_focus,
    iva_weights,
)
from aligntI.losses.kd import weighted_divergence_sum


def small_example():
    """B=2, H=2, I=3, V=4. Sample 0 has a padded instruction row (i2) and a padded vision column (v3)."""
    probs = torch.zeros(2, 2, 3, 4)
    probs[0, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs[0, 0, 1] = torch.tensor([0.2, 0.2, 0.0, 0.3])
    probs[0, 1, 0] = torch.tensor([0.3, 0.1, 0.0, 0.5])
    probs[0, 1, 1] = torch.tensor([0.0, 0.1, 0.2, 0.6])
    probs[0, :, 2] = 0.25  # padded query row
    probs[1, 0] = torch.tensor([0.4, 0.1, 0.1, 0.0])
    probs[1, 1] = torch.tensor([0.0, 0.1, 0.1, 0.2])
    inst_valid = torch.tensor([[True, True, False], [True, True, True]])
    vis_valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # By hand: sample 0 column sums over 2 heads × 2 queries are 0.6, 0.6, 0.5 -> /1.7;
    # sample 1 is 3 × (0.4, 0.2, 0.2, 0.2) -> already sums to 1 after /3.
    expected = torch.tensor([[6 / 17, 6 / 17, 5 / 17, 0.0], [0.4, 0.2, 0.2, 0.2]])
    return probs, inst_valid, vis_valid, expected


def test_focus_matches_hand_computed_example():
    probs, inst_valid, vis_valid, expected = small_example()
    focus = instruction_to_vision_focus(probs, inst_valid, vis_valid)
    assert focus.shape == (2, 4) and focus.dtype == torch.float32
    torch.testing.assert_close(focus, expected)
    torch.testing.assert_close(focus.sum(-1), torch.ones(2))


@pytest.mark.parametrize("garbage", [1e6, math.inf, math.nan])
def test_focus_ignores_garbage_in_padding(garbage):
    probs, inst_valid, vis_valid, expected = small_example()
    probs[0, :, 2] = garbage
    probs[0, :, :, 3] = garbage
    torch.testing.assert_close(instruction_to_vision_focus(probs, inst_valid, vis_valid), expected)


def test_focus_rows_sum_to_one_on_random_padded_batch():
    g = torch.Generator().manual_seed(0)
    b, h, i, v = 4, 3, 5, 9
    probs = torch.rand(b, h, i, v, generator=g) / v
    inst_valid = torch.arange(i) < torch.tensor([5, 2, 1, 3])[:, None]
    vis_valid = torch.arange(v) < torch.tensor([9, 7, 4, 1])[:, None]
    focus = instruction_to_vision_focus(probs, inst_valid, vis_valid)
    torch.testing.assert_close(focus.sum(-1), torch.ones(b))
    assert (focus[~vis_valid] == 0).all() and (focus[vis_valid] > 0).all()


def test_focus_empty_rows_are_zero_and_gradients_finite():
    probs, inst_valid, vis_valid, expected = small_example()
    probs = torch.cat([probs, torch.full((2, 2, 3, 4), math.nan)]).requires_grad_()
    inst_valid = torch.cat([inst_valid, torch.tensor([[False] * 3, [True] * 3])])
    vis_valid = torch.cat([vis_valid, torch.tensor([[True] * 4, [False] * 4])])
    focus = instruction_to_vision_focus(probs, inst_valid, vis_valid)
    torch.testing.assert_close(focus[:2], expected)
    assert (focus[2:] == 0).all()
    (grad,) = torch.autograd.grad((focus * torch.arange(1.0, 5.0)).sum(), probs)
    assert torch.isfinite(grad).all()
    assert (grad[2:] == 0).all() and (grad[0, :, 2] == 0).all() and (grad[0, :, :, 3] == 0).all()
    assert (grad[1] != 0).any()


def test_focus_of_zero_mass_row_is_zero_with_finite_gradient():
    """Valid positions whose attention is exactly zero: nothing to renormalise, no NaN."""
    probs = torch.zeros(1, 1, 2, 3, requires_grad=True)
    valid_i, valid_v = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    focus = instruction_to_vision_focus(probs, valid_i, valid_v)
    assert (focus == 0).all()
    focus.sum().backward()
    assert torch.isfinite(probs.grad).all()


def random_focus(seed: int, b: int = 3, v: int = 10):
    g = torch.Generator().manual_seed(seed)
    vis_valid = torch.arange(v) < torch.tensor([10, 6, 3][:b])[:, None]
    focus = torch.rand(b, v, generator=g).masked_fill(~vis_valid, 0.0)
    return focus / focus.sum(-1, keepdim=True), vis_valid


@pytest.mark.parametrize("scheme, ratio",
                         [("teacher_attention", 1.0), ("teacher_attention", 0.3), ("uniform", 1.0)])
def test_weights_rows_sum_to_one_and_vanish_on_padding(scheme, ratio):
    focus, vis_valid = random_focus(1)
    w = iva_weights(focus, vis_valid, scheme, top_ratio=ratio)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert (w[~vis_valid] == 0).all() and not w.requires_grad


def test_teacher_attention_weights_are_the_detached_focus():
    focus, vis_valid = random_focus(2)
    focus.requires_grad_()
    w = iva_weights(focus, vis_valid)
    torch.testing.assert_close(w, focus.detach())
    assert not w.requires_grad


def test_uniform_weights_are_one_over_n_valid():
    vis_valid = torch.tensor([[True, True, True, True], [True, True, False, False], [False] * 4])
    w = iva_weights(None, vis_valid, "uniform")
    expected = torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0], [0.0] * 4])
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_top_ratio_keeps_ceil_of_ratio_times_valid_largest(ratio):
    vals = torch.tensor([0.05, 0.30, 0.02, 0.11, 0.17, 0.08, 0.19, 0.07, 5.0, 9.0])
    vis_valid = torch.tensor([[True] * 8 + [False] * 2, [True] * 6 + [False] * 4])
    focus = torch.stack([vals, vals])  # padded columns hold the largest values: they must never be kept
    w = iva_weights(focus, vis_valid, top_ratio=ratio)
    for row, n in enumerate([8, 6]):
        k = math.ceil(ratio * n)
        kept = sorted(vals[:n].tolist(), reverse=True)[:k]
        ref = torch.where(torch.isin(vals, torch.tensor(kept)) & vis_valid[row], vals, 0.0)
        assert int((w[row] > 0).sum()) == k
        torch.testing.assert_close(w[row], ref / ref.sum())


def test_top_ratio_ceiling_is_not_bumped_by_float_error():
    # 0.1 * 30 == 3.0000000000000004 in floating point; the intended count is 3.
    focus = torch.arange(1.0, 31.0)[None]
    w = iva_weights(focus, torch.ones(1, 30, dtype=torch.bool), top_ratio=0.1)
    assert int((w > 0).sum()) == 3
    w = iva_weights(focus, torch.ones(1, 30, dtype=torch.bool), top_ratio=1e-9)
    assert int((w > 0).sum()) == 1 and w[0, -1] == 1.0


def test_all_zero_focus_row_gives_zero_weights():
    focus = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    vis_valid = torch.ones(2, 3, dtype=torch.bool)
    for ratio in (1.0, 0.5):
        w = iva_weights(focus, vis_valid, top_ratio=ratio)
        assert (w[0] == 0).all() and torch.isfinite(w).all()


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_top_ratio_out_of_range_raises(ratio):
    focus, vis_valid = random_focus(3)
    with pytest.raises(ValueError, match="top_ratio"):
        iva_weights(focus, vis_valid, top_ratio=ratio)


def test_uniform_with_top_ratio_and_unknown_scheme_raise():
    focus, vis_valid = random_focus(4)
    with pytest.raises(ValueError, match="uniform"):
        iva_weights(focus, vis_valid, "uniform", top_ratio=0.5)
    with pytest.raises(ValueError, match="'salience'.*teacher_attention.*uniform"):
        iva_weights(focus, vis_valid, "salience")
    with pytest.raises(ValueError, match="focus"):
        iva_weights(None, vis_valid)


def test_uniform_weights_reproduce_plain_visual_token_kd():
    """LLaVA-KD-style baseline: per sample, the mean forward KL over its vision positions."""
    g = torch.Generator().manual_seed(5)
    b, n_vis, vocab = 3, 6, 17
    t = torch.randn(b, n_vis, vocab, generator=g) * 2
    s = (torch.randn(b, n_vis, vocab, generator=g) * 2).requires_grad_()
    vis_valid = torch.arange(n_vis) < torch.tensor([6, 4, 1])[:, None]
    w = iva_weights(None, vis_valid, "uniform")
    total = weighted_divergence_sum(t.reshape(-1, vocab), s.reshape(-1, vocab), w.reshape(-1), chunk_size=4)
    ref = sum(
        F.kl_div(F.log_softmax(s[i, vis_valid[i]], -1), F.log_softmax(t[i, vis_valid[i]], -1),
                 reduction="batchmean", log_target=True)
        for i in range(b)
    )
    torch.testing.assert_close(total, ref)
    (g_out,) = torch.autograd.grad(total, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_out, g_ref)


def test_attention_kl_sum_matches_kl_div_on_selected_rows():
    g = torch.Generator().manual_seed(6)
    t_focus, s_focus = torch.rand(2, 3, 10, generator=g).softmax(-1)  # strictly positive: kl_div needs log s
    rows = torch.tensor([True, False, True])
    s_focus[1] = math.nan  # an unselected row may hold anything
    s_focus.requires_grad_()
    out = attention_kl_sum(t_focus, s_focus, rows)
    ref = F.kl_div(s_focus[rows].log(), t_focus[rows], reduction="sum")
    assert out.dim() == 0 and out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out, s_focus)
    assert (grad[1] == 0).all() and torch.isfinite(grad).all()


def test_attention_kl_sum_zero_student_mass_is_large_but_finite():
    t_focus = torch.tensor([[0.5, 0.5, 0.0]])
    s_focus = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    out = attention_kl_sum(t_focus, s_focus, torch.tensor([True]))
    assert torch.isfinite(out) and out > 10
    out.backward()
    assert torch.isfinite(s_focus.grad).all()


def test_attention_kl_sum_teacher_gets_no_grad():
    t_focus, _ = random_focus(8)
    s_focus, _ = random_focus(9)
    t_focus, s_focus = t_focus.clone().requires_grad_(), s_focus.clone().requires_grad_()
    attention_kl_sum(t_focus, s_focus, torch.ones(3, dtype=torch.bool)).backward()
    assert t_focus.grad is None and s_focus.grad is not None


def test_attention_kl_sum_without_rows_is_connected_zero():
    s_focus = torch.rand(2, 5, requires_grad=True)
    out = attention_kl_sum(torch.rand(2, 5), s_focus, torch.zeros(2, dtype=torch.bool))
    assert out.dim() == 0 and out.dtype == torch.float32 and out.item() == 0.0
    out.backward()
    assert s_focus.grad is not None and (s_focus.grad == 0).all()


def test_drawn_rows_weigh_what_the_weights_say_in_expectation():
    weights = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    draws = 20000
    drawn = budget_weights(weights.repeat(draws, 1), 3, "sampled", torch.Generator().manual_seed(0))
    assert ((drawn > 0).sum(-1) <= 3).all()
    torch.testing.assert_close(drawn.sum(-1)[0::2], torch.ones(draws))  # each draw counts 1/k
    assert (drawn[1::2] == 0).all() and (drawn[0::2, 4] == 0).all()  # nothing to draw, and weight 0 never drawn
    # Counts/k is unbiased: the mean over draws is the weights, within 5 standard errors per row.
    standard_error = (weights[0] * (1 - weights[0]) / (3 * draws)).sqrt()
    assert ((drawn[0::2].mean(0) - weights[0]).abs() <= 5 * standard_error + 1e-9).all()


def test_top_k_rows_are_the_top_ratio_weights_at_k_over_n():
    focus = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(1)), -1)
    vis_valid = torch.ones(3, 10, dtype=torch.bool)
    full = iva_weights(focus, vis_valid)
    torch.testing.assert_close(budget_weights(full, 3, "top_k"), iva_weights(focus, vis_valid, top_ratio=0.3))
    assert (budget_weights(torch.zeros(1, 4), 2, "top_k") == 0).all()
    with pytest.raises(ValueError, match="row choice"):
        budget_weights(full, 3, "first")


def test_focus_queries_are_the_question_the_answer_start_or_both():
    #                 img img  q    q   tag  a    a   eos  tag  a   pad
    instruction = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[-100, -100, -100, -100, -100, 7, 8, 2, -100, 9, -100]])
    answer_start = torch.tensor([[0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)  # predicts 7, and 9
    assert torch.equal(focus_queries(instruction, labels), instruction)
    assert torch.equal(focus_queries(instruction, labels, "answer_start"), answer_start)
    assert torch.equal(focus_queries(instruction, labels, "both"), instruction | answer_start)
    with pytest.raises(ValueError, match="query rows"):
        focus_queries(instruction, labels, "response")
