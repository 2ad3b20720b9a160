"""The starting LLaVA model of the paper, assembled from pretrained parts (``aligntI assemble``).

LLaVA-1.5 style: a pretrained vision tower (SigLIP or CLIP, used frozen by the recipes) + a 2-layer GELU MLP
projector (random, seeded) + a pretrained causal LM (Qwen2.5 / Qwen3 in the paper). The parts come from ordinary
HF checkpoint directories; the result is an HF directory (model + ``LlavaProcessor``) that
``AutoModelForImageTextToText`` / ``AutoProcessor`` load like any hub checkpoint.

The model is laid out on the meta device and the pretrained tensors are adopted as they are (no random
initialisation of billions of weights that are overwritten anyway, no second copy in memory); only the projector
is materialised and initialised, with ``seed``.
"""

from __future__ import annotations

import json
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from aligntI.data.formatting import IMAGE_PLACEHOLDER, load_chat_template
from aligntI.models.builder import llava_processor, select_strategy

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PROBE_TEXT = "hello world"  # any LLM's tokenizer encodes it to known tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


class AssembleError(ValueError):
    """A part cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class VisionFamily:
    name: str
    key: str  # models.builder's family name: decides feature selection and the processor's token count
    model_cls: type
    feature_layer: int  # index into the tower's hidden_states (0 = embeddings)


SIGLIP = VisionFamily("SigLIP", "siglip", SiglipVisionModel, -1)
CLIP = VisionFamily("CLIP", "clip", CLIPVisionModel, -2)  # LLaVA-1.5: penultimate layer, CLS dropped
VISION_FAMILIES = {"siglip": SIGLIP, "siglip_vision_model": SIGLIP, "clip": CLIP, "clip_vision_model": CLIP}


def read_config(path: Path, flag: str, expected: str) -> dict:
    cfg = path / "config.json"
    if not path.is_dir():
        raise AssembleError(f"{flag} {path}: no such directory (expected {expected})")
    if not cfg.is_file():
        raise AssembleError(f"{cfg}: missing; {flag} must be an HF checkpoint directory ({expected})")
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise AssembleError(f"{cfg}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise AssembleError(f"{cfg}: no model_type ({flag} must be {expected})")
    return config


@contextmanager
def _quiet_transformers():
    """Hide transformers' loading report (a SigLIP/CLIP checkpoint's text tower is 'unexpected' by design);
    what matters in it is checked by :func:`_check_loading`."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_loading(path: Path, info: dict, unused_ok: bool) -> None:
    """``unused_ok``: checkpoint weights the model has no place for are expected (a full SigLIP/CLIP checkpoint's
    text tower); for an LLM they mean config.json describes another architecture."""
    problems = []
    mismatched = sorted(info["mismatched_keys"], key=lambda m: m[0])  # (name, checkpoint shape, config shape)
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {tuple(a)} vs config {tuple(b)}" for k, a, b in mismatched[:4])
        problems.append(f"{len(mismatched)} weights do not have the shapes config.json declares "
                        f"(is the config from another model size?): {shown}")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        problems.append(f"{len(missing)} weights of the model config.json describes are missing from the checkpoint, "
                        f"e.g. {missing[:4]}")
    if info["unexpected_keys"] and not unused_ok:
        unused = sorted(info["unexpected_keys"])
        problems.append(f"{len(unused)} weights of the checkpoint have no place in the model config.json describes "
                        f"(is the config from another architecture?), e.g. {unused[:4]}")
    if info.get("error_msgs"):
        problems.append("; ".join(info["error_msgs"]))
    if problems:
        raise AssembleError(f"{path}: " + " / ".join(problems))


def _from_pretrained(cls, path: Path, dtype: torch.dtype, unused_ok: bool):
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(path), dtype=dtype, output_loading_info=True,
                                              ignore_mismatched_sizes=True)
    except (SafetensorError, pickle.UnpicklingError) as err:
        # the library's text does not name the file (and for pickle suggests loading it unsafely)
        raise AssembleError(f"{path}: a weights file is truncated or corrupt ({type(err).__name__}); "
                            f"download it again") from err
    except (OSError, ValueError, RuntimeError) as err:
        raise AssembleError(f"{path}: cannot load the weights as {cls.__name__}: {err}") from err
    _check_loading(path, info, unused_ok)
    return model


