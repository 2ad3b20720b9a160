"""What a checkpoint holds beyond the engine's weights and optimizer: enough to resume exactly.

Rank 0 writes ``trainer_state.pt`` (the step, the run's length, the recipe it was trained under, the batch
layout and the parameter shapes); every rank writes ``rank{r}_state.pt`` (its RNG state and what its data
workers skipped). The data order is fixed by (seed, epoch), so resuming needs only the step. What a restart may
change is decided by :mod:`aligntI.training.resume`; another number of ranks is loaded through DeepSpeed's
universal format.

What an exact resume needs and why: docs/engineering.md, section 6.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aligntI import engine
from aligntI.config import Batching, ConfigError, zero_stage
from aligntI.models.loading import shape

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


@dataclass
class ResumePoint:
    """Where a start begins: a fresh run (``tag`` None, step 0) or a complete checkpoint and what it recorded."""

    tag: str | None = None
    step: int = 0
    saved: dict = field(default_factory=dict)  # trainer_state.pt

    @property
    def recipe(self) -> dict | None:
        """The recipe the checkpoint was trained under (:func:`aligntI.training.resume.comparable`); None for a
        checkpoint written before recipes were recorded."""
        return self.saved.get("recipe")


def resume_point(ckpt_dir: Path, resume: str) -> ResumePoint:
    """The checkpoint a start resumes from (``resume: auto``: the newest complete one), or a fresh start."""
    tag = engine.latest_complete_checkpoint(ckpt_dir) if resume == "auto" else None
    if tag is None:
        return ResumePoint()
    saved = torch.load(ckpt_dir / tag / "trainer_state.pt", weights_only=False)
    return ResumePoint(tag, saved["step"], saved)


def check_shapes(point: ResumePoint, model, model_path: str, checkpoint: Path) -> None:
    """A ConfigError naming both models when the checkpoint's parameters do not fit ``model``."""
    saved = point.saved.get("param_shapes")
    if saved is None:  # written before shapes were recorded: DeepSpeed's load is the check
        return
    here = param_shapes(model)
    missing, unexpected = sorted(set(saved) - set(here)), sorted(set(here) - set(saved))
    differ = [n for n in saved if n in here and saved[n] != here[n]]
    if not (missing or unexpected or differ):
        return
    was = (point.recipe or {}).get("model", {}).get("path", "?")
    first = (f"{differ[0]} is {saved[differ[0]]} there and {here[differ[0]]} here" if differ
             else f"{(missing or unexpected)[0]} is only {'there' if missing else 'here'}")
    raise ConfigError(
        f"resume: {checkpoint} holds a model trained from {was} that does not fit model.path {model_path}: "
        f"{first} ({len(differ)} parameters of other shapes, {len(missing)} missing here, {len(unexpected)} "
        "not in the checkpoint). Ways on: a new run_dir, or resume: never to start over"
    )


def resharded(point: ResumePoint, world_size: int, ds_config: dict) -> bool:
    """Whether the checkpoint was written on another number of ranks (then loaded in DeepSpeed's universal
    format: the engine's config needs ``engine.universal_loading``)."""
    if point.tag is None or point.saved["layout"]["world_size"] == world_size:
        return False
    if zero_stage(ds_config) != 3:
        raise ConfigError(f"resume: {point.tag} was written on {point.saved['layout']['world_size']} ranks and this "
                          f"run has {world_size}; another number of ranks is supported for ZeRO-3 checkpoints only")
    return True


def restore(student, ckpt_dir: Path, point: ResumePoint, model_path: str, dist: engine.DistInfo) -> DataCounts:
    """Load the student engine's checkpoint and this rank's RNG; returns its data counts.

    On another number of ranks the global batch is the same (the recipe check refuses another), so each step
    draws the same samples: the sampler interleaves every epoch's draws over the ranks. Rank ``r`` takes the old
    rank ``r``'s RNG where there was one, and rank 0 the skip counts of every old rank.
    """
    check_shapes(point, student.module, model_path, ckpt_dir / point.tag)
    old_world = point.saved["layout"]["world_size"]
    if old_world == dist.world_size:
        student.load_checkpoint(ckpt_dir, point.tag)
    else:
        student.load_resharded(ckpt_dir, point.tag, dist.rank)
    # This rank's own file; after a reshard, rank 0 also adds up every old rank's skip counts.
    ranks = range(old_world) if dist.rank == 0 and old_world != dist.world_size else [dist.rank]
    old = {r: torch.load(ckpt_dir / point.tag / f"rank{r}_state.pt", weights_only=False)
           for r in ranks if r < old_world}
    if dist.rank in old:
        set_rng_state(old[dist.rank]["rng"])
    counts = DataCounts()
    for saved in old.values():
        counts.skips = {k: counts.skips[k] + v for k, v in saved["skips"].items()}
        counts.truncated += saved["truncated"]
    return counts


def param_shapes(model) -> dict[str, list[int]]:
    """Every parameter's true shape (also under ZeRO-3), to tell a checkpoint's model from another."""
    return {name: list(shape(p)) for name, p in model.named_parameters()}


def save(student, ckpt_dir: Path, step: int, counts: DataCounts, batching: Batching, rank: int,
         keep_last: int, recipe: dict, total_steps: int) -> Path:
    """A complete checkpoint of ``step`` (all ranks call); older ones beyond ``keep_last`` are pruned.
    ``recipe``: what :mod:`aligntI.training.resume` compares on restart."""
    tag = f"step_{step:08d}"
    files = {f"rank{rank}_state.pt": {"rng": rng_state(), "skips": counts.skips, "truncated": counts.truncated}}
    if rank == 0:
        files["trainer_state.pt"] = {
            "step": step, "total_steps": total_steps, "recipe": recipe,
            "layout": {"world_size": batching.world_size, "global_batch_size": batching.global_batch_size},
            "param_shapes": param_shapes(student.module),
        }
    student.save_checkpoint(ckpt_dir, tag, files, rank)
    if rank == 0:
        engine.prune_checkpoints(ckpt_dir, keep_last)
    return ckpt_dir / tag
