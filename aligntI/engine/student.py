"""The student's training engine: DeepSpeed with an AdamW and an LR schedule, and its checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from aligntI.config import OptimConfig
from aligntI.engine.checkpoints import atomic_torch_save, mark_complete
from aligntI.engine.dist import accelerator_name
from aligntI.engine.export import export_hf


def _optimizer(groups: list[dict], optim: OptimConfig, ds_config: dict):
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if offload == "cpu" and accelerator_name() == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # optimizer state lives on the CPU

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=accelerator_name() == "cuda", **kwargs)


def universal_loading(ds_config: dict) -> dict:
    """``ds_config`` for an engine that loads a checkpoint of another world size (:meth:`StudentEngine.load_resharded`)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def convert_to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's converter, into a temporary folder renamed into place: an interrupted conversion leaves none."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(checkpoint), "--output_folder", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"converting {checkpoint} to DeepSpeed's universal format failed: {last}")
    (out.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; tags are always explicit
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


class StudentEngine:
    """The model being trained, wrapped in a DeepSpeed engine with an AdamW and an LR schedule."""

    def __init__(self, model, groups: list[dict], optim: OptimConfig, ds_config: dict, lr_lambda):
        import deepspeed

        optimizer = _optimizer(groups, optim, ds_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.ds_config = ds_config

    @property
    def module(self):
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(self, **inputs):
        return self.engine(**inputs)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    # -- checkpoints

    def save_checkpoint(self, root: Path, tag: str, extra_files: dict[str, object], rank: int) -> None:
        """All ranks call. Files land in ``root/tag``; ``root/latest`` moves only once all are complete."""
        root = Path(root)
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        for name, obj in extra_files.items():
            atomic_torch_save(obj, root / tag / name)
        torch.distributed.barrier()
        if rank == 0:
            mark_complete(root, tag)
        torch.distributed.barrier()

    def load_checkpoint(self, root: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root}/{tag}")

    def load_resharded(self, root: Path, tag: str, rank: int) -> None:
        """Load a ZeRO-3 checkpoint written on another number of ranks, through DeepSpeed's universal format.

        The engine must have been built with ``checkpoint.load_universal`` (:func:`universal_loading`). Rank 0
        converts ``root/tag`` once, into ``root/<tag>_universal`` (pruned with its checkpoint). DeepSpeed 0.19.8's
        ZeRO-3 universal load then gets three things wrong, put right here: every param group receives group
        0's settings (a weight decay of 0.0 everywhere), all sub-groups share one Adam ``step`` tensor (each
        optimizer step advances it once per sub-group, skewing the bias correction), and frozen parameters keep
        the values the model was built with.
        """
        import deepspeed
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root = Path(root)
        universal = f"{tag}_universal"
        if rank == 0 and not (root / universal / "zero" / "optimizer_state.pt").is_file():
            convert_to_universal(root / tag, root / universal)
        torch.distributed.barrier()
        self.engine.load_checkpoint(str(root), tag=universal, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        saved_groups = torch.load(root / universal / "zero" / "optimizer_state.pt", weights_only=False)["param_groups"]
        for group, saved in zip(self.optimizer.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for flat in self.optimizer.fp32_partitioned_groups_flat:
            state = self.optimizer.optimizer.state[flat]
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        frozen = [(name, p) for name, p in self.module.named_parameters() if not p.requires_grad]
        weights = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag) if rank == 0 and frozen else {}
        for name, p in frozen:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(weights[name].to(p.dtype))

    def export_hf(self, out_dir: Path, processor, rank: int) -> None:
        """See :func:`aligntI.engine.export.export_hf`. All ranks call."""
        export_hf(self, out_dir, processor, rank)