def load_vision(path: str | Path, dtype: torch.dtype):
    """The vision tower (a full ``SiglipModel``/``CLIPModel`` checkpoint or its vision half) and its image
    processor (PIL backend); returns ``(tower, image_processor, family)``."""
    path = Path(path)
    expected = "a SigLIP or CLIP checkpoint: model_type " + ", ".join(VISION_FAMILIES)
    model_type = read_config(path, "--vision", expected)["model_type"]
    family = VISION_FAMILIES.get(model_type)
    if family is None:
        raise AssembleError(f"{path / 'config.json'}: model_type {model_type!r} is not supported for --vision "
                            f"(expected {expected.split(': ', 1)[1]})")
    tower = _from_pretrained(family.model_cls, path, dtype, unused_ok=True)  # a full checkpoint: its vision half
    pre = path / "preprocessor_config.json"
    if not pre.is_file():
        raise AssembleError(f"{pre}: missing; the vision checkpoint must come with the image processor it was "
                            f"trained with (copy preprocessor_config.json from the hub repository)")
    try:
        # backend="pil": the same preprocessing with or without torchvision, and the saved processor reloads as it
        image_processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AssembleError(f"{pre}: cannot build an image processor from it: {err}") from err
    return tower, image_processor, family


def load_llm(path: str | Path, dtype: torch.dtype):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` of one directory; the tokenizer first, as it is cheap."""
    path = Path(path)
    model_type = read_config(path, "--llm", "a causal LM such as Qwen2.5 or Qwen3")["model_type"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise AssembleError(f"{path / 'config.json'}: model_type {model_type!r} is not a causal language model "
                            f"(--llm expects e.g. qwen2 or qwen3)")
    tokenizer = load_tokenizer(path)
    llm = _from_pretrained(AutoModelForCausalLM, path, dtype, unused_ok=False)
    return llm, tokenizer


def load_tokenizer(path: Path):
    """The LLM's tokenizer, refused unless it encodes plain text to known tokens: without tokenizer files
    ``AutoTokenizer`` returns an empty tokenizer of the model's class instead of raising."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # the tokenizers library raises a plain Exception for a tokenizer.json it cannot read
        raise AssembleError(f"{path}: cannot load its tokenizer (tokenizer.json / tokenizer_config.json): {err}") from err
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    if any(i != tokenizer.unk_token_id for i in ids):
        return tokenizer
    present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    source = f"read from {', '.join(present)}" if present else f"none of {', '.join(TOKENIZER_FILES)} is there"
    got = f"only the unknown token {tokenizer.unk_token!r}" if ids else "no ids"
    raise AssembleError(f"{path}: no usable tokenizer ({source}): it encodes {PROBE_TEXT!r} to {got}; --llm must "
                        f"hold the LLM's own tokenizer files, as its hub repository has them")


def add_image_token(tokenizer, llm) -> tuple[int, bool]:
    """Register ``<image>`` as a special token and make sure its id has an embedding row.

    Returns ``(image_token_id, resized)``. Real Qwen checkpoints pad their vocabularies, so the new id usually
    fits; otherwise the embeddings grow to the tokenizer's length and the new rows start at the mean embedding.
    """
    if IMAGE_PLACEHOLDER not in tokenizer.get_added_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]},
                                     replace_extra_special_tokens=False)
    ids = tokenizer.encode(f"a {IMAGE_PLACEHOLDER}\nb", add_special_tokens=False)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if ids.count(image_id) != 1:
        raise AssembleError(f"the tokenizer does not keep {IMAGE_PLACEHOLDER} as one token (got {ids})")
    rows = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return image_id, False
    with torch.no_grad():
        means = [e.weight[:rows].float().mean(0) for e in _embedding_matrices(llm)]
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        for e, mean in zip(_embedding_matrices(llm), means):
            e.weight[rows:] = mean.to(e.weight.dtype)
    return image_id, True


def _embedding_matrices(llm) -> list[torch.nn.Module]:
    inp, out = llm.get_input_embeddings(), llm.get_output_embeddings()
    return [inp] if out is None or out.weight is inp.weight else [inp, out]


def _adopt(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Give a meta-device ``target`` the tensors of ``source`` (same architecture): parameters and persistent
    buffers through a strict ``load_state_dict``, non-persistent buffers (rotary frequencies, position ids)
    by name."""
    target.load_state_dict(source.state_dict(), strict=True, assign=True)
    for name, buf in source.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = target.get_submodule(owner)
        if module._buffers.get(leaf) is not None and module._buffers[leaf].is_meta:
            module._buffers[leaf] = buf


def build_llava(tower, family: VisionFamily, llm, image_token_id: int, image_seq_length: int, seed: int,
                dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """A LLaVA model holding ``tower`` and ``llm`` themselves, with a fresh projector seeded by ``seed``."""
    text_config = llm.config
    config = LlavaConfig(
        vision_config=tower.config, text_config=text_config, image_token_id=image_token_id,
        image_seq_length=image_seq_length, vision_feature_layer=family.feature_layer,
        vision_feature_select_strategy=select_strategy(family.key), projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    inner = model.model
    if type(inner.language_model) is not type(llm.base_model):
        raise AssembleError(f"LLaVA builds a {type(inner.language_model).__name__} from the LLM's config but the "
                            f"checkpoint's base model is a {type(llm.base_model).__name__}")
    _adopt(inner.vision_tower, tower)
    _adopt(inner.language_model, llm.base_model)
    if config.tie_word_embeddings:
        model.tie_weights()
    else:
        _adopt(model.lm_head, llm.get_output_embeddings())
    # The projector: initialised in fp32 (the model's own init: normal(0, initializer_range), zero biases) from
    # ``seed``, so every dtype gets the same weights up to rounding.
    projector = inner.multi_modal_projector.to_empty(device="cpu")
    projector.float()
    torch.manual_seed(seed)
    projector.apply(model._init_weights)
    projector.to(dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise AssertionError(f"tensors left without values: {left[:5]}")
    if config.tie_word_embeddings and model.lm_head.weight is not inner.language_model.embed_tokens.weight:
        raise AssertionError("lm_head is not tied to the input embeddings although the LLM ties them")
    return model


def check_processor(processor, vision_config, vision_dir: Path) -> int:
    """Run the processor on an odd-sized blank image: the pixels must have the tower's input size and the
    image must expand to as many tokens as the tower yields features. Returns the tokens per image."""
    if processor.image_token != IMAGE_PLACEHOLDER:
        raise AssembleError(f"the tokenizer names {processor.image_token!r} as its image token; LLaVA-format data "
                            f"writes {IMAGE_PLACEHOLDER}")
    blank = Image.fromarray(np.zeros((37, 53, 3), dtype=np.uint8))
    out = processor(text=IMAGE_PLACEHOLDER, images=[blank], return_tensors="np")
    side = vision_config.image_size
    got = tuple(out["pixel_values"].shape[-2:])
    if got != (side, side):
        raise AssembleError(f"{vision_dir / 'preprocessor_config.json'}: makes {got[0]}x{got[1]} pixel inputs but "
                            f"the vision tower of {vision_dir / 'config.json'} takes {side}x{side}")
    tokens = int((out["input_ids"][0] == processor.image_token_id).sum())
    expected = (side // vision_config.patch_size) ** 2
    if tokens != expected:
        raise AssertionError(f"the processor expands an image to {tokens} tokens, the tower yields {expected}")
    return tokens


def count(module: torch.nn.Module | list[torch.nn.Module]) -> int:
    modules = module if isinstance(module, list) else [module]
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


def assemble(vision_dir: str | Path, llm_dir: str | Path, out_dir: str | Path, chat_template: str = "llava_v1",
             dtype: str = "bfloat16", seed: int = 0) -> dict:
    """Write the LLaVA model of ``vision_dir`` + a seeded projector + ``llm_dir`` to ``out_dir``; returns a
    summary (parameter counts per part, image tokens per image, whether the embeddings were resized)."""
    if dtype not in DTYPES:
        raise AssembleError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    vision_dir, llm_dir, out_dir = Path(vision_dir), Path(llm_dir), Path(out_dir)
    load_chat_template(chat_template)  # fail before loading gigabytes
    tower, image_processor, family = load_vision(vision_dir, torch_dtype)
    llm, tokenizer = load_llm(llm_dir, torch_dtype)
    image_token_id, resized = add_image_token(tokenizer, llm)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = llava_processor(image_processor, tokenizer, tower.config.patch_size, family.key, chat_template)
    tokens = check_processor(processor, tower.config, vision_dir)
    if processor.image_token_id != image_token_id:
        raise AssertionError(f"processor image token id {processor.image_token_id} != {image_token_id}")

    model = build_llava(tower, family, llm, image_token_id, tokens, seed, torch_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    inner = model.model
    return {
        "out": str(out_dir), "vision": family.name, "llm": llm.config.model_type, "dtype": dtype,
        "params": {"vision": count(inner.vision_tower), "projector": count(inner.multi_modal_projector),
                   "llm": count([inner.language_model, model.lm_head])},
        "image_tokens": tokens, "image_token_id": image_token_id, "resized_embeddings": resized,
        "tied_embeddings": bool(model.config.tie_word_embeddings),
    }
