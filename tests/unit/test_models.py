"""Tiny real LLaVA models: save/reload, attention per sub-model, trainable parts, batch invariances."""

import pytest
import torch
import torch.nn.functional as F

from aligntI.config import AttentionConfig, DataConfig, DataSource, OptimConfig
from aligntI.data.dataset import Collator, model_inputs
from aligntI.data.formatting import to_messages
from aligntI.data.loader import build_encoder
from aligntI.models.builder import TextSpec, TinyModelSpec, VisionSpec, write_model_dir
from aligntI.models.loading import load_model, load_processor, param_groups, set_trainable


@pytest.mark.parametrize("text", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_builder_round_trip(tmp_path, word_tokenizer, text, vision):
    spec = TinyModelSpec(text=TextSpec(family=text, hidden_size=32), vision=VisionSpec(family=vision))
    path = write_model_dir(tmp_path / "m", spec, word_tokenizer)
    processor = load_processor(path)
    model = load_model(path, AttentionConfig("eager", "sdpa")).eval()
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.model_type == text and model.config.vision_config.model_type.startswith(vision)
    from PIL import Image

    image = Image.new("RGB", (32, 32), (10, 120, 240))
    text_in = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nwhat top-left ?"}], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text_in, images=[image], return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 16  # CLIP drops its CLS, SigLIP has none
    reloaded = load_model(path, AttentionConfig("sdpa", "sdpa")).eval()
    with torch.no_grad():
        a = model(**inputs).logits
        b = reloaded(**inputs).logits
        generated = reloaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # eager vs sdpa on the same weights
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3 or generated[0, -1] == processor.tokenizer.eos_token_id


def test_trainable_parts_and_param_groups(tiny_model):
    model = load_model(tiny_model, AttentionConfig())
    counts = set_trainable(model, ["projector", "llm"])
    assert counts["vision_tower"] == 0 and counts["projector"] > 0 and counts["llm"] > 0
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.lm_head.parameters())
    groups = param_groups(model, OptimConfig(lr=1e-4, projector_lr=1e-3, weight_decay=0.1))
    by_name = {g["name"]: g for g in groups}
    assert by_name["projector"]["lr"] == 1e-3 and by_name["model"]["lr"] == 1e-4
    assert by_name["model_no_decay"]["weight_decay"] == 0.0 and by_name["model"]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in by_name["model_no_decay"]["params"])
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable


def batch_of(tiny_model, convs, side, images=True):
    processor = load_processor(tiny_model)
    enc = build_encoder(processor, DataConfig(train=[DataSource("x")], max_length=256))
    items = [{"id": str(i), "encoded": enc.encode(to_messages(c)[0]),
              "pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) if images else None,
              "image": f"{i}.png" if images else None, "skips": []} for i, c in enumerate(convs)]
    return Collator(processor.tokenizer.pad_token_id, enc.image_token_id, enc.num_image_tokens, (3, 32, 32),
                    side)(items)


CONVS = [
    [{"from": "human", "value": "<image>\nwhat top-left ?"}, {"from": "gpt", "value": "7"}],
    [{"from": "human", "value": "<image>\nsum top row"}, {"from": "gpt", "value": "1 2"},
     {"from": "human", "value": "which odd ?"}, {"from": "gpt", "value": "top-left bottom-right"}],
]


def test_left_and_right_padding_give_the_same_logits(tiny_model):
    model = load_model(tiny_model, AttentionConfig()).eval()
    with torch.no_grad():
        out = {side: (b := batch_of(tiny_model, CONVS, side), model(**model_inputs(b)).logits)
               for side in ("right", "left")}
    (br, lr), (bl, ll) = out["right"], out["left"]
    for row in range(2):
        real_r, real_l = br["attention_mask"][row] == 1, bl["attention_mask"][row] == 1
        torch.testing.assert_close(lr[row][real_r], ll[row][real_l], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ll).all()
    ce = [F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
          for b, logits in ((br, lr), (bl, ll))]
    assert torch.allclose(ce[0], ce[1], atol=1e-4)


def test_dummy_image_does_not_change_text_only_logits(tiny_model):
    model = load_model(tiny_model, AttentionConfig()).eval()
    convs = [[{"from": "human", "value": "what top-left ?"}, {"from": "gpt", "value": "7"}],
             [{"from": "human", "value": "sum top row"}, {"from": "gpt", "value": "1 2"}]]
    batch = batch_of(tiny_model, convs, "right", images=False)
    n_img = (batch["input_ids"] == model.config.image_token_id).sum()
    assert n_img > 0 and batch["pixel_values"].shape[0] == 1
    plain_len = batch["input_ids"].shape[1] - int(n_img)
    with torch.no_grad():
        with_dummy = model(**model_inputs(batch)).logits[:, :plain_len]
        # Oracle: the same text-only batch without the dummy, where the vision tower is not run at all.
        plain = model(input_ids=batch["input_ids"][:, :plain_len],
                      attention_mask=batch["attention_mask"][:, :plain_len],
                      position_ids=batch["position_ids"][:, :plain_len]).logits
    real = batch["attention_mask"][:, :plain_len] == 1
    torch.testing.assert_close(with_dummy[real], plain[real], atol=1e-5, rtol=1e-5)


def test_a_vision_tower_that_does_not_fit_the_spec_is_a_config_error(tmp_path, tiny_model, digitgrid, capsys):
    from aligntI.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("vision: {family: siglip, hidden_size: 48, num_layers: 1, num_heads: 2, intermediate_size: 64}\n")
    assert main(["init-model", "--spec", str(spec), "--tokenizer", str(digitgrid / "tokenizer"),
                 "--vision-from", str(tiny_model), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "aligntI: config error: --vision-from: the spec's vision tower differs" in err and "hidden_size: spec 48" in err
