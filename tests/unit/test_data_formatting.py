"""Exact vision / instruction / response masks on hand-checked samples, padding, truncation, templates."""

import numpy as np
import pytest
import torch
from PIL import Image

from aligntI.config import DataConfig, DataSource
from aligntI.data.dataset import Collator
from aligntI.data.formatting import FormatError, TooLongError, to_messages
from aligntI.data.loader import build_encoder
from aligntI.models.builder import VisionSpec, build_processor, bytelevel_tokenizer

N_IMG = 16  # SigLIP 32 px / patch 8 -> 4 x 4 patches

SINGLE = [{"from": "human", "value": "<image>\nwhat top-left ?"}, {"from": "gpt", "value": "7"}]
MULTI = [{"from": "human", "value": "<image>\nsum top row"}, {"from": "gpt", "value": "1 2"},
         {"from": "human", "value": "what top-left ?"}, {"from": "gpt", "value": "7"}]


def encoder_for(tokenizer, template="llava_v1_compact", max_length=2048):
    processor = build_processor(tokenizer, VisionSpec(), template)
    return processor, build_encoder(processor, DataConfig(train=[DataSource("x")], chat_template=template,
                                                            max_length=max_length))


def positions(mask):
    return np.nonzero(np.asarray(mask))[0].tolist()


def test_single_turn_masks_by_hand(word_tokenizer):
    _, enc = encoder_for(word_tokenizer)
    e = enc.encode(to_messages(SINGLE)[0])
    # <s> USER: <image>x16 what top-left ? ASSISTANT: 7 </s>
    words = word_tokenizer.convert_ids_to_tokens(e.input_ids.tolist())
    assert words == ["<s>", "USER:"] + ["<image>"] * N_IMG + ["what", "top-left", "?", "ASSISTANT:", "7", "</s>"]
    assert positions(e.vision_mask) == list(range(2, 18))
    assert positions(e.instruction_mask) == [18, 19, 20]
    assert positions(e.response_mask) == [22, 23]
    assert (e.labels[[22, 23]] == e.input_ids[[22, 23]]).all() and (np.delete(e.labels, [22, 23]) == -100).all()


def test_multi_turn_masks_by_hand(word_tokenizer):
    _, enc = encoder_for(word_tokenizer)
    e = enc.encode(to_messages(MULTI)[0])
    words = word_tokenizer.convert_ids_to_tokens(e.input_ids.tolist())
    assert words[18:] == ["sum", "top", "row", "ASSISTANT:", "1", "2", "</s>", "USER:", "what", "top-left", "?",
                          "ASSISTANT:", "7", "</s>"]
    assert positions(e.vision_mask) == list(range(2, 18))
    assert positions(e.instruction_mask) == [18, 19, 20, 26, 27, 28]
    assert positions(e.response_mask) == [22, 23, 24, 30, 31]


def test_turns_before_the_image_are_not_instructions(word_tokenizer):
    _, enc = encoder_for(word_tokenizer)
    conv = [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"},
            {"from": "human", "value": "what top-left ?\n<image>"}, {"from": "gpt", "value": "7"}]
    e = enc.encode(to_messages(conv)[0])
    words = word_tokenizer.convert_ids_to_tokens(e.input_ids.tolist())
    assert [words[i] for i in positions(e.instruction_mask)] == []  # the question precedes its image here
    assert [words[i] for i in positions(e.response_mask)] == ["world", "</s>", "7", "</s>"]


def test_text_only_sample_has_no_vision_or_instruction(word_tokenizer):
    _, enc = encoder_for(word_tokenizer)
    e = enc.encode(to_messages([{"from": "human", "value": "hello"}, {"from": "gpt", "value": "world"}])[0])
    assert not e.vision_mask.any() and not e.instruction_mask.any()
    assert positions(e.response_mask) == [len(e.input_ids) - 2, len(e.input_ids) - 1]


