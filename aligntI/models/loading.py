"""Load HF image-text-to-text models and processors, choose what trains, and build optimizer groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText, AutoProcessor

from aligntI.config import TRAINABLE_PARTS, AttentionConfig, OptimConfig


class ModelDirError(ValueError):
    """A model directory is missing or incomplete: the message names it and what is wrong."""


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a local HF model directory with a readable config.json (never a hub id: runs are offline)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: " + ("not a directory" if path.exists() else "no such model directory"))
    config = path / "config.json"
    if not config.is_file():
        raise ModelDirError(f"{path}: not an HF model directory (no config.json)")
    try:
        content = json.loads(config.read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ModelDirError(f"{config}: not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise ModelDirError(f"{config}: expected a JSON object, got {type(content).__name__}")
    return path


def load_processor(path: str | Path):
    """The directory's processor: a tokenizer and an image processor (what ``save_pretrained`` of a LLaVA
    processor writes next to config.json)."""
    path = check_model_dir(path)
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except Exception as err:  # the tokenizer's and image processor's parsers raise any type on a broken file
        raise ModelDirError(f"{path}: cannot load its processor: {_first_line(err)}") from err
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise ModelDirError(f"{path}: holds a {type(processor).__name__}, not a processor with a tokenizer and an "
                            "image processor (processor_config.json / preprocessor_config.json missing?)")
    return processor


def load_model(path: str | Path, attn: AttentionConfig, dtype: torch.dtype = torch.float32):
    """``AutoModelForImageTextToText`` from a local directory, attention backend chosen per sub-model."""
    path = check_model_dir(path)
    try:
        return AutoModelForImageTextToText.from_pretrained(
            str(path),
            attn_implementation={"text_config": attn.text, "vision_config": attn.vision},
            dtype=dtype,
        )
    # Missing or truncated weights, an unknown model type, an attention backend that is not installed.
    except (OSError, ValueError, KeyError, ImportError, SafetensorError) as err:
        raise ModelDirError(f"{path}: cannot load the model: {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def model_parts(model) -> dict[str, torch.nn.Module]:
    """The three LLaVA parts; the LM head trains with the LLM."""
    inner = model.model
    return {
        "vision_tower": inner.vision_tower,
        "projector": inner.multi_modal_projector,
        "llm": torch.nn.ModuleList([inner.language_model, model.lm_head]),
    }


def part_sizes(model) -> dict[str, int]:
    """Parameters per part (true counts, also of a ZeRO-3 partitioned model)."""
    return {name: sum(numel(p) for p in module.parameters()) for name, module in model_parts(model).items()}


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
