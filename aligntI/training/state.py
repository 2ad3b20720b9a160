"""What a checkpoint holds beyond the engine's weights and optimizer: enough to resume exactly.

Rank 0 writes ``trainer_state.pt`` (the step and the batch layout); every rank writes ``rank{r}_state.pt``
(its RNG state and what its data workers skipped). The data order is fixed by (seed, epoch), so resuming
needs only the step; an exact resume also needs the same world size and global batch, which is checked.

What an exact resume needs and why: docs/engineering.md, section 6.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aligntI import engine
from aligntI.config import Batching, ConfigError

STOP_REQUEST = "stop_request"  # a file in run_dir: checkpoint after the current step and stop (slurm/*.sh)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@dataclass
class DataCounts:
    """Samples this rank's data workers skipped (bad, too long) or truncated, over the whole run."""

    skips: dict[str, int] = field(default_factory=lambda: {"bad": 0, "too_long": 0})
    truncated: int = 0

    def add(self, mb: dict, rank: int) -> None:
        for skip in mb["skips"]:
            self.skips[skip.kind] += 1
            if self.skips[skip.kind] <= 5:
                print(f"[rank {rank}] skipped ({skip.kind}): {skip.message}", flush=True)
        self.truncated += mb["truncated"]

    def report(self, dist: engine.DistInfo) -> str:
        """The totals over all ranks (every rank calls)."""
        total = engine.all_reduce_sum([self.skips["bad"], self.skips["too_long"], self.truncated], dist.device)
        return (f"data: {int(total[0])} bad samples skipped, {int(total[1])} too long skipped, "
                f"{int(total[2])} truncated (all ranks, whole run)")


def _layout(batching: Batching) -> dict:
    return {"world_size": batching.world_size, "global_batch_size": batching.global_batch_size}


def resume_point(ckpt_dir: Path, resume: str, batching: Batching) -> tuple[str | None, int]:
    """(tag, step) of the checkpoint to resume from, or (None, 0) for a fresh start."""
    tag = engine.latest_complete_checkpoint(ckpt_dir) if resume == "auto" else None
    if tag is None:
        return None, 0
    saved = torch.load(ckpt_dir / tag / "trainer_state.pt", weights_only=False)
    if saved["layout"] != _layout(batching):
        raise ConfigError(
            f"resume: {ckpt_dir / tag} was written with {saved['layout']}, this run has {_layout(batching)}; "
            "an exact resume needs the same world size and global batch (or set resume: never)"
        )
    return tag, saved["step"]


def restore(student, ckpt_dir: Path, tag: str, rank: int) -> DataCounts:
    """Load the student engine's checkpoint and this rank's RNG; returns its data counts."""
    student.load_checkpoint(ckpt_dir, tag)
    mine = torch.load(ckpt_dir / tag / f"rank{rank}_state.pt", weights_only=False)
    set_rng_state(mine["rng"])
    return DataCounts(mine["skips"], mine["truncated"])


def save(student, ckpt_dir: Path, step: int, counts: DataCounts, batching: Batching, rank: int,
         keep_last: int) -> Path:
    """A complete checkpoint of ``step`` (all ranks call); older ones beyond ``keep_last`` are pruned."""
    tag = f"step_{step:08d}"
    files = {f"rank{rank}_state.pt": {"rng": rng_state(), "skips": counts.skips, "truncated": counts.truncated}}
    if rank == 0:
        files["trainer_state.pt"] = {"step": step, "layout": _layout(batching)}
    student.save_checkpoint(ckpt_dir, tag, files, rank)
    if rank == 0:
        engine.prune_checkpoints(ckpt_dir, keep_last)
    return ckpt_dir / tag
