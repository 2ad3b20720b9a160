"""``aligntI assemble``: pretrained SigLIP/CLIP + pretrained Qwen → the starting LLaVA directory.

Tiny random checkpoints are saved as ordinary HF directories (as users have the hub's); the oracles are
independent of the code under test: the source safetensors files read directly, the source Qwen's own logits,
and the processor's image-token count against (image_size / patch_size)².
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    BertConfig,
    BertLMHeadModel,
    BertTokenizer,
    CLIPConfig,
    CLIPModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from aligntI.cli import main
from aligntI.data.formatting import IMAGE_PLACEHOLDER

IMAGE, PATCH = 32, 8
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
              patch_size=PATCH)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """``aligntI.models.builder.bytelevel_tokenizer`` without ``<image>``, as a text-only Qwen tokenizer is."""
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(ByteLevel.alphabet()):  # alphabet() comes in a different order each call
        vocab.setdefault(ch, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert IMAGE_PLACEHOLDER not in tok.get_vocab()
    return tok


def write_qwen(path, tie: bool, extra_rows: int, qwen3: bool = False) -> int:
    """A tiny Qwen2 (or Qwen3) causal LM + tokenizer; ``extra_rows`` pads the vocabulary as real checkpoints do.
    Returns the tokenizer length."""
    tok = qwen_tokenizer()
    torch.manual_seed(1)
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if qwen3 else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=len(tok) + extra_rows, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tie,
                         eos_token_id=tok.eos_token_id)
    model_cls(config).save_pretrained(path)
    tok.save_pretrained(path)
    return len(tok)


def hub_style_preprocessor(path, processor, hub_name: str) -> None:
    """Save ``processor`` and name the torchvision class in it, as the hub's preprocessor_config.json does."""
    processor.save_pretrained(path)
    pre = path / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), "image_processor_type": hub_name}))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)).save_pretrained(root / "siglip")
    hub_style_preprocessor(root / "siglip", SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE}),
                           "SiglipImageProcessor")
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(root / "siglip_vision")
    SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE}).save_pretrained(root / "siglip_vision")
    CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)).save_pretrained(root / "clip")
    hub_style_preprocessor(root / "clip", CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                                                crop_size={"height": IMAGE, "width": IMAGE}),
                           "CLIPImageProcessor")
    n_untied = write_qwen(root / "qwen_untied", tie=False, extra_rows=0)  # <image> does not fit: resize
    n_tied = write_qwen(root / "qwen_tied", tie=True, extra_rows=7)  # padded vocabulary: <image> fits
    n_qwen3 = write_qwen(root / "qwen3", tie=False, extra_rows=5, qwen3=True)
    return {"root": root, "n_untied": n_untied, "n_tied": n_tied, "n_qwen3": n_qwen3}


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["assemble", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, vision_dir, llm_dir, out, *needles) -> str:
    """``aligntI assemble`` ends with exit 2 and one line naming the problem, and writes nothing."""
    rc, _, err = run(capsys, "--vision", vision_dir, "--llm", llm_dir, "--out", out)
    assert rc == 2, err
    *bars, message, end = err.split("\n")  # tqdm's loading bars, then the message
    assert message.startswith("aligntI assemble: ") and end == "" and all("it/s]" in bar for bar in bars), err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    assert not out.exists()
    return err


def copy_without(src, dst, *names):
    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink()
    return dst


