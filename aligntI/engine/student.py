"""The student's training engine: DeepSpeed with an AdamW and an LR schedule, and its checkpoints."""

from __future__ import annotations

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

    def export_hf(self, out_dir: Path, processor, rank: int) -> None:
        """See :func:`aligntI.engine.export.export_hf`. All ranks call."""
        export_hf(self, out_dir, processor, rank)