@pytest.mark.parametrize("template", ["llava_v1_compact", "llava_v1"])
def test_ids_equal_the_processor_and_spans_decode_byte_level(template):
    tok = bytelevel_tokenizer()
    processor, enc = encoder_for(tok, template)
    messages = to_messages(MULTI)[0]
    e = enc.encode(messages)
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    reference = processor(text=enc.render(messages), images=[image], return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(e.input_ids, reference)
    assert tok.decode(e.input_ids[e.response_mask]) == " 1 2<|endoftext|> 7<|endoftext|>"
    assert tok.decode(e.input_ids[e.instruction_mask]) == "sum top rowwhat top-left ?"
    assert e.vision_mask.sum() == N_IMG


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_padding_keeps_masks_exact(word_tokenizer, side):
    processor, enc = encoder_for(word_tokenizer)
    items = [{"id": str(i), "encoded": enc.encode(to_messages(c)[0]), "pixel_values": torch.zeros(1, 3, 32, 32),
              "image": f"{i}.png", "skips": []} for i, c in enumerate([SINGLE, MULTI])]
    pad = word_tokenizer.pad_token_id
    batch = Collator(pad, enc.image_token_id, N_IMG, (3, 32, 32), side)(items)
    assert batch["input_ids"].shape == (2, 32)
    shift = 8 if side == "left" else 0
    assert positions(batch["vision_mask"][0]) == [p + shift for p in range(2, 18)]
    assert positions(batch["instruction_mask"][0]) == [18 + shift, 19 + shift, 20 + shift]
    assert positions(batch["response_mask"][0]) == [22 + shift, 23 + shift]
    assert positions(batch["response_mask"][1]) == [22, 23, 24, 30, 31]
    assert batch["attention_mask"][0].sum() == 24
    assert (batch["labels"] != -100).eq(batch["response_mask"]).all()
    padded = batch["attention_mask"][0] == 0
    assert (batch["input_ids"][0][padded] == pad).all()
    assert positions(padded) == (list(range(8)) if side == "left" else list(range(24, 32)))
    # Positions count real tokens, so both padding sides give the model the same positions.
    assert batch["position_ids"][0][batch["attention_mask"][0] == 1].tolist() == list(range(24))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def test_truncation_cuts_only_inside_answers(word_tokenizer):
    _, enc = encoder_for(word_tokenizer, max_length=23)
    e = enc.encode(to_messages(SINGLE)[0])  # 24 tokens: drop the final </s>, keep the answer "7"
    assert e.truncated and len(e.input_ids) == 23 and positions(e.response_mask) == [22]
    _, enc = encoder_for(word_tokenizer, max_length=28)
    e = enc.encode(to_messages(MULTI)[0])  # the cut would land in turn 2's question: keep turn 1 whole
    assert len(e.input_ids) == 25 and positions(e.response_mask) == [22, 23, 24]
    _, enc = encoder_for(word_tokenizer, max_length=21)
    with pytest.raises(TooLongError, match="exceed max_length 21"):
        enc.encode(to_messages(SINGLE)[0])  # only the prompt would be left
    _, enc = encoder_for(word_tokenizer, max_length=10)
    with pytest.raises(TooLongError):
        enc.encode(to_messages(SINGLE)[0])  # would cut through the image tokens


def test_template_that_edits_text_is_refused(word_tokenizer, tmp_path):
    template = tmp_path / "strip.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] | trim }} {% if m['role'] == 'assistant' %}"
                        "{{ eos_token }}{% endif %}{% endfor %}")
    _, enc = encoder_for(word_tokenizer, str(template))
    conv = [{"from": "human", "value": " <image>\nwhat top-left ? "}, {"from": "gpt", "value": "7"}]
    with pytest.raises(FormatError, match="changes message text"):
        enc.encode(to_messages(conv)[0])


def test_assistant_turn_must_close_with_special_token(word_tokenizer, tmp_path):
    template = tmp_path / "noeot.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                        "{% else %}ASSISTANT: {{ m['content'] }} hello {% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    _, enc = encoder_for(word_tokenizer, str(template))
    with pytest.raises(FormatError, match="end-of-turn"):
        enc.encode(to_messages(SINGLE)[0])


@pytest.mark.parametrize("conv, fragment", [
    ([], "non-empty list"),
    ([{"from": "human", "value": "hi"}], "alternate"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "unknown role 'bot'"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "string 'from' and 'value'"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}], "only human turns"),
])
def test_malformed_conversations(conv, fragment):
    with pytest.raises(FormatError, match=fragment):
        to_messages(conv)


def test_bytelevel_tokenizer_is_the_same_every_time():
    assert bytelevel_tokenizer().get_vocab() == bytelevel_tokenizer().get_vocab()
