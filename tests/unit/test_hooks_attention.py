"""Captured instruction→vision probabilities equal eager ``output_attentions`` of the same layer."""

import json

import pytest
import torch

from aligntI.config import AttentionConfig, DataConfig, DataSource
from aligntI.data.dataset import model_inputs
from aligntI.data.loader import build_sequential_loader
from aligntI.hooks.attention import AttentionCapture, decoder_layers, padded_positions
from aligntI.models.loading import load_model, load_processor

QUESTIONS = ["what top-left ?", "read top row", "sum left column ? the image is fine", "which odd ?",
             "what bottom-right ? hello world"]


def write_mixed(tmp_path, digitgrid, with_text_only=True):
    """Samples whose instructions differ in length, plus (optionally) one without an image."""
    records = []
    for i, q in enumerate(QUESTIONS):
        records.append({"id": f"m{i}", "image": str(digitgrid / f"images/train/{i:06d}.png"),
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                          {"from": "gpt", "value": "7"}]})
    if with_text_only:
        records.insert(2, {"id": "text", "conversations": [{"from": "human", "value": "hello world"},
                                                            {"from": "gpt", "value": "fine"}]})
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def batch_for(model_dir, data_path, padding_side):
    processor = load_processor(model_dir)
    data = DataConfig(train=[DataSource(str(data_path), images="/")], chat_template="llava_v1_compact",
                      max_length=64, padding_side=padding_side, num_workers=0)
    return next(iter(build_sequential_loader(processor, data, batch_size=16)))


def eager_reference(model_dir, batch, layer):
    """The oracle: a separately loaded eager model with output_attentions on the whole model."""
    return eager_reference_of(load_model(model_dir, AttentionConfig("eager", "eager")).eval(), batch, layer)


def eager_reference_of(model, batch, layer):
    with torch.no_grad():
        out = model(**model_inputs(batch), output_attentions=True, use_cache=False)
    full = out.attentions[layer]  # [B, H, L, L]
    inst_idx, inst_valid = padded_positions(batch["instruction_mask"])
    vis_idx, vis_valid = padded_positions(batch["vision_mask"])
    rows = full.gather(2, inst_idx[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))
    ref = rows.gather(3, vis_idx[:, None, None, :].expand(-1, full.shape[1], rows.shape[2], -1))
    return ref * (inst_valid[:, None, :, None] & vis_valid[:, None, None, :]), out.logits


def test_padded_positions():
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    idx, valid = padded_positions(mask)
    assert idx.tolist() == [[1, 2, 4], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, False, False]]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_capture_matches_eager(tmp_path, digitgrid, tiny_model, backend, padding_side):
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid), padding_side)
    assert len(set(batch["instruction_mask"].sum(-1).tolist())) > 2  # mixed instruction lengths
    assert (batch["attention_mask"] == 0).any()  # padding is present
    model = load_model(tiny_model, AttentionConfig(backend, "sdpa")).eval()
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads  # GQA
    with torch.no_grad():
        plain = model(**model_inputs(batch), use_cache=False).logits
        with AttentionCapture(model, [0, 1], batch["instruction_mask"], batch["vision_mask"],
                              batch["attention_mask"]) as cap:
            captured = model(**model_inputs(batch), use_cache=False).logits
    for layer in (0, 1):
        ref, ref_logits = eager_reference(tiny_model, batch, layer)
        torch.testing.assert_close(cap[layer], ref, atol=1e-5, rtol=0)
        # the probabilities are normalised over the whole row: vision columns of a row sum below 1
        assert cap[layer].sum(-1).max() < 1 - 1e-3
    torch.testing.assert_close(captured, plain, atol=0, rtol=0)  # the model's own output is untouched
    text_row = batch["sample_ids"].index("text")
    assert cap[0][text_row].abs().sum() == 0


def test_capture_is_scoped(tmp_path, digitgrid, tiny_model):
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid), "right")
    model = load_model(tiny_model, AttentionConfig()).eval()
    with AttentionCapture(model, [1], batch["instruction_mask"], batch["vision_mask"],
                          batch["attention_mask"]) as cap:
        pass
    with pytest.raises(RuntimeError, match="layer 1 recorded nothing"):
        cap[1]
    with torch.no_grad():
        model(**model_inputs(batch), use_cache=False)  # outside the block: nothing recorded
    assert cap.probs == {}
    with pytest.raises(ValueError, match="out of range"):
        AttentionCapture(model, [5], batch["instruction_mask"], batch["vision_mask"], batch["attention_mask"])


def test_capture_with_activation_checkpointing(tmp_path, digitgrid, tiny_model):
    """Probabilities and gradients through them are the same with and without recomputation in backward."""
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid, with_text_only=False), "left")
    results = []
    for checkpointing in (False, True):
        model = load_model(tiny_model, AttentionConfig("sdpa", "sdpa")).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        with AttentionCapture(model, [1], batch["instruction_mask"], batch["vision_mask"],
                              batch["attention_mask"]) as cap:
            logits = model(**model_inputs(batch), use_cache=False).logits
            probs = cap[1]
            loss = (probs * torch.arange(probs.shape[-1])).sum() + logits.float().pow(2).mean()
            loss.backward()
        grad = decoder_layers(model)[1].self_attn.q_proj.weight.grad.clone()
        results.append((probs.detach(), grad))
    ref, _ = eager_reference(tiny_model, batch, 1)
    torch.testing.assert_close(results[1][0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)


def test_capture_applies_attention_softcapping_as_the_kernel_does(tmp_path, digitgrid, tiny_model):
    """A Gemma-2-style decoder softcaps its attention logits: the capture equals its eager attention maps."""
    from transformers import AutoConfig, Gemma2Config, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_model)
    text = config.text_config
    config.text_config = Gemma2Config(
        vocab_size=text.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=0.1,
        query_pre_attn_scalar=8, sliding_window=4096, pad_token_id=text.pad_token_id, tie_word_embeddings=False)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.language_model.layers[1].self_attn.q_proj.weight.data.mul_(30)  # logits well past the cap
    model.save_pretrained(tmp_path / "gemma2")
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid), "left")
    eager = load_model(tmp_path / "gemma2", AttentionConfig("eager", "eager")).eval()
    with torch.no_grad(), AttentionCapture(eager, [1], batch["instruction_mask"], batch["vision_mask"],
                                           batch["attention_mask"]) as cap:
        eager(**model_inputs(batch), use_cache=False)
    ref, _ = eager_reference(tmp_path / "gemma2", batch, 1)
    torch.testing.assert_close(cap[1], ref, atol=1e-5, rtol=0)
    for layer in decoder_layers(eager):  # the same weights without the cap attend elsewhere
        layer.self_attn.attn_logit_softcapping = None
    uncapped, _ = eager_reference_of(eager, batch, 1)
    assert (uncapped - ref).abs().max() > 1e-2
