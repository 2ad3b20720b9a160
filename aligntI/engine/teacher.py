"""Engines that only run forward: the frozen teacher, a ZeRO-3 model for evaluation, parameter gathering.

ZeRO-3 rules these engines follow (equal module calls on every rank): docs/engineering.md, section 4.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


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
