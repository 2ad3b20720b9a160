"""Token-level distillation divergences on already-selected logit rows ``[N, V]`` (KD and IVA).

Everything is computed in fp32 on log-softmax outputs. ``weighted_divergence_sum`` is the entry point for
training: it drops zero-weight rows and processes the rest in checkpointed chunks, so no more than one
chunk's worth of full-vocabulary fp32 tensors is ever alive.

How KD and IVA use it: docs/method.md, sections 4 and 6.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P‖Q) from log-probabilities, with 0·log0 = 0 (no NaN where P has zero mass)."""
    p = log_p.exp()
    # Mask the log-ratio, not the product: -inf - -inf would otherwise put NaN into forward and backward.
    ratio = (log_p - log_q).masked_fill(p == 0, 0.0)
    return (p * ratio).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, a: float) -> torch.Tensor:
    """log(a·P + (1−a)·Q), computed stably in log space."""
    if a == 0.0:
        return log_q
    # A finite floor (no-op on finite values) keeps logaddexp's backward free of NaN where both are -inf.
    floor = torch.finfo(log_p.dtype).min
    return torch.logaddexp(log_p.clamp_min(floor) + math.log(a), log_q.clamp_min(floor) + math.log1p(-a))


def _check_kind(kind: str, temperature: float, jsd_beta: float, skew_alpha: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be strictly in (0, 1) (the endpoints are the KLs), got {jsd_beta}")
    if kind == "skew_kl" and not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")


def divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str = "forward_kl",
               temperature: float = 1.0, jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> torch.Tensor:
    """Per-row divergence ``[N]`` between teacher P and student Q at temperature τ, times τ².

    forward_kl = KL(P‖Q); reverse_kl = KL(Q‖P); jsd = β·KL(P‖M) + (1−β)·KL(Q‖M) with M = βP + (1−β)Q;
    skew_kl = KL(P ‖ αP + (1−α)Q); tvd = ½·Σ|P − Q|. Always fp32, whatever the input dtype.
    """
    _check_kind(kind, temperature, jsd_beta, skew_alpha)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        out = _kl(log_p, log_q)
    elif kind == "reverse_kl":
        out = _kl(log_q, log_p)
    elif kind == "jsd":
        log_m = _log_mixture(log_p, log_q, jsd_beta)
        out = jsd_beta * _kl(log_p, log_m) + (1.0 - jsd_beta) * _kl(log_q, log_m)
    elif kind == "skew_kl":
        out = _kl(log_p, _log_mixture(log_p, log_q, skew_alpha))
    else:
        out = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return out * temperature**2


def _chunk_sum(teacher: torch.Tensor, student: torch.Tensor, weights: torch.Tensor, **kw) -> torch.Tensor:
    return (weights * divergence(teacher, student, **kw)).sum()


def weighted_divergence_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, weights: torch.Tensor,
                            *, kind: str = "forward_kl", temperature: float = 1.0, jsd_beta: float = 0.5,
                            skew_alpha: float = 0.1, chunk_size: int = 256) -> torch.Tensor:
    """Σ_rows weights[row] · divergence(row), as a 0-dim fp32 tensor; gradients flow to the student only.

    Rows with weight 0 are dropped before any softmax (they may hold garbage). The rest go through in
    chunks of ``chunk_size`` rows, each under activation checkpointing when the student needs grad, so
    backward keeps only the chunk inputs instead of every chunk's fp32 [chunk, V] intermediates.
    """
    _check_kind(kind, temperature, jsd_beta, skew_alpha)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keep = weights.nonzero().squeeze(-1)
    if keep.numel() == 0:
        # Graph-connected zero so every rank runs backward; an empty slice cannot turn garbage into NaN.
        return student_logits[:0].float().sum()
    teacher, student, w = teacher_logits.detach(), student_logits, weights.float()
    if keep.numel() < weights.numel():
        teacher, student, w = (x.index_select(0, keep) for x in (teacher, student, w))
    fn = partial(_chunk_sum, kind=kind, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    total = None
    for start in range(0, student.shape[0], chunk_size):
        args = tuple(x[start:start + chunk_size] for x in (teacher, student, w))
        part = checkpoint(fn, *args, use_reentrant=False) if student.requires_grad else fn(*args)
        total = part if total is None else total + part
    return total


def top1_agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Number of rows (0-dim int64) where teacher and student argmax agree; the caller divides."""
    return (teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum()
