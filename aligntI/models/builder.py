"""Tiny random LLaVA models of the real classes, saved as ordinary HF model directories with processor.

Used by the tests and the CPU example: ``AutoModelForImageTextToText`` / ``AutoProcessor`` load what this
writes exactly as they load a hub checkpoint, so every code path downstream is the production one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen3Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from aligntI.config import ConfigError, from_dict
from aligntI.data.formatting import IMAGE_PLACEHOLDER, load_chat_template
from aligntI.yamlconf import ChatTemplate, resolve_paths

TEXT_CONFIGS = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}


@dataclass
class TextSpec:
    family: Literal["qwen2", "qwen3", "llama"] = "qwen2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128


@dataclass
class VisionSpec:
    family: Literal["siglip", "clip"] = "siglip"
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    image_size: int = 32
    patch_size: int = 8


@dataclass
class TinyModelSpec:
    text: TextSpec = field(default_factory=TextSpec)
    vision: VisionSpec = field(default_factory=VisionSpec)
    chat_template: ChatTemplate = "llava_v1_compact"  # a .jinja path is relative to the repository root
    vocab_multiple: int = 1  # round the embedding rows up, as real checkpoints pad their vocabularies
    seed: int = 0


def wordlevel_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer trained on ``texts`` (the CPU example's corpus)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_PLACEHOLDER]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
    )


def bytelevel_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level tokenizer with no merges (lossless on any text), the same ids every time."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(ByteLevel.alphabet()):  # alphabet() comes in a different order each call
        vocab.setdefault(ch, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", IMAGE_PLACEHOLDER]})
    return tok


def image_processor(vision: VisionSpec):
    # PIL backends: no torchvision on CPU machines; AutoProcessor reloads the same class.
    if vision.family == "siglip":
        return SiglipImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size})
    size = {"height": vision.image_size, "width": vision.image_size}
    return CLIPImageProcessorPil(size={"shortest_edge": vision.image_size}, crop_size=size)


def select_strategy(family: str) -> str:
    """SigLIP has no CLS token: keep every patch ("full"); CLIP drops its CLS ("default")."""
    return "full" if family == "siglip" else "default"


def llava_processor(image_proc, tokenizer, patch_size: int, family: str, chat_template: str) -> LlavaProcessor:
    """The processor of a LLaVA model whose tower is ``family`` (``siglip`` or ``clip``)."""
    return LlavaProcessor(
        image_processor=image_proc,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=select_strategy(family),
        num_additional_image_tokens=0 if family == "siglip" else 1,
        chat_template=load_chat_template(chat_template),
        image_token=IMAGE_PLACEHOLDER,
    )


def build_processor(tokenizer, vision: VisionSpec, chat_template: str) -> LlavaProcessor:
    return llava_processor(image_processor(vision), tokenizer, vision.patch_size, vision.family, chat_template)


def build_model(spec: TinyModelSpec, tokenizer) -> LlavaForConditionalGeneration:
    t, v = spec.text, spec.vision
    vocab = -(-len(tokenizer) // spec.vocab_multiple) * spec.vocab_multiple
    text_kwargs = dict(
        vocab_size=vocab, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size, head_dim=t.hidden_size // t.num_heads,
        max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_config = TEXT_CONFIGS[t.family](**text_kwargs)
    vision_cls = SiglipVisionConfig if v.family == "siglip" else CLIPVisionConfig
    vision_config = vision_cls(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        vision_feature_layer=-1,
        vision_feature_select_strategy=select_strategy(v.family),
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return model


def copy_vision_tower(model, source_dir: str | Path) -> None:
    """Give ``model`` the trained vision tower of ``source_dir`` (students share the teacher's encoder)."""
    from transformers import AutoModelForImageTextToText

    source = AutoModelForImageTextToText.from_pretrained(str(source_dir), dtype=torch.float32)
    fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "image_size", "patch_size")
    mine, theirs = model.config.vision_config.to_dict(), source.config.vision_config.to_dict()
    differ = [f"{k}: spec {mine.get(k)} vs {source_dir} {theirs.get(k)}" for k in fields if mine.get(k) != theirs.get(k)]
    if differ:
        raise ConfigError("--vision-from: the spec's vision tower differs from the one to copy: " + "; ".join(differ))
    model.model.vision_tower.load_state_dict(source.model.vision_tower.state_dict())


def write_model_dir(out_dir: str | Path, spec: TinyModelSpec, tokenizer, vision_from: str | Path | None = None) -> Path:
    """Build a random model of ``spec`` (optionally with the vision tower of ``vision_from``) and save it with
    its processor as an HF directory."""
    out_dir = Path(out_dir)
    processor = build_processor(tokenizer, spec.vision, spec.chat_template)
    model = build_model(spec, tokenizer)
    if vision_from is not None:
        copy_vision_tower(model, vision_from)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def init_model_dir(spec_path: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *,
                   vision_from: str | Path | None = None, seed: int | None = None) -> tuple[Path, TinyModelSpec]:
    """Save a random model of the spec YAML ``spec_path`` (``seed`` replaces the spec's) with the tokenizer of
    ``tokenizer_dir``, as :func:`write_model_dir`; returns the directory and the spec."""
    spec = from_dict(TinyModelSpec, yaml.safe_load(Path(spec_path).read_text()) or {})
    resolve_paths(spec)  # a spec's paths follow the recipes' rule
    if seed is not None:
        spec = replace(spec, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return write_model_dir(out_dir, spec, tokenizer, vision_from=vision_from), spec
