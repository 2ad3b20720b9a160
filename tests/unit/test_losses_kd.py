"""KD divergences and the chunked weighted sum, against torch's own kl_div and hand-written textbook forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from aligntI.losses.kd import DIVERGENCES, divergence, top1_agreement, weighted_divergence_sum

N, V = 7, 13


def logits(seed: int, n: int = N, v: int = V, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64).float() * scale


def ref_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) per row via torch's kl_div (input = log Q, target = log P)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def log_probs(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    return F.log_softmax(z.double() / tau, dim=-1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_and_reverse_kl_match_kl_div(tau):
    t, s = logits(0), logits(1)
    lp, lq = log_probs(t, tau), log_probs(s, tau)
    fwd = divergence(t, s, "forward_kl", temperature=tau)
    rev = divergence(t, s, "reverse_kl", temperature=tau)
    assert fwd.shape == (N,) and fwd.dtype == torch.float32
    torch.testing.assert_close(fwd.double(), ref_kl(lp, lq) * tau**2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rev.double(), ref_kl(lq, lp) * tau**2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_inputs_give_fp32_close_to_fp32_reference(kind):
    t, s = logits(2).bfloat16(), logits(3).bfloat16()
    out = divergence(t, s, kind)
    assert out.dtype == torch.float32
    # Reference on the same (bf16-rounded) values upcast by hand: only the internal precision differs.
    torch.testing.assert_close(out, divergence(t.float(), s.float(), kind), rtol=1e-6, atol=1e-6)
    if kind == "forward_kl":
        torch.testing.assert_close(out.double(), ref_kl(log_probs(t.float()), log_probs(s.float())),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_inputs_give_zero(kind):
    z = logits(4)
    torch.testing.assert_close(divergence(z, z.clone(), kind), torch.zeros(N), atol=1e-6, rtol=0)


def test_jsd_tends_to_the_kls_at_the_endpoints():
    # Mild logits: jsd/β → KL(P‖Q) needs β·p ≪ q, which heavy-tailed rows at β = 1e-4 would not give.
    t, s = logits(5, scale=1.0), logits(6, scale=1.0)
    fwd, rev = divergence(t, s, "forward_kl"), divergence(t, s, "reverse_kl")
    beta = 1e-4
    torch.testing.assert_close(divergence(t, s, "jsd", jsd_beta=beta) / beta, fwd, rtol=1e-2, atol=1e-4)
    beta = 1 - 1e-4
    torch.testing.assert_close(divergence(t, s, "jsd", jsd_beta=beta) / (1 - beta), rev, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_jsd_half_is_textbook_js_divergence(tau):
    t, s = logits(7), logits(8)
    p, q = log_probs(t, tau).exp(), log_probs(s, tau).exp()
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(divergence(t, s, "jsd", temperature=tau).double(), js * tau**2,
                               rtol=1e-5, atol=1e-6)
    assert (js <= math.log(2) + 1e-12).all()


def test_jsd_half_is_symmetric():
    t, s = logits(9), logits(10)
    torch.testing.assert_close(divergence(t, s, "jsd", jsd_beta=0.5), divergence(s, t, "jsd", jsd_beta=0.5))


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_jsd_beta_outside_open_interval_raises(beta):
    with pytest.raises(ValueError, match="jsd_beta"):
        divergence(logits(0), logits(1), "jsd", jsd_beta=beta)


@pytest.mark.parametrize("alpha", [-0.1, 1.0])
def test_skew_alpha_outside_range_raises(alpha):
    with pytest.raises(ValueError, match="skew_alpha"):
        divergence(logits(0), logits(1), "skew_kl", skew_alpha=alpha)


def test_skew_kl_at_zero_is_forward_kl():
    t, s = logits(11), logits(12)
    torch.testing.assert_close(divergence(t, s, "skew_kl", skew_alpha=0.0), divergence(t, s, "forward_kl"))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_skew_kl_matches_kl_div_against_the_mixture(alpha):
    t, s = logits(13), logits(14)
    p, q = log_probs(t).exp(), log_probs(s).exp()
    mix = alpha * p + (1 - alpha) * q
    ref = F.kl_div(mix.log(), p, reduction="none").sum(-1)
    out = divergence(t, s, "skew_kl", skew_alpha=alpha)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_tvd_is_half_l1_and_at_most_one():
    t, s = logits(15, scale=10.0), logits(16, scale=10.0)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    out = divergence(t, s, "tvd")
    torch.testing.assert_close(out.double(), 0.5 * (p - q).abs().sum(-1), rtol=1e-5, atol=1e-6)
    assert (out <= 1 + 1e-6).all() and (out >= 0).all()


def test_unknown_kind_raises_with_allowed_list():
    with pytest.raises(ValueError, match="'kl'.*forward_kl.*tvd"):
        divergence(logits(0), logits(1), "kl")
    with pytest.raises(ValueError, match="'kl'"):
        weighted_divergence_sum(logits(0), logits(1), torch.ones(N), kind="kl")


def test_zero_probability_entries_give_no_nan():
    """Vocabulary entries masked to -inf on both sides: 0·log0 must count as 0, also in the gradient."""
    t, s = logits(17), logits(18).requires_grad_()
    t[:, :3] = -math.inf
    for kind in DIVERGENCES:
        masked = s.masked_fill(torch.arange(V) < 3, -math.inf)
        out = divergence(t, masked, kind)
        (grad,) = torch.autograd.grad(out.sum(), s)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), kind
        torch.testing.assert_close(out, divergence(t[:, 3:], s.detach()[:, 3:], kind), rtol=1e-5, atol=1e-6)


def reference_sum(t, s, w, **kw):
    return (w * divergence(t, s, **kw)).sum()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 3, N, N + 5])
def test_weighted_sum_matches_unchunked_reference_value_and_grad(kind, chunk_size):
    t = logits(20)
    s = logits(21).requires_grad_()
    w = torch.rand(N, generator=torch.Generator().manual_seed(22)) + 0.1
    kw = dict(kind=kind, temperature=2.0, jsd_beta=0.3, skew_alpha=0.2)
    out = weighted_divergence_sum(t, s, w, chunk_size=chunk_size, **kw)
    ref = reference_sum(t, s, w, **kw)
    assert out.dim() == 0 and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (g_out,) = torch.autograd.grad(out, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-7)


def test_weighted_sum_saves_only_chunk_inputs_for_backward():
    """The point of the checkpointing: no fp32 [rows, V] intermediate is kept alive until backward."""
    v = 50
    t, s = logits(31, n=10, v=v).bfloat16(), logits(32, n=10, v=v).bfloat16().requires_grad_()
    w = torch.ones(10)
    w[4] = 0.0
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = weighted_divergence_sum(t, s, w, chunk_size=3)
    wide = [x for x in saved if x.dim() == 2 and x.shape[-1] == v]
    assert wide and all(x.dtype == torch.bfloat16 and x.shape[0] <= 3 for x in wide)
    assert sum(x.shape[0] for x in wide) == 2 * 9  # teacher and student rows of the nine kept rows, once
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_weighted_sum_without_grad_and_in_bf16():
    t, s = logits(23).bfloat16(), logits(24).bfloat16()
    w = torch.ones(N)
    out = weighted_divergence_sum(t, s, w, chunk_size=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, divergence(t, s).sum())


def test_weighted_sum_never_sends_gradient_to_the_teacher():
    t, s = logits(25).requires_grad_(), logits(26).requires_grad_()
    weighted_divergence_sum(t, s, torch.ones(N), chunk_size=2).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("garbage", [math.inf, -math.inf, math.nan])
def test_zero_weight_rows_are_ignored_even_with_garbage(garbage):
    t, s = logits(27), logits(28)
    w = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.0, 1.0])
    dirty_t, dirty_s = t.clone(), s.clone()
    dirty_t[w == 0] = garbage
    dirty_s[w == 0, ::2] = garbage
    dirty_s.requires_grad_()
    out = weighted_divergence_sum(dirty_t, dirty_s, w, chunk_size=2)
    keep = w != 0
    ref = (w[keep] * divergence(t[keep], s[keep])).sum()
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out, dirty_s)
    assert torch.isfinite(grad).all() and (grad[~keep] == 0).all()


def test_all_zero_weights_give_connected_zero():
    s = logits(29).requires_grad_()
    out = weighted_divergence_sum(logits(30), s, torch.zeros(N))
    assert out.dim() == 0 and out.dtype == torch.float32 and out.item() == 0.0
    out.backward()
    assert s.grad is not None and (s.grad == 0).all()


def test_all_zero_weights_with_garbage_and_bf16_still_zero():
    s = torch.full((3, V), math.nan, dtype=torch.bfloat16, requires_grad=True)
    out = weighted_divergence_sum(torch.zeros(3, V), s, torch.zeros(3))
    assert out.dtype == torch.float32 and out.item() == 0.0
    out.backward()
    assert (s.grad == 0).all()


def test_top1_agreement_counts_matching_argmax():
    t = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0], [1.0, 2.0, 0.0]])
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, 4.0, 1.0], [0.0, 1.0, 3.0], [7.0, 2.0, 0.0]])
    out = top1_agreement(t, s)
    assert out.dtype == torch.int64 and out.dim() == 0 and out.item() == 2