def cut_in_half(path) -> None:
    """A download that stopped half-way."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def image_inputs(processor):
    text = processor.apply_chat_template([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nwhat is it?"}],
                                         tokenize=False, add_generation_prompt=True)
    return processor(text=text, images=[Image.new("RGB", (45, 29), (10, 120, 240))], return_tensors="pt")


def image_features(llava, inputs) -> torch.Tensor:
    """The projected image features ``[tokens, text hidden]`` (the output's ``image_hidden_states`` changes
    meaning across transformers 5 releases; ``get_image_features`` does not)."""
    with torch.no_grad():
        return torch.cat(list(llava.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))


def text_logits_equal(out_dir, llm_dir, n_vocab, dtype, **tol):
    """The LLaVA model's text-only logits are the source LLM's (same ids, same weights)."""
    llava = AutoModelForImageTextToText.from_pretrained(str(out_dir), dtype=dtype).eval()
    source = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype).eval()
    ids = torch.randint(0, n_vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = llava(input_ids=ids).logits, source(input_ids=ids).logits
    torch.testing.assert_close(ours[..., :theirs.shape[-1]], theirs, **tol)
    return llava


def test_full_siglip_untied_qwen_float32(parts, tmp_path, capsys):
    root, out = parts["root"], tmp_path / "llava"
    rc, stdout, _ = run(capsys, "--vision", root / "siglip", "--llm", root / "qwen_untied", "--out", out,
                        "--dtype", "float32")
    assert rc == 0 and f"to {out}" in stdout and "16 image tokens per image" in stdout and "resized" in stdout
    assert len(stdout.strip().splitlines()) == 1

    llava = text_logits_equal(out, root / "qwen_untied", parts["n_untied"], torch.float32, atol=1e-6, rtol=1e-6)
    cfg = llava.config
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.projector_hidden_act) == (-1, "full", "gelu")
    assert cfg.multimodal_projector_bias and not cfg.tie_word_embeddings and llava.dtype == torch.float32
    assert llava.lm_head.weight is not llava.model.language_model.embed_tokens.weight

    # Weights: exactly the source files' tensors (the full checkpoint's vision half; the LLM).
    vision_src = load_file(root / "siglip" / "model.safetensors")
    tower = llava.model.vision_tower.state_dict()
    assert set(tower) == {k.removeprefix("vision_model.") for k in vision_src if k.startswith("vision_model.")}
    for key, value in tower.items():
        assert torch.equal(value, vision_src["vision_model." + key]), key
    llm_src = load_file(root / "qwen_untied" / "model.safetensors")
    ours = {"model." + k: v for k, v in llava.model.language_model.state_dict().items()}
    ours["lm_head.weight"] = llava.lm_head.weight
    assert set(ours) == set(llm_src)
    n = parts["n_untied"]
    for key, value in ours.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):  # one row added for <image>: the mean row
            assert value.shape[0] == n + 1
            assert torch.equal(value[:n], llm_src[key])
            torch.testing.assert_close(value[n], llm_src[key].mean(0))
        else:
            assert torch.equal(value, llm_src[key]), key

    # An image+text forward through the saved processor: (image_size / patch)^2 tokens of the new id.
    processor = AutoProcessor.from_pretrained(str(out))
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil"
    assert processor.image_token == IMAGE_PLACEHOLDER and processor.image_token_id == cfg.image_token_id == n
    inputs = image_inputs(processor)
    assert inputs["pixel_values"].shape[-2:] == (IMAGE, IMAGE)
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == (IMAGE // PATCH) ** 2
    assert "USER:" in processor.decode(inputs["input_ids"][0])  # the llava_v1 template
    with torch.no_grad():
        result = llava(**inputs)
    assert result.logits.shape == (*inputs["input_ids"].shape, n + 1) and torch.isfinite(result.logits).all()
    assert image_features(llava, inputs).shape == ((IMAGE // PATCH) ** 2, 32)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == processor.tokenizer.eos_token_id == 0


def test_vision_only_siglip_tied_qwen_bfloat16(parts, tmp_path, capsys):
    root, out = parts["root"], tmp_path / "llava"
    rc, stdout, _ = run(capsys, "--vision", root / "siglip_vision", "--llm", root / "qwen_tied", "--out", out)
    assert rc == 0 and "bfloat16" in stdout and "tied embeddings" in stdout and "resized" not in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["text_config"]["tie_word_embeddings"]
    assert config["text_config"]["vocab_size"] == parts["n_tied"] + 7  # the padded vocabulary had room
    assert config["image_token_index"] == parts["n_tied"]

    llava = text_logits_equal(out, root / "qwen_tied", parts["n_tied"], torch.bfloat16, atol=0, rtol=0)
    assert llava.dtype == torch.bfloat16
    assert llava.lm_head.weight is llava.model.language_model.embed_tokens.weight
    vision_src = load_file(root / "siglip_vision" / "model.safetensors")
    for key, value in llava.model.vision_tower.state_dict().items():
        assert torch.equal(value, vision_src[key].to(torch.bfloat16)), key
    llm_src = load_file(root / "qwen_tied" / "model.safetensors")
    for key, value in llava.model.language_model.state_dict().items():
        assert torch.equal(value, llm_src["model." + key].to(torch.bfloat16)), key
    processor = AutoProcessor.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.isfinite(llava(**image_inputs(processor)).logits.float()).all()


def test_clip_qwen3_and_projector_seed(parts, tmp_path, capsys):
    root = parts["root"]
    outs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        outs[name] = tmp_path / name
        rc, stdout, _ = run(capsys, "--vision", root / "clip", "--llm", root / "qwen3", "--out", outs[name],
                            "--dtype", "float32", "--seed", seed, "--chat-template", "llava_v1_compact")
        assert rc == 0 and "CLIP vision" in stdout and "qwen3 LLM" in stdout and "16 image tokens per image" in stdout
    llava = text_logits_equal(outs["a"], root / "qwen3", parts["n_qwen3"], torch.float32, atol=1e-6, rtol=1e-6)
    assert (llava.config.vision_feature_layer, llava.config.vision_feature_select_strategy) == (-2, "default")
    vision_src = load_file(root / "clip" / "model.safetensors")
    for key, value in llava.model.vision_tower.state_dict().items():
        assert torch.equal(value, vision_src["vision_model." + key]), key
    processor = AutoProcessor.from_pretrained(str(outs["a"]))
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    inputs = image_inputs(processor)
    assert int((inputs["input_ids"] == llava.config.image_token_id).sum()) == (IMAGE // PATCH) ** 2  # CLS dropped
    assert image_features(llava, inputs).shape == ((IMAGE // PATCH) ** 2, 32)

    projectors = {k: load_file(v / "model.safetensors") for k, v in outs.items()}
    keys = [k for k in projectors["a"] if k.startswith("multi_modal_projector.")]
    assert len(keys) == 4
    assert all(torch.equal(projectors["a"][k], projectors["b"][k]) for k in keys)
    weight = "multi_modal_projector.linear_1.weight"
    assert not torch.equal(projectors["a"][weight], projectors["c"][weight]) and projectors["a"][weight].std() > 0


def test_errors_name_the_file(parts, tmp_path, capsys):
    root = parts["root"]
    llm, vision = root / "qwen_tied", root / "siglip"

    def fails(vision_dir, llm_dir, *needles):
        refused(capsys, vision_dir, llm_dir, tmp_path / "out", *needles)

    fails(tmp_path / "nope", llm, tmp_path / "nope", "no such directory")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", llm, tmp_path / "empty" / "config.json", "missing")
    fails(llm, llm, llm / "config.json", "'qwen2' is not supported for --vision")
    fails(vision, vision, vision / "config.json", "'siglip' is not a causal language model")

    no_pre = copy_without(vision, tmp_path / "no_pre", "preprocessor_config.json")
    fails(no_pre, llm, no_pre / "preprocessor_config.json", "missing")

    wrong_size = tmp_path / "wrong_size"
    shutil.copytree(vision, wrong_size)
    SiglipImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(wrong_size)
    fails(wrong_size, llm, wrong_size / "preprocessor_config.json", "48x48", "32x32")

    bigger = tmp_path / "bigger"  # config.json of another model size than its weights
    shutil.copytree(vision, bigger)
    cfg = json.loads((bigger / "config.json").read_text())
    cfg["vision_config"]["hidden_size"] = 48
    (bigger / "config.json").write_text(json.dumps(cfg))
    fails(bigger, llm, bigger, "do not have the shapes config.json declares", "(32,) vs config (48,)")

    bad_llm = tmp_path / "bad_llm"
    shutil.copytree(llm, bad_llm)
    cfg = json.loads((bad_llm / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad_llm / "config.json").write_text(json.dumps(cfg))
    fails(vision, bad_llm, bad_llm, "do not have the shapes config.json declares")

    rc, _, err = run(capsys, "--vision", vision, "--llm", llm, "--out", tmp_path / "out", "--chat-template", "nope")
    assert rc == 2 and "unknown chat template 'nope'" in err


def test_missing_or_corrupt_weights_are_refused(parts, tmp_path, capsys):
    root, out = parts["root"], tmp_path / "out"
    llm, vision = root / "qwen_tied", root / "siglip"
    no_weights = "Error no file named model.safetensors"
    vision_bare = copy_without(vision, tmp_path / "vision_bare", "model.safetensors")
    refused(capsys, vision_bare, llm, out, vision_bare, no_weights)
    llm_bare = copy_without(llm, tmp_path / "llm_bare", "model.safetensors")
    refused(capsys, vision, llm_bare, out, llm_bare, no_weights)

    corrupt = "a weights file is truncated or corrupt (SafetensorError); download it again"
    vision_cut = tmp_path / "vision_cut"
    shutil.copytree(vision, vision_cut)
    cut_in_half(vision_cut / "model.safetensors")
    refused(capsys, vision_cut, llm, out, f"{vision_cut}: {corrupt}")
    llm_cut = tmp_path / "llm_cut"
    shutil.copytree(llm, llm_cut)
    cut_in_half(llm_cut / "model.safetensors")
    refused(capsys, vision, llm_cut, out, f"{llm_cut}: {corrupt}")

    llm_pickle = copy_without(llm, tmp_path / "llm_pickle", "model.safetensors")
    (llm_pickle / "pytorch_model.bin").write_bytes(b"<html>not found</html>")  # a saved error page
    refused(capsys, vision, llm_pickle, out, f"{llm_pickle}: a weights file is truncated or corrupt (UnpicklingError)")


def test_llm_config_of_another_architecture_is_refused(parts, tmp_path, capsys):
    """Llama's config over Qwen2 weights loads without missing weights but drops the attention biases."""
    llama = tmp_path / "llama"
    shutil.copytree(parts["root"] / "qwen_tied", llama)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    refused(capsys, parts["root"] / "siglip", llama, tmp_path / "out",
            f"{llama}: 6 weights of the checkpoint have no place in the model config.json describes",
            "model.layers.0.self_attn.k_proj.bias")


