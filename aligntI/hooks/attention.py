"""Instruction→vision attention probabilities of chosen decoder layers, captured through transformers'
attention interface.

:func:`install` overrides the built-in backends (``sdpa``, ``eager``, ``flash_attention_2/3``) once, process-wide,
with a wrapper that always calls the original function unchanged (TPA's candidate pass aside: its keywords are
handled by hooks/transitions.py). Only attention modules registered by an
active :class:`AttentionCapture` do extra work: they recompute the instruction-query rows of Q·Kᵀ over **all**
keys, softcap them when the model does (as its kernel does: after scaling, before the mask), apply the causal,
padding and sliding-window mask, take the softmax over the whole row and keep only the vision columns. Every
other layer and model runs its fast kernel untouched; nothing sets ``output_attentions``.

Stored per captured layer: ``[B, H, I, V]`` fp32 (I, V = the batch's longest instruction / vision span). The
transient score block is ``[B, H, I, L]`` fp32 for that one layer only (plus an fp32 view of its K, not
repeated over GQA groups).

Why it is built this way: docs/engineering.md, section 1 (and section 2 for activation checkpointing).
"""

from __future__ import annotations

import math
import sys
from functools import partial

import torch
from transformers import AttentionInterface

from aligntI.hooks.modules import decoder_layers
from aligntI.hooks.transitions import candidate_kernel

WRAPPED_BACKENDS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
_originals: dict[str, object] = {}
_active: dict[int, AttentionCapture] = {}  # id(attention module) -> the capture it reports to


def install() -> None:
    """Wrap the built-in backends once (idempotent). Must run before a model is loaded or wrapped by DeepSpeed."""
    for backend in WRAPPED_BACKENDS:
        if backend not in _originals:
            # "eager" is not in the registry: each modeling file passes its own function as the default.
            _originals[backend] = AttentionInterface._global_mapping.get(backend)
            AttentionInterface.register(backend, partial(_attention, backend))


