"""Instruction-aware Vision Alignment pieces: the instruction-to-vision focus α, the IVA
weights built from it, and the KL between two foci for ``iva.mode: attention``.

Masks are bool; padded entries of the inputs may hold anything and are never read into a result.

The term, its modes and which samples count: docs/method.md, section 6.
"""

from __future__ import annotations

import torch

WEIGHT_SCHEMES = ("teacher_attention", "uniform")
_LOG_EPS = 1e-12  # floor for the student's focus inside the log: zero mass gives a large finite KL, not inf


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """x / row-sum over the last dim; rows summing to 0 stay 0 (safe denominator keeps gradients finite)."""
    total = x.sum(-1, keepdim=True)
    return x / torch.where(total > 0, total, torch.ones_like(total))


QUERY_ROWS = ("instruction", "answer_start", "both")


def focus_queries(instruction_mask: torch.Tensor, labels: torch.Tensor, rows: str = "instruction") -> torch.Tensor:
    """``[B, L]`` bool: the query positions whose attention to the image makes the focus α.

    ``instruction``: the user's question tokens. ``answer_start``: each response's prompt-end position, the one
    whose logits predict the response's first token (label t+1 set, label t not). ``both``: the union.
    """
    if rows not in QUERY_ROWS:
        raise ValueError(f"unknown focus query rows {rows!r}; expected one of {', '.join(QUERY_ROWS)}")
    if rows == "instruction":
        return instruction_mask.bool()
    answered = labels != -100
    answer_start = torch.zeros_like(answered)
    answer_start[:, :-1] = answered[:, 1:] & ~answered[:, :-1]
    return answer_start if rows == "answer_start" else answer_start | instruction_mask.bool()


def instruction_to_vision_focus(probs: torch.Tensor, inst_valid: torch.Tensor,
                                 vis_valid: torch.Tensor) -> torch.Tensor:
    """The paper's α ``[B, V]``: attention from instruction queries to vision keys of one layer.

    ``probs`` [B, H, I, V] are probabilities normalised over the whole key row. Mean over heads and valid
    instruction positions, zero on invalid vision columns, renormalised to sum 1 over the valid ones.
    Rows with no valid instruction or vision position are all zeros. Differentiable.
    """
    mask = inst_valid[:, None, :, None] & vis_valid[:, None, None, :]
    # where, not multiply: padding may hold inf/NaN, and 0·NaN would leak into the result.
    summed = torch.where(mask, probs.float(), 0.0).sum(dim=(1, 2))
    n_queries = probs.shape[1] * inst_valid.sum(-1, keepdim=True).clamp_min(1)
    return _normalise_rows(summed / n_queries)


def _top_k_mask(w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the k[b] largest entries of each row of w (ties: lower index first)."""
    order = w.argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    return rank < k[:, None]


def iva_weights(focus: torch.Tensor | None, vis_valid: torch.Tensor, scheme: str = "teacher_attention",
                top_ratio: float = 1.0) -> torch.Tensor:
    """Per-vision-position IVA weights ``[B, V]`` (no grad), each non-empty row summing to 1.

    ``teacher_attention``: the teacher's focus, optionally sparsified to its ceil(top_ratio·n_valid) largest
    entries and renormalised. ``uniform``: 1/n_valid on valid positions (LLaVA-KD-style baseline).
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown IVA weight scheme {scheme!r}; expected one of {', '.join(WEIGHT_SCHEMES)}")
    if not 0.0 < top_ratio <= 1.0:
        raise ValueError(f"top_ratio must be in (0, 1], got {top_ratio}")
    if scheme == "uniform":
        if top_ratio < 1.0:
            raise ValueError("top_ratio < 1 has no effect with uniform weights; use teacher_attention")
        return _normalise_rows(vis_valid.float())
    if focus is None:
        raise ValueError("teacher_attention weights need the teacher's focus")
    w = torch.where(vis_valid, focus.detach().float(), 0.0)
    if top_ratio < 1.0:
        n_valid = vis_valid.sum(-1)
        # Round ρ·n first so float error (0.1·30 = 3.0000000000000004) does not bump the ceiling by one.
        k = torch.ceil(torch.round(n_valid.double() * top_ratio, decimals=6)).long()
        k = torch.where(n_valid > 0, k.clamp(min=1), 0)
        w = torch.where(_top_k_mask(w, k), w, 0.0)
    return _normalise_rows(w)


def attention_kl_sum(teacher_focus: torch.Tensor, student_focus: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """Σ over selected rows of KL(teacher_focus ‖ student_focus) over V, 0-dim fp32 (``iva.mode: attention``).

    The teacher is detached; 0·log0 counts as 0 and the student side is floored at a tiny eps inside the log.
    """
    if not bool(rows.any()):
        return student_focus[:0].float().sum()  # graph-connected zero so every rank runs backward
    t = teacher_focus[rows].detach().float()
    s = student_focus[rows].float()
    return (torch.xlogy(t, t) - t * s.clamp_min(_LOG_EPS).log()).sum()


ROW_CHOICES = ("sampled", "top_k")


def budget_weights(weights: torch.Tensor, k: int, choice: str = "sampled",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """IVA weights ``[B, V]`` moved onto at most ``k`` vision rows per sample, so only those need logits.

    ``sampled``: k draws per sample, with replacement, in proportion to ``weights``; a row drawn c times weighs
    c/k. Its expectation is ``weights`` itself, so the loss is an unbiased estimate of the all-row loss.
    ``top_k``: the k largest weights, renormalised (lower variance, but a different objective).
    Rows of ``weights`` that sum to 0 (samples IVA does not score) stay 0.
    """
    if choice not in ROW_CHOICES:
        raise ValueError(f"unknown IVA row choice {choice!r}; expected one of {', '.join(ROW_CHOICES)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scored = weights.sum(-1) > 0
    if choice == "top_k":
        top = _top_k_mask(weights, torch.full_like(scored, k, dtype=torch.long))
        return _normalise_rows(torch.where(top, weights, 0.0))
    out = torch.zeros_like(weights)
    if bool(scored.any()):
        drawn = torch.multinomial(weights[scored], k, replacement=True, generator=generator)
        counts = torch.zeros_like(weights[scored]).scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=weights.dtype))
        out[scored] = counts / k
    return out
