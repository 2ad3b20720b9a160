"""Cross-entropy on response rows, as a sum, so the caller can normalise over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def rows_ce_sum(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Σ cross-entropy over already-selected rows ``[N, V]`` whose ``targets`` [N] are not -100.

    fp32 in checkpointed chunks, like the KD divergences: backward holds one chunk's fp32 tensors, not N×V.
    """
    keep = (targets != -100).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return logits[:0].float().sum()  # graph-connected zero: every rank still runs backward
    logits, targets = logits.index_select(0, keep), targets.index_select(0, keep)
    total = None
    for start in range(0, logits.shape[0], chunk_size):
        args = (logits[start:start + chunk_size], targets[start:start + chunk_size])
        part = checkpoint(_ce_chunk, *args, use_reentrant=False) if logits.requires_grad else _ce_chunk(*args)
        total = part if total is None else total + part
    return total