def test_llm_without_a_usable_tokenizer_is_refused(parts, tmp_path, capsys):
    root, out = parts["root"], tmp_path / "out"
    vision, llm = root / "siglip", root / "qwen_tied"
    usable = "--llm must hold the LLM's own tokenizer files"
    no_files = copy_without(llm, tmp_path / "no_files", "tokenizer.json", "tokenizer_config.json")
    refused(capsys, vision, no_files, out,
            f"{no_files}: no usable tokenizer (none of tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, "
            f"tokenizer.model is there): it encodes 'hello world' to no ids", usable)
    config_only = copy_without(llm, tmp_path / "config_only", "tokenizer.json")
    refused(capsys, vision, config_only, out,
            f"{config_only}: no usable tokenizer (read from tokenizer_config.json): it encodes 'hello world' to no ids")

    unreadable = tmp_path / "unreadable"
    shutil.copytree(llm, unreadable)
    tok = json.loads((unreadable / "tokenizer.json").read_text())
    tok["model"]["type"] = "NoSuchModel"
    (unreadable / "tokenizer.json").write_text(json.dumps(tok))
    refused(capsys, vision, unreadable, out, f"{unreadable}: cannot load its tokenizer")

    # A causal LM whose (WordPiece) tokenizer knows none of the probe's words: every one becomes [UNK].
    unknown = tmp_path / "unknown"
    BertLMHeadModel(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, is_decoder=True)).save_pretrained(unknown)
    BertTokenizer(vocab={t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat"])}
                  ).save_pretrained(unknown)
    refused(capsys, vision, unknown, out, f"{unknown}: no usable tokenizer (read from tokenizer.json, "
                                          "tokenizer_config.json): it encodes 'hello world' to only the unknown "
                                          "token '[UNK]'")


def test_the_shipped_recipe_assembles_from_models_into_runs(parts, tmp_path, capsys):
    """``aligntI assemble --config recipes/paper/assemble.yaml``, as the loop of recipes/README.md runs it, with
    ``vars.models`` and ``vars.runs`` moved: the same model as the flags give."""
    root, models, runs = parts["root"], tmp_path / "models", tmp_path / "runs"
    models.mkdir()
    (models / "siglip-so400m-patch14-384").symlink_to(root / "siglip_vision")
    (models / "Qwen2.5-0.5B").symlink_to(root / "qwen_tied")
    rc, stdout, err = run(capsys, "--config", REPO / "recipes" / "paper" / "assemble.yaml", f"vars.models={models}",
                          f"vars.runs={runs}", "vars.llm=Qwen2.5-0.5B", "vars.name=qwen2.5-0.5b", "dtype=float32")
    out = runs / "init" / "qwen2.5-0.5b"
    assert rc == 0, err
    assert f"to {out}" in stdout and f"(from {models / 'Qwen2.5-0.5B'}" in stdout and "seed 0" in stdout
    rc, _, err = run(capsys, "--vision", root / "siglip_vision", "--llm", root / "qwen_tied", "--out",
                     tmp_path / "flags", "--dtype", "float32")
    assert rc == 0, err
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "flags" / "model.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
