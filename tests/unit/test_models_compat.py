"""Teacher/student start-up checks on real tiny processors and LLaVA configs from the builder."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from aligntI.data.formatting import IMAGE_PLACEHOLDER
from aligntI.models.builder import (
    TinyModelSpec,
    VisionSpec,
    build_model,
    build_processor,
    wordlevel_tokenizer,
)
from aligntI.models.compat import (
    IncompatibleModelsError,
    SharedVocab,
    check_compatible,
    check_token_ids,
    check_vocab_rows,
)

TEXTS = ["USER: ASSISTANT: hello world is the image fine"]
T_PATH, S_PATH = "/models/teacher-7b", "/models/student-0.5b"


def tokenizer(swap: tuple[str, str] | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer of ``TEXTS``; ``swap`` exchanges the ids of two of its tokens."""
    tok = wordlevel_tokenizer(TEXTS)
    if swap is None:
        return tok
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    a, b = swap
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
    )


def side(tok=None, vision: VisionSpec | None = None, template: str = "llava_v1_compact",
         vocab_multiple: int = 1):
    """(processor, top-level LlavaConfig) of one tiny model, built from scratch."""
    tok = tok or tokenizer()
    vision = vision or VisionSpec()
    processor = build_processor(tok, vision, template)
    config = build_model(TinyModelSpec(vision=vision, chat_template=template, vocab_multiple=vocab_multiple),
                         tok).config
    return processor, config


def check(teacher, student, chat_template: str | None = None) -> SharedVocab:
    (tp, tc), (sp, sc) = teacher, student
    return check_compatible(tp, sp, tc, sc, teacher_path=T_PATH, student_path=S_PATH,
                            chat_template=chat_template)


def raises(*parts: str):
    """``pytest.raises`` for an incompatibility naming both paths and containing ``parts`` in order."""
    pattern = ".*".join(re.escape(p) for p in (T_PATH, S_PATH, *parts))
    return pytest.raises(IncompatibleModelsError, match=re.compile(pattern, re.S))


def test_same_ingredients_pass_with_same_vocabulary():
    shared = check(side(), side())
    assert shared == SharedVocab(size=13, token_ids=13, teacher_rows=13, student_rows=13,
                                 note="same vocabulary size")


def test_padding_rows_are_sliced_to_the_smaller_model():
    shared = check(side(), side(vocab_multiple=16))
    assert (shared.size, shared.teacher_rows, shared.student_rows) == (13, 13, 16)
    assert shared.note == ("vocab rows differ (teacher 13, student 16): logits sliced to the shared 13; "
                           "all 13 tokenizer ids are below it")


def test_swapped_tokens_are_reported_with_ids_and_both_tokens():
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids(["hello", "world"])
    with raises("[token ids] 2 of the 13 shared ids map to different tokens",
                f"id {ids[0]}: teacher 'hello' / student 'world'",
                f"id {ids[1]}: teacher 'world' / student 'hello'"):
        check(side(tok), side(tokenizer(swap=("hello", "world"))))
    with pytest.raises(IncompatibleModelsError, match=r"^teacher and student cannot"):
        check_token_ids(tok, tokenizer(swap=("hello", "world")))


def test_moved_image_token_fails_token_ids_and_placeholder():
    teacher = side()
    student = side(tokenizer(swap=(IMAGE_PLACEHOLDER, "fine")))
    t_id, s_id = teacher[1].image_token_id, student[1].image_token_id
    assert t_id != s_id
    with raises("[token ids]", f"id {t_id}: teacher '<image>' / student 'fine'",
                f"[special tokens] image token id teacher {t_id} ('<image>') / student {s_id} ('<image>')",
                f"[image placeholder] config image_token_id teacher {t_id} / student {s_id}"):
        check(teacher, student)


def test_config_image_token_id_must_match_both_sides():
    teacher, (sp, sc) = side(), side()
    sc.image_token_id = tokenizer().convert_tokens_to_ids("fine")
    with raises(f"[image placeholder] config image_token_id teacher 4 / student {sc.image_token_id}",
                "student processor expands '<image>' to id 4 but its config image_token_id is "
                f"{sc.image_token_id}"):
        check(teacher, (sp, sc))


def test_different_chat_templates_fail_unless_the_recipe_sets_one():
    teacher, student = side(template="llava_v1"), side(template="llava_v1_compact")
    with raises("[chat template] the processors' chat templates differ (first differing line 1: teacher",
                "set data.chat_template"):
        check(teacher, student)
    assert check(teacher, student, chat_template="llava_v1_compact").size == 13


def test_template_difference_is_quoted_around_the_first_differing_character():
    sp, sc = side()
    sp.chat_template = sp.chat_template.replace("ASSISTANT: {{ m", "ASSISTANT:{{ m")
    with raises("[chat template]", "first differing line 9: teacher ", "ASSISTANT: {{ m", " / student ",
                "ASSISTANT:{{ m"):
        check(side(), (sp, sc))


def test_missing_chat_template_asks_for_data_chat_template():
    teacher, (sp, sc) = side(), side()
    sp.chat_template = None
    with raises("[chat template] the student processor has no chat template; set data.chat_template"):
        check(teacher, (sp, sc))
    check(teacher, (sp, sc), chat_template="llava_v1_compact")


def test_different_image_size_changes_pixels_and_token_count():
    with raises("[image layout] pixel_values of a 37x29 probe image have shape teacher (1, 3, 32, 32) / "
                "student (1, 3, 48, 48)", "size teacher {'height': 32, 'width': 32} / student {'height': 48",
                "image tokens per image teacher 16 / student 36"):
        check(side(), side(vision=VisionSpec(image_size=48)))


def test_different_normalisation_changes_pixel_values():
    sp, sc = side()
    sp.image_processor.image_mean = [0.48145466, 0.4578275, 0.40821073]
    with raises("[image layout] pixel_values of a 37x29 probe image differ (same shape (1, 3, 32, 32), "
                "max abs difference", "image_mean teacher (0.5, 0.5, 0.5) / student [0.48145466"):
        check(side(), (sp, sc))


def test_different_vision_feature_layer_fails():
    sp, sc = side()
    sc.vision_feature_layer = -2
    with raises("[image layout] config vision_feature_layer teacher -1 / student -2"):
        check(side(), (sp, sc))


def test_model_rows_below_a_tokenizer_id_fail():
    sp, sc = side()
    sc.text_config.vocab_size = 10
    inv = {i: t for t, i in tokenizer().get_vocab().items()}
    with raises("[vocab rows] the teacher and student tokenizers have 13 ids but the shared vocab rows are "
                "10 "
                f"(teacher 13, student 10): real tokens would be cut off, first: 10 {inv[10]!r}"):
        check(side(), (sp, sc))


def test_extra_ids_of_a_longer_tokenizer_are_allowed_below_the_shared_rows():
    tp, tc = side(vocab_multiple=16)
    sp, sc = side(vocab_multiple=16)
    sp.tokenizer.add_tokens(["extra"])
    shared = check_vocab_rows(tp, sp, tc, sc)
    assert shared.note == "same vocabulary size; ids 13..13 exist only in the student tokenizer"
    assert check((tp, tc), (sp, sc)) == shared


def test_every_failure_is_reported_at_once():
    with raises("[chat template]", "[image layout]"):
        check(side(template="llava_v1"), side(vision=VisionSpec(image_size=48)))
