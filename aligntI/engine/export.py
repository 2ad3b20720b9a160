"""Export to an HF model directory that ``from_pretrained`` loads: of the student at the end of training (ZeRO-3
safe), or of any complete checkpoint of a run afterwards (``aligntI export``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from aligntI.config import AttentionConfig, ConfigError
from aligntI.engine.checkpoints import consolidate_checkpoint, latest_complete_checkpoint

if TYPE_CHECKING:
    from aligntI.engine.student import StudentEngine


def export_hf(student: StudentEngine, out_dir: Path, processor, rank: int) -> None:
    """Write ``student``'s model and ``processor`` to ``out_dir``, replaced whole. All ranks call."""
    out_dir = Path(out_dir)
    engine = student.engine
    if student.ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # Gathers the partitioned weights onto rank 0 (the API accelerate uses for the same purpose).
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    torch.distributed.barrier()


def _some(names: list[str]) -> str:
    """How many names, and the first three."""
    return f"{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def export_checkpoint(run: Path, tag: str | None = None, out: Path | None = None) -> tuple[str, Path]:
    """Write checkpoint ``tag`` of run directory ``run`` (default: its newest complete one) as an HF model
    directory (default ``run/export_<tag>``), from the run's own ``config.yaml``; returns the tag and the directory."""
    from aligntI.models.loading import ModelDirError, load_model, load_processor  # transformers: only here

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run {run}: not a run directory (no config.yaml)")
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    tag = tag or latest_complete_checkpoint(run / "checkpoints")
    if tag is None or not (run / "checkpoints" / tag / "COMPLETE").is_file():
        raise ConfigError(f"--run {run}: no complete checkpoint {tag or ''} under {run / 'checkpoints'}")
    # The model the checkpoint was trained on: its own record, else (an older checkpoint) the run's newest start.
    trained = torch.load(run / "checkpoints" / tag / "trainer_state.pt", weights_only=False).get("recipe", resolved)
    model_path = trained["model"]["path"]
    model = load_model(model_path, AttentionConfig(), torch.float32)
    state = consolidate_checkpoint(run / "checkpoints", tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.get_text_config().tie_word_embeddings else set()
    missing = sorted(set(missing) - tied)
    if unexpected or missing:
        raise ModelDirError(f"--run {run}: checkpoint {tag} does not fit its model {model_path}: "
                            f"weights missing {_some(missing)}, unexpected {_some(sorted(unexpected))}")
    out = Path(out) if out else run / f"export_{tag}"
    model.save_pretrained(out)
    load_processor(model_path).save_pretrained(out)
    return tag, out
