"""The checkpoint directory: which checkpoints are complete, pruning, offline consolidation, atomic writes.

Layout: ``root/<tag>/`` per checkpoint, ``root/<tag>/COMPLETE`` once every rank finished writing it, and
``root/latest`` naming the newest complete tag. Writers replace files atomically, so an interrupted save never
replaces the last good one.

How resume uses them: docs/engineering.md, section 6.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def mark_complete(root: Path, tag: str) -> None:
    """Rank 0, once every rank has written ``root/tag``: mark it finished and point ``root/latest`` at it."""
    (root / tag / "COMPLETE").write_text("ok\n")
    atomic_write(root / "latest", tag + "\n")


def latest_complete_checkpoint(root: Path) -> str | None:
    """The tag in ``root/latest`` if that checkpoint finished; else the newest finished one."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / "COMPLETE").is_file():
            return tag
    done = sorted(p.parent.name for p in root.glob("*/COMPLETE"))
    return done[-1] if done else None


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete the oldest finished checkpoints beyond ``keep_last`` and any unfinished leftovers."""
    root = Path(root)
    latest = latest_complete_checkpoint(root)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    done = [t for t in tags if (root / t / "COMPLETE").is_file()]
    for tag in done[:-keep_last]:
        if tag != latest:
            shutil.rmtree(root / tag, ignore_errors=True)
    for tag in tags:
        if tag not in done and latest is not None and tag < latest:
            shutil.rmtree(root / tag, ignore_errors=True)


def consolidate_checkpoint(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO checkpoint, gathered offline (no process group, any stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
