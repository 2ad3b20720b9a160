"""The DeepSpeed configs: the student's from a JSON in ``ds_configs/``, the teacher's derived from it.

Code writes only the batch-size keys and the precision into the student's; everything else is the file's.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

from aligntI.config import Batching, EngineConfig, zero_stage
from aligntI.engine.dist import accelerator_name


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


def teacher_placement(student_ds_config: dict, placement: str) -> str:
    """The recipe's ``teacher.placement`` with ``auto`` resolved: sharded beside a ZeRO-3 student, else replicated."""
    if placement != "auto":
        return placement
    return "sharded" if zero_stage(student_ds_config) == 3 else "replicated"


def teacher_ds_config(student_ds_config: dict, placement: str, device: str | None = None) -> dict:
    """What the teacher's engine takes from the student's DeepSpeed config. The one place this is decided:

    * same batch keys (DeepSpeed asserts a micro-batch size even without an optimizer) and precision;
    * no ``optimizer``/``scheduler`` (an optimizer over frozen parameters fails), no optimizer offload and no
      ``checkpoint`` loading options (the teacher loads no checkpoint);
    * ``placement`` (the recipe's ``teacher.placement``, see :func:`teacher_placement`): ``sharded`` is ZeRO-3,
      with the student's ZeRO-3 settings when it has them; ``offload`` adds parameter offload to CPU memory;
      ``replicated`` is stage 0, a whole replica per rank (ZeRO-1/2 only shard optimizer state and gradients,
      which a frozen teacher has none of).

    ``device``: the accelerator the config is for (pinned offload memory only on ``cuda``); default: this
    machine's.
    """
    cfg = copy.deepcopy(student_ds_config)
    for key in ("optimizer", "scheduler", "gradient_clipping", "checkpoint"):
        cfg.pop(key, None)
    placement = teacher_placement(student_ds_config, placement)
    if placement == "replicated":
        cfg["zero_optimization"] = {"stage": 0}
        return cfg
    zero = cfg["zero_optimization"] if zero_stage(cfg) == 3 else {"stage": 3}
    zero.pop("offload_optimizer", None)
    zero.pop("offload_param", None)  # the teacher's placement is its own switch, not the student's
    if placement == "offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": (device or accelerator_name()) == "cuda"}
    cfg["zero_optimization"] = zero
    return cfg


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
