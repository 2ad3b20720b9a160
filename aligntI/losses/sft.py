"""Cross-entropy on response tokens, as a sum, so the caller can normalise over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def response_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions, and how many there are.

    ``logits`` [B, L, V] at position t predict token t+1; ``labels`` [B, L] are unshifted (-100 = no loss).
    Only labelled rows are gathered and upcast to fp32, so memory is O(response tokens × V).
    """
    target = labels[:, 1:]
    keep = target != -100
    rows = logits[:, :-1][keep].float()
    count = keep.sum()
    if rows.numel() == 0:
        return logits.sum() * 0.0, count  # keeps the graph connected so every rank runs backward
    return F.cross_entropy(rows, target[keep], reduction="sum"), count
