"""Load HF image-text-to-text models and processors, choose what trains, and build optimizer groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from aligntI.config import TRAINABLE_PARTS, AttentionConfig, OptimConfig


def load_processor(path: str | Path):
    return AutoProcessor.from_pretrained(str(path))


def load_model(path: str | Path, attn: AttentionConfig, dtype: torch.dtype = torch.float32):
    """``AutoModelForImageTextToText`` from a local directory, attention backend chosen per sub-model."""
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"no HF model directory at {path} (config.json missing)")
    return AutoModelForImageTextToText.from_pretrained(
        str(path),
        attn_implementation={"text_config": attn.text, "vision_config": attn.vision},
        dtype=dtype,
    )


def model_parts(model) -> dict[str, torch.nn.Module]:
    """The three LLaVA parts; the LM head trains with the LLM."""
    inner = model.model
    return {
        "vision_tower": inner.vision_tower,
        "projector": inner.multi_modal_projector,
        "llm": torch.nn.ModuleList([inner.language_model, model.lm_head]),
    }


def set_trainable(model, parts: list[str]) -> dict[str, int]:
    """Freeze everything but ``parts``; returns the trainable parameter count per part."""
    counts = {}
    for name, module in model_parts(model).items():
        train = name in parts
        for p in module.parameters():
            p.requires_grad_(train)
        counts[name] = sum(numel(p) for p in module.parameters()) if train else 0
    unknown = set(parts) - set(TRAINABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}")
    return counts


def shape(p: torch.nn.Parameter) -> torch.Size:
    """True shape, also of a ZeRO-3 partitioned parameter (whose ``.shape`` is ``(0,)`` outside forward)."""
    return getattr(p, "ds_shape", p.shape)


def numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())


def param_groups(model, optim: OptimConfig) -> list[dict]:
    """AdamW groups: no decay on biases and norms; the projector may have its own learning rate."""
    projector = {id(p) for p in model_parts(model)["projector"].parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in projector and optim.projector_lr is not None, len(shape(p)) >= 2)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_projector, decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": optim.projector_lr if is_projector else optim.lr,
            "weight_decay": optim.weight_decay if decay else 0.0,
            "name": ("projector" if is_projector else "model") + ("" if decay else "_no_decay"),
        })
    return out


def num_image_tokens(processor) -> int:
    """Visual tokens per image, measured by running the processor itself on a blank image."""
    size = processor.image_processor.size
    height = size.get("height") or size.get("shortest_edge")
    width = size.get("width") or height
    blank = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    ids = processor(text=processor.image_token, images=[blank], return_tensors="np")["input_ids"][0]
    return int((ids == processor.image_token_id).sum())
