"""Where the text decoder's attention modules are in a LLaVA model (bare, or the DeepSpeed engine's module)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder layers of a LLaVA model."""
    return model.model.language_model.layers


def text_attention_layers(model) -> dict[int, int]:
    """``id(attention module) -> decoder layer index`` for the text decoder of ``model``.

    The attention wrapper serves every model of the process, vision towers included, and transformers hands
    the forward's extra keywords to those too; this map is how a keyword meant for one model's text decoder
    finds exactly its modules.
    """
    return {id(layer.self_attn): i for i, layer in enumerate(decoder_layers(model))}


def relative_depth_layer(teacher_layer: int, teacher_layers: int, student_layers: int) -> int:
    """The student layer at the same relative depth (layer centres) as ``teacher_layer``."""
    return min(student_layers - 1, int((teacher_layer + 0.5) / teacher_layers * student_layers))


@contextlib.contextmanager
def project_rows(model, select: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block the model's LM head projects only the rows ``select()`` keeps (a bool over the rows
    ``logits_to_keep`` hands it), through a forward pre-hook on the head.

    ``select`` runs when the head does, after every decoder layer: a choice that depends on what a layer recorded
    in the same forward (IVA's vision rows, from the attention capture) needs no second pass.
    """
    def keep_selected(module, args):
        return (args[0][select()], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(keep_selected)
    try:
        yield
    finally:
        handle.remove()
