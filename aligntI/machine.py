"""What the machine printing a plan lacks of what the recipe requests (``aligntI plan``, ``--dry-run``).

A plan is usually printed on a login node, the job runs on GPU compute nodes: this is information for the
user, never a reason to fail the plan. Nothing is imported or initialised beyond asking torch for the device.
"""

from __future__ import annotations

import importlib.util

from aligntI.config import RecipeConfig

# attention backend -> the package transformers imports for it
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def attention_keys(cfg: RecipeConfig) -> dict[str, str]:
    """Each attention setting of the recipe: ``{recipe key: backend}``."""
    sections = {"model": cfg.model, "teacher": cfg.teacher}
    return {f"{name}.attn_implementation.{part}": getattr(section.attn_implementation, part)
            for name, section in sections.items() if section is not None for part in ("text", "vision")}


def attention_lacks(cfg: RecipeConfig) -> list[str]:
    lacks = []
    for backend, package in FLASH_PACKAGES.items():
        keys = [key for key, value in attention_keys(cfg).items() if value == backend]
        if keys and importlib.util.find_spec(package) is None:  # find_spec: tells without importing it
            lacks.append(f"{backend} ({', '.join(keys)}): the {package} package is not installed")
    return lacks


def precision_lack(precision: str) -> str | None:
    """bf16 needs a CUDA device that supports it: ``bf16`` always, ``auto`` on any CUDA device."""
    if precision not in ("bf16", "auto"):
        return None
    import torch  # here: the CLI imports aligntI.plan for every command

    if not torch.cuda.is_available():  # auto then runs fp32
        return "bf16 (engine.precision: bf16): no CUDA device, so bf16 support cannot be checked" \
            if precision == "bf16" else None
    if not torch.cuda.is_bf16_supported():
        return (f"bf16 (engine.precision: {precision}): the CUDA device {torch.cuda.get_device_name()} does not "
                "support bf16")
    return None


def machine_lines(cfg: RecipeConfig) -> list[str]:
    """The plan's "this machine" section."""
    lacks = attention_lacks(cfg)
    precision = precision_lack(cfg.engine.precision)
    if precision is not None:
        lacks.append(precision)
    if not lacks:
        return ["This machine: lacks nothing the recipe requests (attention backends, precision)"]
    return ["This machine lacks or cannot check what the recipe requests; the job needs these on its compute "
            "nodes (a login node without a GPU usually lacks them):", *(f"  {lack}" for lack in lacks)]