def _model_eager(module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: its modeling file has no eager_attention_forward to wrap")
    return fn


def _attention(backend, module, query, key, value, attention_mask, prefix_cache=None, candidates=None, joint=None,
               **kwargs):
    # prefix_cache / candidates / joint: TPA's ground-truth, candidate and joint passes (hooks/transitions.py).
    # transformers hands them to every attention module of the model, the vision tower's included: only the
    # text decoder of the model that owns the record uses them.
    original = _originals[backend] or _model_eager(module)
    if candidates is not None and prefix_cache is None:
        raise RuntimeError("TPA candidate pass: candidates= needs the prefix_cache= of the ground-truth forward")
    layer = prefix_cache.layer_of(module) if prefix_cache is not None else None
    if candidates is not None and layer is not None:  # reads the prefix its ground-truth pass recorded
        kernel = candidate_kernel(backend, original, partial(_model_eager, module), kwargs.get("softcap"))
        return candidates.attend(kernel, prefix_cache, layer, module, query, key, value, **kwargs)
    if joint is not None and joint.layer_of(module) is not None:
        kernel = candidate_kernel(backend, original, partial(_model_eager, module), kwargs.get("softcap"))
        return joint.attend(partial(_ground_truth, original, None, None), kernel, module, query, key, value,
                            attention_mask, **kwargs)
    return _ground_truth(original, prefix_cache, layer, module, query, key, value, attention_mask, **kwargs)


def _ground_truth(original, prefix_cache, layer, module, query, key, value, attention_mask, **kwargs):
    """The backend's own kernel, after the capture and the prefix record take what they need."""
    capture = _active.get(id(module))
    if capture is not None:
        capture._record(module, query, key, kwargs)
    if layer is not None:
        prefix_cache.record(layer, key, value)
    return original(module, query, key, value, attention_mask, **kwargs)


def padded_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` bool → (indices ``[B, N]`` of the True columns, left-aligned and padded with 0; valid ``[B, N]``)."""
    counts = mask.sum(-1)
    width = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


class AttentionCapture:
    """Context manager: while active, the chosen layers of ``model`` report instruction→vision probabilities.

    ``instruction_mask``, ``vision_mask`` and ``attention_mask`` are the batch's ``[B, L]`` masks for the forward
    run inside the block. With activation checkpointing the attention function runs again during backward; the
    first forward's result is kept (run backward inside the block so the recompute matches the forward).
    """

    def __init__(self, model, layers: list[int], instruction_mask: torch.Tensor, vision_mask: torch.Tensor,
                 attention_mask: torch.Tensor):
        all_layers = decoder_layers(model)
        bad = [i for i in layers if not 0 <= i < len(all_layers)]
        if bad:
            raise ValueError(f"attention capture: layers {bad} out of range; the model has {len(all_layers)}")
        backend = model.config.get_text_config()._attn_implementation
        if backend not in WRAPPED_BACKENDS:
            raise ValueError(f"attention capture: text attention backend {backend!r} is not one of "
                             f"{list(WRAPPED_BACKENDS)}")
        self.modules = {i: all_layers[i].self_attn for i in layers}
        self._layer_of = {id(module): i for i, module in self.modules.items()}
        self.inst_idx, self.inst_valid = padded_positions(instruction_mask.bool())
        self.vis_idx, self.vis_valid = padded_positions(vision_mask.bool())
        self.key_valid = attention_mask.bool()
        self.probs: dict[int, torch.Tensor] = {}

    def __enter__(self) -> AttentionCapture:
        install()
        for module in self.modules.values():
            if id(module) in _active:
                raise RuntimeError("attention capture: this layer is already captured by another active capture")
            _active[id(module)] = self
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules.values():
            _active.pop(id(module), None)

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.probs:
            raise RuntimeError(f"attention capture: layer {layer} recorded nothing; was the forward run inside "
                               "the capture block, with a wrapped backend and no KV cache?")
        return self.probs[layer]

    def _record(self, module, query, key, kwargs: dict) -> None:
        if kwargs.get("s_aux") is not None:  # attention sinks take softmax mass the row cannot show
            raise RuntimeError(f"attention capture: {type(module).__name__} uses attention sinks, which the "
                               "capture does not model")
        scaling, sliding_window, softcap = kwargs.get("scaling"), kwargs.get("sliding_window"), kwargs.get("softcap")
        batch, heads, length, dim = query.shape
        if key.shape[2] != length:
            raise RuntimeError("attention capture needs a full forward (query and key lengths differ: KV cache?)")
        device = query.device
        inst_idx, inst_valid = self.inst_idx.to(device), self.inst_valid.to(device)
        vis_idx, vis_valid = self.vis_idx.to(device), self.vis_valid.to(device)
        n_inst, n_vis = inst_idx.shape[1], vis_idx.shape[1]

        q = query.gather(2, inst_idx[:, None, :, None].expand(batch, heads, n_inst, dim)).float()
        # GQA without repeating K: query head h uses KV head h // groups, so group the query heads per KV head.
        kv_heads = key.shape[1]
        q = q.reshape(batch, kv_heads, heads // kv_heads * n_inst, dim)
        scores = (q @ key.float().transpose(-1, -2)).view(batch, heads, n_inst, length)
        scores = scores * (scaling if scaling is not None else 1 / math.sqrt(dim))
        if softcap is not None:  # Gemma-2 style: softcap·tanh(s / softcap), before the mask
            scores = torch.tanh(scores / softcap) * softcap
        keys = torch.arange(length, device=device)
        allowed = (keys[None, None, :] <= inst_idx[:, :, None]) & self.key_valid.to(device)[:, None, :]
        if sliding_window is not None:
            allowed &= inst_idx[:, :, None] - keys[None, None, :] < sliding_window
        allowed |= ~inst_valid[:, :, None]  # padded query rows: any finite row, zeroed below
        probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        probs = probs.gather(-1, vis_idx[:, None, None, :].expand(batch, heads, n_inst, n_vis))
        valid = inst_valid[:, None, :, None] & vis_valid[:, None, None, :]
        # An activation-checkpoint recompute must redo the same ops (torch checks it) but keeps the forward's result.
        self.probs.setdefault(self._layer_of[id(module)], probs * valid)
