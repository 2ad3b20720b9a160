"""Export of the trained student to an HF model directory that ``from_pretrained`` loads (ZeRO-3 safe)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

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
