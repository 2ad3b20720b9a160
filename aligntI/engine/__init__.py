"""The DeepSpeed boundary: the only package of aligntI that imports deepspeed (always lazily).

* :func:`init_distributed` works under the ``deepspeed`` launcher, ``torchrun`` (also when SLURM
  launches it) and a bare ``python`` process (it fills the five variables DeepSpeed needs).
* :func:`build_ds_config` reads a JSON from ``ds_configs/`` and fills only the batch-size keys and the
  precision; everything else is the file's.
* :class:`StudentEngine` owns the training engine: backward/step, checkpoints written so an interrupted
  save never replaces the last good one, and a ZeRO-3-safe export to an HF model directory.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from aligntI.config import Batching, EngineConfig, OptimConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int | None = None) -> DistInfo:
    """Start (or join) the process group and pick this rank's device."""
    if "RANK" not in os.environ:  # bare `python`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if timeout_minutes is not None:
        os.environ.setdefault("DEEPSPEED_TIMEOUT", str(timeout_minutes))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    if accel.device_name() == "cuda":
        device = torch.device("cuda", local_rank)
    else:
        # Ranks on one machine share its cores; without this each would start one thread per core.
        # An explicit OMP_NUM_THREADS (e.g. jobs run side by side) is the user's split and wins.
        if "OMP_NUM_THREADS" not in os.environ:
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
        device = torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def use_bf16(engine_cfg: EngineConfig, device: str | None = None) -> bool:
    """``device``: the accelerator the run targets (``cuda``, ``cpu``); default: this machine's."""
    if engine_cfg.precision == "auto":
        return (device or accelerator_name()) == "cuda"
    return engine_cfg.precision == "bf16"


def build_ds_config(engine_cfg: EngineConfig, batching: Batching, device: str | None = None) -> dict:
    """The JSON file plus batch sizes and precision; nothing else is written by code.

    ``device`` is the accelerator the config is for (default: this machine's); a dry run on a CPU login
    node passes ``cuda`` to see the config of the GPU run.
    """
    ds = json.loads(Path(engine_cfg.ds_config).read_text())
    ds["train_micro_batch_size_per_gpu"] = batching.micro_batch_size
    ds["gradient_accumulation_steps"] = batching.gradient_accumulation_steps
    ds["train_batch_size"] = batching.global_batch_size
    ds["bf16"] = {"enabled": use_bf16(engine_cfg, device)}
    ds.setdefault("steps_per_print", 10**9)  # our own logger reports; silence DeepSpeed's
    return ds


@contextmanager
def sharded_loading(ds_config: dict):
    """Under ZeRO-3, ``from_pretrained`` inside this block builds the model already partitioned.

    ``HfDeepSpeedConfig`` is held through a global weakref, so the object must stay alive while loading.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(copy.deepcopy(ds_config))
    try:
        yield
    finally:
        del keep_alive


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
            _atomic_torch_save(obj, root / tag / name)
        torch.distributed.barrier()
        if rank == 0:
            (root / tag / "COMPLETE").write_text("ok\n")
            _atomic_write(root / "latest", tag + "\n")
        torch.distributed.barrier()

    def load_checkpoint(self, root: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root}/{tag}")

    # -- export

    def export_hf(self, out_dir: Path, processor, rank: int) -> None:
        """Write an HF model directory (model + processor) that ``from_pretrained`` loads. All ranks call."""
        out_dir = Path(out_dir)
        if self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            # Gathers the partitioned weights onto rank 0 (the API accelerate uses for the same purpose).
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if rank == 0 else None
        if rank == 0:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.engine.module.save_pretrained(tmp, state_dict=state)
            processor.save_pretrained(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
        torch.distributed.barrier()


def teacher_ds_config(student_ds_config: dict, offload_params: bool, device: str | None = None) -> dict:
    """What the teacher's engine takes from the student's DeepSpeed config. The one place this is decided:

    * same batch keys (DeepSpeed asserts a micro-batch size even without an optimizer) and precision;
    * no ``optimizer``/``scheduler`` (an optimizer over frozen parameters fails) and no optimizer offload;
    * ZeRO-3 when the student uses it, sharded like the student; ``offload_params`` (the recipe's
      ``teacher.offload_params``, which needs ZeRO-3) alone decides whether its parameters live in CPU memory;
    * otherwise stage 0, a whole replica per rank: ZeRO-1/2 only shard optimizer state and gradients, which a
      frozen teacher has none of.

    ``device``: the accelerator the config is for (pinned offload memory only on ``cuda``); default: this
    machine's.
    """
    cfg = copy.deepcopy(student_ds_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        cfg.pop(key, None)
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)  # the teacher's placement is its own switch, not the student's
        if offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": (device or accelerator_name()) == "cuda"}
    else:
        cfg["zero_optimization"] = {"stage": 0}
    return cfg


class TeacherEngine:
    """The frozen teacher: a DeepSpeed engine with no optimizer, in eval mode, called under ``no_grad``.

    Every rank must call it every step (ZeRO-3 gathers parameters collectively in forward).
    """

    def __init__(self, model, ds_config: dict):
        import deepspeed

        model.requires_grad_(False)
        model.eval()
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.engine.eval()

    @property
    def module(self):
        return self.engine.module

    def __call__(self, **inputs):
        with torch.no_grad():
            return self.engine(**inputs)


def inference_engine(model, bf16: bool) -> TeacherEngine:
    """``model`` partitioned over the ranks (ZeRO-3, no optimizer) for evaluating a model that one device cannot
    hold; every rank must then generate together (``synced_gpus``)."""
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": bf16}, "steps_per_print": 10**9,
           # Every parameter partitioned, small ones included: the memory is the point here.
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine = TeacherEngine(model, cfg)
    # nn.MultiheadAttention (SigLIP's pooling head) uses out_proj's weights without calling out_proj. The engine's
    # own forward discovers such parameters; generate() calls the module directly, so name them here.
    for module in engine.module.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            for param in module.out_proj.parameters():
                deepspeed.zero.register_external_parameter(module, param)
    return engine


@contextmanager
def gathered_parameters(module):
    """All of ``module``'s parameters whole on every rank inside the block (read-only); a no-op off ZeRO-3."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield params
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield params


def consolidate_checkpoint(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO checkpoint, gathered offline (no process group, any stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    torch.distributed.barrier()


def destroy() -> None:
    """End the process group through DeepSpeed, which also drops the groups it cached (a stale one would break
    the next run started in the same process)."""
    if torch.distributed.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
