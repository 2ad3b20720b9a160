"""Candidate sampling, weighting and row selection for the transition probability alignment (TPA) loss.

For each scored response row, ``draw_candidates`` picks d distinct next tokens from a source distribution
(Gumbel-top-k, i.e. sequential sampling without replacement); ``candidate_weights`` turns them into per-row
weights summing to 1 for ``weighted_divergence_sum``. ``BigramTable`` is the "gt_bigram" source.

The term, its candidate sources and what the paper leaves open: docs/method.md, section 7.
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("uniform", "student_prob")
# Finite so Gumbel noise still orders unseen tokens randomly, and far below log(count) >= 0 plus any noise.
UNSEEN_SCORE = -1e4


@torch.no_grad()
def draw_candidates(scores: torch.Tensor, ground_truth: torch.Tensor, d: int, *, exclude_gt: bool,
                    generator: torch.Generator, chunk_size: int = 1024,
                    never: tuple[int, ...] = ()) -> torch.Tensor:
    """``[N, d]`` distinct token ids per row, sampled without replacement ∝ softmax(scores row), in draw order.

    Tokens with a non-finite score, the ids in ``never`` (e.g. the image placeholder, an input-only token) and
    the ground truth when ``exclude_gt`` are never drawn. Noise is drawn
    chunk by chunk from ``generator``; on CPU the result does not depend on ``chunk_size`` (torch.rand
    consumes the stream serially), on CUDA (Philox offsets per call) it is only deterministic per chunk_size.
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = scores.shape[0]
    out = torch.empty(n, d, dtype=torch.long, device=scores.device)
    # u in [tiny, 1 - 2^-24] keeps -log(-log u) finite; CUDA's torch.rand does return 0 every ~2^24 draws.
    low, high = torch.finfo(torch.float32).tiny, 1.0 - 2.0**-24
    for start in range(0, n, chunk_size):
        chunk = scores[start:start + chunk_size].detach()
        drawable = torch.isfinite(chunk)
        drawable[:, list(never)] = False
        if exclude_gt:
            gt = ground_truth[start:start + chunk_size].to(chunk.device).unsqueeze(-1)
            drawable.scatter_(1, gt, False)
        short = (drawable.sum(-1) < d).nonzero()
        if short.numel():
            row = start + int(short[0, 0])
            raise ValueError(f"row {row} has fewer than d={d} drawable tokens (finite score, not excluded)")
        # Gumbel keys built in place, so the fp32 noise is the only [chunk, V] temporary.
        keys = torch.rand(chunk.shape, generator=generator, device=chunk.device, dtype=torch.float32)
        keys.clamp_(low, high).log_().neg_().log_().neg_().add_(chunk.float()).masked_fill_(~drawable, -torch.inf)
        out[start:start + chunk_size] = keys.topk(d, dim=-1).indices
    return out


@torch.no_grad()
def candidate_weights(student_logits: torch.Tensor, candidates: torch.Tensor, scheme: str) -> torch.Tensor:
    """fp32 ``[N, d]`` weights, each row summing to 1: uniform, or the student's p(candidate | prefix) renormalised."""
    if scheme not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {scheme!r}; expected one of {', '.join(WEIGHTINGS)}")
    if scheme == "uniform":
        return torch.full(candidates.shape, 1.0 / candidates.shape[-1], device=candidates.device)
    # The log-partition cancels in the renormalisation, so a softmax over the d gathered logits is exact.
    return torch.softmax(student_logits.detach().gather(-1, candidates).float(), dim=-1)


def scored_rows(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the positions whose logits predict a response token (the shifted label mask)."""
    rows = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


def select_rows(rows: torch.Tensor, max_per_sample: int | None, generator: torch.Generator) -> torch.Tensor:
    """Subset of the True entries of ``rows [B, L]``: at most ``max_per_sample`` per sample, uniformly at random."""
    if max_per_sample is not None and max_per_sample < 1:
        raise ValueError(f"max_per_sample must be >= 1 or None, got {max_per_sample}")
    if max_per_sample is None or max_per_sample >= rows.shape[-1]:
        return rows.clone()
    # The top-k of iid uniform keys over the True entries is a uniform subset; False entries rank below all.
    keys = torch.rand(rows.shape, generator=generator).to(rows.device).masked_fill_(~rows, -1.0)
    top = keys.topk(max_per_sample, dim=-1).indices
    return torch.zeros_like(rows).scatter_(-1, top, True) & rows


class BigramTable:
    """Sparse ground-truth bigram counts, p(next | previous): sorted unique keys ``prev * V + next`` with counts."""

    def __init__(self, keys: torch.Tensor, counts: torch.Tensor, vocab_size: int):
        self.keys, self.counts, self.vocab_size = keys, counts, int(vocab_size)

    @classmethod
    def from_pairs(cls, previous: torch.Tensor, following: torch.Tensor, vocab_size: int) -> BigramTable:
        """Count the pairs (previous[i] → following[i]); ids must lie in [0, vocab_size)."""
        previous, following = previous.reshape(-1).long(), following.reshape(-1).long()
        if previous.shape != following.shape:
            raise ValueError(f"previous and following differ in length: {previous.numel()} vs {following.numel()}")
        for name, ids in (("previous", previous), ("following", following)):
            if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"{name} ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
        keys, counts = torch.unique(previous * vocab_size + following, sorted=True, return_counts=True)
        return cls(keys, counts, vocab_size)

    @staticmethod
    def count_pairs(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token before a response token, the response token) for every t + 1 whose label is not -100."""
        scored = labels[:, 1:] != -100
        return input_ids[:, :-1][scored], input_ids[:, 1:][scored]

    def merge(self, other: BigramTable) -> BigramTable:
        """Table with the summed counts of both, e.g. to combine ranks or data shards."""
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"cannot merge tables over vocab sizes {self.vocab_size} and {other.vocab_size}")
        keys = torch.cat([self.keys, other.keys.to(self.keys.device)])
        counts = torch.cat([self.counts, other.counts.to(self.counts.device)])
        unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        return BigramTable(unique, torch.zeros_like(unique).index_add_(0, inverse, counts), self.vocab_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "counts": self.counts, "vocab_size": torch.tensor(self.vocab_size)}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> BigramTable:
        return cls(state["keys"], state["counts"], int(state["vocab_size"]))

    def __len__(self) -> int:
        return self.keys.numel()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def scores(self, previous: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """fp32 ``[N, V]``: log count(previous → v) for seen pairs, ``UNSEEN_SCORE`` elsewhere.

        The seen followers of each row are a contiguous run of the sorted keys; they are gathered for all rows
        at once on the table's device and scattered into the dense rows on ``device`` (default: previous's).
        """
        device = previous.device if device is None else device
        v = self.vocab_size
        out = torch.full((previous.numel(), v), UNSEEN_SCORE, dtype=torch.float32, device=device)
        prev = previous.reshape(-1).long().to(self.keys.device)
        lo = torch.searchsorted(self.keys, prev * v)
        lengths = torch.searchsorted(self.keys, (prev + 1) * v) - lo
        row = torch.repeat_interleave(torch.arange(prev.numel(), device=prev.device), lengths)
        # Position of each seen pair in the keys: the run start of its row plus its offset within the run.
        run_start = torch.repeat_interleave(lo - (lengths.cumsum(0) - lengths), lengths)
        pos = run_start + torch.arange(row.numel(), device=prev.device)
        col = self.keys[pos] - prev[row] * v
        out[row.to(device), col.to(device)] = self.counts[pos].float().log().to(device)
        return out
