"""Benchmark loaders and scorers on tiny fixture files in LLaVA-1.5's formats; every score is worked out by hand."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from aligntI.data.records import DataError
from aligntI.eval.benchmarks import (
    BENCHMARKS,
    LETTER_PROMPT,
    SHORT_ANSWER_PROMPT,
    BenchItem,
    gqa,
    load_benchmark,
    mmbench,
    mme,
    pope,
    sqa_img,
    textvqa,
    title_of,
)
from aligntI.eval.benchmarks.gqa import parse_gqa_answer
from aligntI.eval.benchmarks.mmbench import extract_option_letter
from aligntI.eval.benchmarks.mme import parse_mme_answer
from aligntI.eval.benchmarks.pope import parse_pope_answer
from aligntI.eval.benchmarks.sqa_img import parse_sqa_letter
from aligntI.eval.benchmarks.textvqa import normalize_vqa_answer, vqa_soft_score
from aligntI.eval.scoring import BenchScore, format_markdown, score_benchmark, score_table

SUFFIX = "\n" + SHORT_ANSWER_PROMPT


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def tiny_image(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def png_b64(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def by_id(items):
    return {it.id: it for it in items}


# ------------------------------------------------------------------------------------------------ registry


def test_registry():
    assert list(BENCHMARKS) == ["gqa", "sqa_img", "textvqa", "pope", "mme", "mmbench"]  # the table's column order
    modules = (gqa, sqa_img, textvqa, pope, mme, mmbench)
    assert [m.BENCHMARK for m in modules] == list(BENCHMARKS.values())  # each module holds its own entry
    assert all(name == bench.name for name, bench in BENCHMARKS.items())
    assert [b.title for b in BENCHMARKS.values()] == ["GQA", "SQA-IMG", "TextVQA", "POPE-F1", "MME-P/20", "MMB-dev"]
    assert [name for name, b in BENCHMARKS.items() if not b.folders] == ["mmbench"]  # images and answers in its TSV
    assert title_of("mme") == "MME-P/20" and title_of("vqav2") == "vqav2"


# ------------------------------------------------------------------------------------- EvalAI normalisation


@pytest.mark.parametrize("raw, expected", [
    ("Two Dogs", "2 dogs"),            # lowercase, number word -> digit
    ("The cat.", "cat"),               # article dropped, trailing period removed
    ("An apple", "apple"),
    ("Hello, World!", "hello world"),  # comma deleted, "!" touches no space -> space -> collapsed
    ("1,000", "1000"),                 # the comma between digits disappears
    ("1,000-2", "1000 2"),             # comma gone; "-" touches no space -> replaced by a space
    ("3.5", "3.5"),                    # period followed by a digit stays
    ("yes - no", "yes no"),            # "-" touches a space -> deleted
    ("e-mail", "e mail"),
    ("none", "0"),
    ("dont", "don't"),                 # missing apostrophe restored
    ("isnt it?", "isn't it"),          # "?" deleted
    ("Denny's", "denny 's"),           # "'s" split off
    ("CAT\n", "cat"),
])
def test_evalai_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_ten_answer_soft_score_by_hand():
    answers = ["cat"] * 2 + ["dog"] * 8
    # "cat" (2 of 10 humans): leaving out one of the 2 cat-humans leaves 1 match -> 1/3; leaving out one of
    # the 8 others leaves 2 matches -> 2/3. Mean: (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6
    assert vqa_soft_score("cat", answers) == pytest.approx(0.6)
    # "dog" (8 of 10): every leave-one-out keeps >= 7 matches -> min(1, 7/3) = 1 -> 1.0
    assert vqa_soft_score("The dog.", answers) == pytest.approx(1.0)
    assert vqa_soft_score("bird", answers) == 0.0
    # 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3;  3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9;  4 of 10: all >= 3 -> 1.0
    assert vqa_soft_score("x", ["x"] + ["y"] * 9) == pytest.approx(0.3)
    assert vqa_soft_score("x", ["x"] * 3 + ["y"] * 7) == pytest.approx(0.9)
    assert vqa_soft_score("x", ["x"] * 4 + ["y"] * 6) == pytest.approx(1.0)
    # normalisation on both sides: "two" and "2" are the same answer
    assert vqa_soft_score("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)


# ------------------------------------------------------------------------------------------------ parsing


def test_answer_parsers():
    assert parse_gqa_answer(" Yes. ") == "yes" and parse_gqa_answer("The table..") == "the table"
    # ScienceQA: letter alone, letter + ". ", or one "The answer is X."; the letter must be a choice
    assert parse_sqa_letter("B", 3) == "B"
    assert parse_sqa_letter("A. yes", 2) == "A"
    assert parse_sqa_letter("The answer is C.", 3) == "C"
    assert parse_sqa_letter("B.", 3) is None          # LLaVA's rule: "B." alone is neither form
    assert parse_sqa_letter("(B)", 3) is None
    assert parse_sqa_letter("E", 3) is None           # not one of 3 choices
    assert parse_sqa_letter("the cat", 3) is None
    # POPE: first sentence, commas removed, "No"/"no"/"not" as a word -> no
    assert parse_pope_answer("Yes, there is a dog.") == "yes"
    assert parse_pope_answer("No.") == "no"
    assert parse_pope_answer("There is not a cat") == "no"
    assert parse_pope_answer("No, there is no cat.") == "no"
    assert parse_pope_answer("NO") == "yes"           # case-sensitive, as eval_pope.py
    assert parse_pope_answer("I see a dog. No cat") == "yes"  # only the first sentence counts
    assert parse_pope_answer("Nothing") == "yes"      # "Nothing" is not the word "no"
    # MME: exact yes/no, else the first four characters
    assert parse_mme_answer("Yes") == "yes" and parse_mme_answer("no") == "no"
    assert parse_mme_answer("No, it is not.") == "no"
    assert parse_mme_answer("yes.") == "yes"
    assert parse_mme_answer("not sure") == "no"       # "not " contains "no"
    assert parse_mme_answer("There are two") == "other"
    assert parse_mme_answer("I think yes") == "other"  # "yes" is not in "i th"


def test_mmbench_letter_extraction():
    options = {"A": "cat", "B": "dog", "C": "bird"}
    assert extract_option_letter("B", options) == "B"
    assert extract_option_letter("B.", options) == "B"
    assert extract_option_letter("(B) dog", options) == "B"
    assert extract_option_letter("The answer is B: dog", options) == "B"
    assert extract_option_letter("dog", options) == "B"           # the option text
    assert extract_option_letter("Bird", options) == "C"          # case-insensitive
    assert extract_option_letter("A or B", options) is None       # two letters, no option text
    assert extract_option_letter("a cat and a dog", options) is None  # two option texts
    assert extract_option_letter("D", options) is None            # not an option here
    assert extract_option_letter("horse", options) is None


# ---------------------------------------------------------------------------------------------------- GQA


def gqa_fixture(tmp_path):
    img = tmp_path / "gqa_images"
    for name in ("n1.jpg", "n2.jpg"):
        tiny_image(img / name)
    data = write_jsonl(tmp_path / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201", "image": "n1.jpg", "text": "Is it overcast?" + SUFFIX, "category": "default"},
        {"question_id": "202", "image": "n1.jpg", "text": "Which side is the cup on?", "category": "default"},
        {"question_id": "203", "image": "n2.jpg", "text": "What color is the car?" + SUFFIX},
        {"question_id": "204", "image": "n2.jpg", "text": "What is on the table?" + SUFFIX},
    ])
    ann = write_json(tmp_path / "testdev_balanced_questions.json", {
        "201": {"answer": "yes", "types": {"structural": "verify"}},
        "202": {"answer": "left", "types": {"structural": "query"}},
        "203": {"answer": "black", "types": {"structural": "query"}},
        "204": {"answer": "table", "types": {"structural": "query"}},
        "999": {"answer": "unused"},
    })
    items = load_benchmark("gqa", data, images=img, annotations=ann)
    preds = {"201": "Yes.", "202": "Left", "203": "blue", "204": "the table."}
    return items, preds


def test_gqa_load_and_score(tmp_path):
    items, preds = gqa_fixture(tmp_path)
    item = by_id(items)
    assert [it.id for it in items] == ["201", "202", "203", "204"]
    # the suffix appended once: present already in 201, added to 202
    assert item["201"].question == "<image>\nIs it overcast?\n" + SHORT_ANSWER_PROMPT
    assert item["202"].question == "<image>\nWhich side is the cup on?\n" + SHORT_ANSWER_PROMPT
    assert all(it.question.count(SHORT_ANSWER_PROMPT) == 1 for it in items)
    assert item["201"].image == str(tmp_path / "gqa_images" / "n1.jpg")
    assert item["201"].reference == "yes" and item["201"].category == "verify"
    r, g, b = item["201"].open_image().getpixel((0, 0))  # a JPEG: red give or take compression
    assert r > 240 and g < 15 and b < 15

    s = score_benchmark("gqa", items, preds)
    # "Yes." -> "yes" right; "Left" -> "left" right; "blue" != "black"; "the table." -> "the table" != "table"
    # (GQA is exact match: no article removal). 2 / 4 = 50 %
    assert s.score == pytest.approx(50.0) and s.n == 4
    assert s.per_sample["204"] == {"parsed": "the table", "correct": False}
    # verify: 1/1 right; query: 1/3 right
    assert s.metrics["per_category"] == pytest.approx({"query": 100 / 3, "verify": 100.0})
    json.dumps(s.to_json())
    json.dumps([it.to_json() for it in items])

    short = load_benchmark("gqa", tmp_path / "llava_gqa_testdev_balanced.jsonl", images=tmp_path / "gqa_images",
                           annotations=tmp_path / "testdev_balanced_questions.json", max_samples=2)
    assert [it.id for it in short] == ["201", "202"]


def test_gqa_inline_reference_needs_no_annotations(tmp_path):
    tiny_image(tmp_path / "a.jpg")
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "image": "a.jpg", "text": "Q?", "answer": "no"}])
    (item,) = load_benchmark("gqa", data)  # images default to the data file's folder
    assert item.id == "7" and item.reference == "no" and item.image == str(tmp_path / "a.jpg")
    assert item.meta["question_id"] == 7


# ---------------------------------------------------------------------------------------------- ScienceQA


def sqa_record(pid, human, image=True):
    rec = {"id": pid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "Z"}]}
    if image:
        rec["image"] = f"{pid}/image.png"
    return rec


def sqa_fixture(tmp_path):
    root = tmp_path / "scienceqa"
    for pid in "234567":
        tiny_image(root / "images" / "test" / pid / "image.png")
    data = write_json(root / "llava_test_CQM-A.json", [
        sqa_record("1", "Which word is a noun?\nA. run\nB. dog", image=False),  # text-only: not in SQA-IMG
        sqa_record("2", "<image>\nContext: A map.\nWhich state is north?\nA. Ohio\nB. Maine\nC. Texas"),
        sqa_record("3", "<image>\nIs this true?\nA. yes\nB. no"),
        sqa_record("4", "<image>\nPick one.\nA. w\nB. x\nC. y\nD. z"),
        sqa_record("5", "<image>\nWhich is hot?\nA. ice\nB. snow\nC. fire"),
        sqa_record("6", "<image>\nWhich is wet?\nA. sand\nB. water\nC. rock"),
        sqa_record("7", "<image>\nWhich animal?\nA. cat\nB. dog\nC. cow"),
    ])
    problems = write_json(root / "problems.json", {
        "1": {"answer": 1, "choices": ["run", "dog"], "subject": "language science"},
        "2": {"answer": 1, "choices": ["Ohio", "Maine", "Texas"], "subject": "social science"},
        "3": {"answer": 0, "choices": ["yes", "no"], "subject": "natural science"},
        "4": {"answer": 3, "choices": ["w", "x", "y", "z"], "subject": "natural science"},
        "5": {"answer": 2, "choices": ["ice", "snow", "fire"], "subject": "natural science"},
        "6": {"answer": 1, "choices": ["sand", "water", "rock"], "subject": "natural science"},
        "7": {"answer": 0, "choices": ["cat", "dog", "cow"], "subject": "natural science"},
    })
    items = load_benchmark("sqa_img", data, images=root / "images" / "test", annotations=problems)
    preds = {"2": "B", "3": "A. yes", "4": "D.", "5": "The answer is C.", "6": "E", "7": "the cat"}
    return items, preds


def test_sqa_img_load_and_score(tmp_path):
    items, preds = sqa_fixture(tmp_path)
    item = by_id(items)
    assert [it.id for it in items] == ["2", "3", "4", "5", "6", "7"]  # "1" has no image
    assert item["2"].question == ("<image>\nContext: A map.\nWhich state is north?\nA. Ohio\nB. Maine\nC. Texas\n"
                                  + LETTER_PROMPT)
    assert item["2"].reference == "B" and item["4"].reference == "D" and item["2"].category == "social science"
    assert item["2"].meta["n_choices"] == 3
    assert item["2"].image == str(tmp_path / "scienceqa" / "images" / "test" / "2" / "image.png")

    s = score_benchmark("sqa_img", items, preds)
    # right: 2 "B", 3 "A. yes", 5 "The answer is C."; wrong: 4 "D." (not a form LLaVA reads),
    # 6 "E" (only 3 choices), 7 "the cat" (not a letter). 3 / 6 = 50 %, 3 unparsed
    assert s.score == pytest.approx(50.0)
    assert s.metrics["unparsed"] == 3 and s.metrics["correct"] == 3
    assert s.per_sample["4"] == {"parsed": None, "correct": False}
    # natural science: 3, 5 right of 3, 4, 5, 6, 7 -> 2/5; social science: 1/1
    assert s.metrics["per_category"] == pytest.approx({"natural science": 40.0, "social science": 100.0})


def test_sqa_reference_from_gpt_turn_and_max_samples(tmp_path):
    tiny_image(tmp_path / "9" / "image.png")
    rec = sqa_record("9", "<image>\nWhich?\nA. up\nB. down\n" + LETTER_PROMPT)
    rec["conversations"][1]["value"] = "B"
    data = write_json(tmp_path / "sqa.json", [sqa_record("8", "Q\nA. a\nB. b", image=False), rec, rec | {"id": "10"}])
    items = load_benchmark("sqa_img", data, max_samples=1)
    assert len(items) == 1 and items[0].id == "9" and items[0].reference == "B"
    assert items[0].question.count(LETTER_PROMPT) == 1  # already there: not appended again


# ------------------------------------------------------------------------------------------------ TextVQA


def textvqa_fixture(tmp_path):
    img = tmp_path / "train_images"
    tiny_image(img / "img1.jpg")
    tiny_image(img / "img2.jpg")
    data = write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "img1", "image": "img1.jpg", "category": "default",
         "text": "What brand is it?\nReference OCR token: Acme, Co\n" + SHORT_ANSWER_PROMPT},
        {"question_id": "img1", "image": "img1.jpg", "text": "What color is the sign?", "category": "default"},
        {"question_id": "img2", "image": "img2.jpg", "text": "How many cups?" + SUFFIX, "category": "default"},
        # as in LLaVA's file for an image without OCR tokens: the line is there, empty
        {"question_id": "img3", "image": "img2.jpg", "category": "default",
         "text": "Whats the lowest number?\nReference OCR token: \n" + SHORT_ANSWER_PROMPT, "answers": ["1"] * 10},
    ])
    ann = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 101, "image_id": "img1", "question": "what brand is it?",
         "answers": ["acme"] * 3 + ["acme co"] * 7, "ocr_tokens": ["Acme", "Co"]},
        {"question_id": 102, "image_id": "img1", "question": "what color is the sign?",
         "answers": ["red"] * 10, "ocr_tokens": ["RED", "sign"]},
        {"question_id": 103, "image_id": "img2", "question": "how many cups?",
         "answers": ["2"] * 2 + ["3"] * 8, "ocr_tokens": []},
    ]})
    items = load_benchmark("textvqa", data, images=img, annotations=ann)
    preds = {"img1#1": "Acme", "img1#2": "Red.", "img2": "two", "img3": "One"}
    return items, preds


def test_textvqa_load_and_score(tmp_path):
    items, preds = textvqa_fixture(tmp_path)
    item = by_id(items)
    assert list(item) == ["img1#1", "img1#2", "img2", "img3"]  # the image id repeats in LLaVA's file
    # a complete LLaVA prompt is kept as it is
    assert item["img1#1"].question == ("<image>\nWhat brand is it?\nReference OCR token: Acme, Co\n"
                                       + SHORT_ANSWER_PROMPT)
    # no OCR line: inserted before the suffix, tokens joined by ", "; an empty token list gives the empty line
    assert item["img1#2"].question == ("<image>\nWhat color is the sign?\nReference OCR token: RED, sign\n"
                                       + SHORT_ANSWER_PROMPT)
    assert item["img2"].question == "<image>\nHow many cups?\nReference OCR token: \n" + SHORT_ANSWER_PROMPT
    assert item["img1#2"].meta == {"question_id": "img1", "textvqa_question_id": 102}
    assert item["img3"].question == ("<image>\nWhats the lowest number?\nReference OCR token: \n"
                                     + SHORT_ANSWER_PROMPT)

    s = score_benchmark("textvqa", items, preds)
    # "Acme" -> "acme", 3 of 10 humans -> (3 * 2/3 + 7 * 1) / 10 = 0.9
    # "Red." -> "red", 10 of 10 -> 1.0
    # "two" -> "2", 2 of 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    # "One" -> "1", 10 of 10 (its own answers, no annotation needed) -> 1.0
    # mean (0.9 + 1.0 + 0.6 + 1.0) / 4 = 3.5 / 4 = 87.5 %
    assert s.score == pytest.approx(87.5)
    assert s.per_sample["img2"] == {"parsed": "2", "score": pytest.approx(0.6)}


# --------------------------------------------------------------------------------------------------- POPE

POPE_QUESTIONS = {  # split -> [(image, object, label)]
    "adversarial": [("p1.jpg", "dog", "yes"), ("p1.jpg", "cat", "yes"), ("p2.jpg", "car", "no"),
                    ("p2.jpg", "bus", "no")],
    "random": [("p1.jpg", "dog", "yes"), ("p1.jpg", "sink", "no"), ("p2.jpg", "car", "yes"),
               ("p2.jpg", "kite", "no")],
    "popular": [("p1.jpg", "dog", "yes"), ("p2.jpg", "chair", "no")],
}


def pope_fixture(tmp_path):
    img, ann = tmp_path / "val2014", tmp_path / "coco"
    tiny_image(img / "p1.jpg")
    tiny_image(img / "p2.jpg")
    ann.mkdir()
    questions = []
    for k, (split, rows) in enumerate(POPE_QUESTIONS.items()):
        write_jsonl(ann / f"coco_pope_{split}.json", [
            {"question_id": n, "image": im, "text": f"Is there a {obj} in the image?", "label": label}
            for n, (im, obj, label) in enumerate(rows, 1)])
        questions += [{"question_id": k * 10_000_000 + n, "image": im, "category": split,
                       "text": f"Is there a {obj} in the image?" + SUFFIX} for n, (im, obj, _) in enumerate(rows, 1)]
    data = write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    items = load_benchmark("pope", data, images=img, annotations=ann)
    preds = dict(zip([it.id for it in items], [
        "Yes, there is a dog.", "No.", "There is not a cat", "No, there is no cat.",  # adversarial
        "yes", "Yes", "NO", "I don't know. no",                                      # random
        "yes", "no",                                                                 # popular
    ]))
    return items, preds


def test_pope_load_and_score(tmp_path):
    items, preds = pope_fixture(tmp_path)
    assert [it.id for it in items][:5] == ["1", "2", "3", "4", "10000001"]
    first = items[0]
    assert first.category == "adversarial" and first.reference == "yes" and first.meta["label_line"] == 1
    assert first.question == "<image>\nIs there a dog in the image?\n" + SHORT_ANSWER_PROMPT
    assert by_id(items)["20000002"].reference == "no"

    s = score_benchmark("pope", items, preds)
    adv, rnd, pop = (s.metrics["splits"][k] for k in ("adversarial", "random", "popular"))
    # adversarial: labels yes yes no no; read as yes no no no -> TP 1, FN 1, TN 2, FP 0
    #   precision 1/1, recall 1/2, F1 = 2 * 1 * 0.5 / 1.5 = 2/3; accuracy 3/4; yes-ratio 1/4
    assert (adv["tp"], adv["fp"], adv["tn"], adv["fn"]) == (1, 0, 2, 1)
    assert adv["f1"] == pytest.approx(200 / 3) and adv["accuracy"] == pytest.approx(75.0)
    assert adv["precision"] == pytest.approx(100.0) and adv["recall"] == pytest.approx(50.0)
    assert adv["yes_ratio"] == pytest.approx(25.0)
    # random: labels yes no yes no; "NO" (capitals) and "I don't know. no" (first sentence) both read yes
    #   -> all yes: TP 2, FP 2; precision 1/2, recall 1, F1 = 2 * 0.5 * 1 / 1.5 = 2/3; accuracy 1/2; yes-ratio 1
    assert (rnd["tp"], rnd["fp"], rnd["tn"], rnd["fn"]) == (2, 2, 0, 0)
    assert rnd["f1"] == pytest.approx(200 / 3) and rnd["yes_ratio"] == pytest.approx(100.0)
    # popular: both right, F1 = 1
    assert pop["f1"] == pytest.approx(100.0)
    # reported: mean F1 = (2/3 + 2/3 + 1) / 3 = 7/9 -> 77.78 %
    assert s.score == pytest.approx(700 / 9)
    assert s.per_sample["10000003"] == {"parsed": "yes", "correct": True}


def test_pope_label_file_out_of_step(tmp_path):
    pope_fixture(tmp_path)
    path = tmp_path / "coco" / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0]] + lines[2:]) + "\n")  # swap the first two labels
    with pytest.raises(ValueError, match=r"10000001.*out of step"):
        load_benchmark("pope", tmp_path / "llava_pope_test.jsonl", images=tmp_path / "val2014",
                       annotations=tmp_path / "coco")


# ---------------------------------------------------------------------------------------------------- MME


def mme_fixture(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # "artwork" has images/ + questions_answers_YN/; "count" and "code_reasoning" keep both side by side
    tiny_image(root / "artwork" / "images" / "a1.jpg")
    tiny_image(root / "artwork" / "images" / "a2.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "a1.txt").write_text(
        "Is this artwork by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork by Dali?  Please answer yes or no.\tNo\n")  # the release has double spaces too
    (root / "artwork" / "questions_answers_YN" / "a2.txt").write_text(
        "Is this a painting? Please answer yes or no.\tYes\nIs this a statue? Please answer yes or no.\tNo\n")
    tiny_image(root / "count" / "c1.jpg")
    (root / "count" / "c1.txt").write_text(
        "Are there two dogs? Please answer yes or no.\tYes\nAre there three dogs? Please answer yes or no.\tNo\n")
    tiny_image(root / "code_reasoning" / "0001.png")
    (root / "code_reasoning" / "0001.txt").write_text(
        "Is the output 1? Please answer yes or no.\tYes\nIs the output 2? Please answer yes or no.\tNo\n")

    def q(qid, cat, text):
        return {"question_id": qid, "image": qid, "text": text + SUFFIX, "category": cat}

    data = write_jsonl(tmp_path / "llava_mme.jsonl", [
        q("artwork/images/a1.jpg", "artwork", "Is this artwork by Monet?"),
        q("artwork/images/a1.jpg", "artwork", "Is this artwork by Dali?"),
        q("artwork/images/a2.jpg", "artwork", "Is this a painting?"),
        q("artwork/images/a2.jpg", "artwork", "Is this a statue?"),
        q("count/c1.jpg", "count", "Are there two dogs?"),
        q("count/c1.jpg", "count", "Are there three dogs?"),
        q("code_reasoning/0001.png", "code_reasoning", "Is the output 1?"),
        q("code_reasoning/0001.png", "code_reasoning", "Is the output 2?"),
    ])
    items = load_benchmark("mme", data, images=root, annotations=root)
    preds = dict(zip([it.id for it in items], [
        "Yes", "No, it is not.",    # a1: yes right, no right           -> image right
        "yes.", "Yes",              # a2: yes right, "Yes" for a no     -> image wrong
        "There are two", "no",      # c1: "other" (wrong), no right     -> image wrong
        "Yes", "not sure",          # code: yes right, "not " -> no     -> image right
    ]))
    return items, preds


def test_mme_load_and_score(tmp_path):
    items, preds = mme_fixture(tmp_path)
    ids = [it.id for it in items]
    assert ids[:2] == ["artwork/images/a1.jpg#1", "artwork/images/a1.jpg#2"]  # each image is asked twice
    assert [it.reference for it in items] == ["yes", "no"] * 4
    assert items[0].meta["image_key"] == "artwork/images/a1.jpg" and items[0].category == "artwork"
    assert items[0].question == "<image>\nIs this artwork by Monet?\n" + SHORT_ANSWER_PROMPT
    assert items[4].image == str(tmp_path / "MME_Benchmark_release_version" / "count" / "c1.jpg")

    s = score_benchmark("mme", items, preds)
    cats = s.metrics["categories"]
    # artwork: 3 of 4 answers right -> acc 75; 1 of 2 images with both right -> acc+ 50; score 125
    assert cats["artwork"]["acc"] == pytest.approx(75.0) and cats["artwork"]["acc_plus"] == pytest.approx(50.0)
    assert cats["artwork"]["score"] == pytest.approx(125.0)
    # count: 1 of 2 -> acc 50; no image fully right -> acc+ 0; score 50
    assert cats["count"]["score"] == pytest.approx(50.0)
    # perception = 125 + 50 = 175 (of 2000), reported 175 / 20 = 8.75
    assert s.metrics["perception"] == pytest.approx(175.0)
    assert s.score == pytest.approx(8.75)
    # cognition: code_reasoning 100 + 100 = 200
    assert s.metrics["cognition"] == pytest.approx(200.0)
    assert s.metrics["other_answers"] == 1 and s.metrics["unpaired_images"] == 0
    assert "existence" in s.metrics["missing_perception"]
    assert s.per_sample[ids[4]] == {"parsed": "other", "correct": False}


# ------------------------------------------------------------------------------------------------ MMBench

MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
RED, GREEN = (255, 0, 0), (0, 255, 0)


def mmbench_fixture(tmp_path, rows=None):
    rows = rows if rows is not None else [
        [0, "What animal?", "Look closely.", "cat", "dog", "bird", "fish", "B", "attr", "perception",
         png_b64(RED)],
        [1, "Which color?", "", "red", "green", "blue", "", "C", "color", "perception", png_b64(GREEN)],
        # CircularEval copies: options rotated, answer letter moved with them; the image cell may name a row
        [1_000_000, "What animal?", "Look closely.", "dog", "bird", "fish", "cat", "A", "attr", "perception", "0"],
        [1_000_001, "Which color?", "", "green", "blue", "red", "", "B", "color", "perception", png_b64(GREEN)],
    ]
    path = tmp_path / "mmbench_dev_20230712.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(MMB_COLUMNS)
        writer.writerows(rows)
    return path


def test_mmbench_load_and_circular_score(tmp_path):
    items = load_benchmark("mmbench", mmbench_fixture(tmp_path))
    item = by_id(items)
    assert list(item) == ["0", "1", "1000000", "1000001"]
    assert item["0"].question == ("<image>\nLook closely.\nWhat animal?\nA. cat\nB. dog\nC. bird\nD. fish\n"
                                  + LETTER_PROMPT)
    # no hint, and the options stop at the first empty one
    assert item["1"].question == "<image>\nWhich color?\nA. red\nB. green\nC. blue\n" + LETTER_PROMPT
    assert item["1"].meta["options"] == {"A": "red", "B": "green", "C": "blue"}
    assert item["1000000"].meta["group"] == 0 and item["1000001"].meta["group"] == 1
    assert item["0"].image is None and item["0"].open_image().getpixel((1, 1)) == RED
    assert item["1000000"].open_image().getpixel((1, 1)) == RED  # image cell "0" -> row 0's image
    assert item["1"].open_image().mode == "RGB"
    record = item["0"].to_json()
    assert "image_bytes" not in record and json.dumps(record)
    assert BenchItem.from_json(json.loads(json.dumps(record))).meta["options"]["B"] == "dog"

    preds = {"0": "B", "1000000": "(A) dog", "1": "blue", "1000001": "C."}
    s = score_benchmark("mmbench", items, preds)
    # group 0: "B" right, "(A) dog" right -> counts; group 1: "blue" -> C right, "C." wrong (answer B) -> fails
    # CircularEval 1 / 2 = 50 %; vanilla over the original rows 0 and 1: 2 / 2 = 100 %
    assert s.metrics["circular"] is True
    assert s.score == pytest.approx(50.0) and s.metrics["vanilla_accuracy"] == pytest.approx(100.0)
    assert s.metrics["groups"] == 2
    assert s.metrics["per_category"] == pytest.approx({"attr": 100.0, "color": 0.0})
    assert s.per_sample["1"] == {"parsed": "C", "correct": True, "group": 1}

    # without the rotated copies: plain accuracy
    plain = load_benchmark("mmbench", tmp_path / "mmbench_dev_20230712.tsv", max_samples=2)
    s2 = score_benchmark("mmbench", plain, preds)
    assert s2.metrics["circular"] is False and s2.score == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------- errors


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'vqav2'"):
        load_benchmark("vqav2", tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="nope.jsonl"):
        load_benchmark("gqa", tmp_path / "nope.jsonl")
    tiny_image(tmp_path / "a.jpg")
    data = write_jsonl(tmp_path / "q.jsonl", [{"question_id": "q1", "image": "a.jpg", "text": "Q?"}])
    with pytest.raises(DataError, match="missing.json"):
        load_benchmark("gqa", data, annotations=tmp_path / "missing.json")
    with pytest.raises(DataError, match="image folder"):
        load_benchmark("gqa", data, images=tmp_path / "no_images")
    with pytest.raises(ValueError, match="max_samples"):
        load_benchmark("gqa", data, max_samples=0)
    # a question without a reference, and no annotations
    with pytest.raises(ValueError, match=r"'q1'.*no reference"):
        load_benchmark("gqa", data)
    # the annotations lack the question
    ann = write_json(tmp_path / "ann.json", {"other": {"answer": "yes"}})
    with pytest.raises(ValueError, match=r"'q1'.*not in the annotations"):
        load_benchmark("gqa", data, annotations=ann)
    # references of the wrong shape
    bad_tv = write_jsonl(tmp_path / "tv.jsonl", [{"question_id": "t1", "image": "a.jpg", "text": "Q?",
                                                  "answers": ["a"] * 9}])
    with pytest.raises(ValueError, match=r"'t1'.*list of 10"):
        load_benchmark("textvqa", bad_tv)
    bad_pope = write_jsonl(tmp_path / "pope.jsonl", [{"question_id": 5, "image": "a.jpg", "text": "Q?",
                                                      "category": "random", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"'5'.*'yes' or 'no'"):
        load_benchmark("pope", bad_pope)
    no_split_file = write_jsonl(tmp_path / "pope2.jsonl", [{"question_id": 6, "image": "a.jpg", "text": "Q?",
                                                            "category": "popular"}])
    (tmp_path / "coco").mkdir()
    with pytest.raises(DataError, match="coco_pope_popular.json"):
        load_benchmark("pope", no_split_file, annotations=tmp_path / "coco")
    bad_gqa = write_jsonl(tmp_path / "g.jsonl", [{"question_id": "g1", "image": "a.jpg", "text": "Q?",
                                                  "answer": ["yes"]}])
    with pytest.raises(ValueError, match=r"'g1'.*non-empty string"):
        load_benchmark("gqa", bad_gqa)
    no_image = write_jsonl(tmp_path / "ni.jsonl", [{"question_id": "g2", "text": "Q?", "answer": "yes"}])
    with pytest.raises(ValueError, match=r"'g2'.*no 'image'"):
        load_benchmark("gqa", no_image)
    # files that are not UTF-8, or hold no questions: data errors naming the file
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"question_id": "g3", "image": "a.jpg", "text": "caf\xe9?", "answer": "yes"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl: not valid UTF-8 at byte 52"):
        load_benchmark("gqa", latin1)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: holds no gqa questions"):
        load_benchmark("gqa", tmp_path / "empty.jsonl")


def test_loader_errors_per_benchmark(tmp_path):
    # ScienceQA: a problem missing from problems.json; an answer index outside the choices
    tiny_image(tmp_path / "3" / "image.png")
    sqa = write_json(tmp_path / "sqa.json", [sqa_record("3", "<image>\nQ?\nA. x\nB. y")])
    with pytest.raises(ValueError, match=r"'3'.*not in problems.json"):
        load_benchmark("sqa_img", sqa, annotations=write_json(tmp_path / "problems.json", {"4": {"answer": 0}}))
    with pytest.raises(ValueError, match=r"'3'.*option letter or index"):
        load_benchmark("sqa_img", sqa, annotations=write_json(tmp_path / "p2.json",
                                                               {"3": {"answer": 5, "choices": ["x", "y"]}}))
    # MME: the ground-truth file is missing / does not hold the question
    root = tmp_path / "MME"
    tiny_image(root / "count" / "c1.jpg")
    mme = write_jsonl(tmp_path / "mme.jsonl", [{"question_id": "count/c1.jpg", "image": "count/c1.jpg",
                                                "text": "Are there two dogs?", "category": "count"}])
    with pytest.raises(DataError, match="c1.txt"):
        load_benchmark("mme", mme, images=root, annotations=root)
    (root / "count" / "c1.txt").write_text("Are there three dogs? Please answer yes or no.\tNo\n")
    with pytest.raises(ValueError, match=r"'count/c1.jpg'.*not in the ground-truth"):
        load_benchmark("mme", mme, images=root, annotations=root)
    # MMBench: an answer that is not one of the options; an image that is not an image
    bad = mmbench_fixture(tmp_path, rows=[[3, "Q?", "", "x", "y", "", "", "E", "c", "l2", png_b64(RED)]])
    with pytest.raises(ValueError, match=r"'3'.*one of the options"):
        load_benchmark("mmbench", bad)
    bad = mmbench_fixture(tmp_path, rows=[[4, "Q?", "", "x", "y", "", "", "A", "c", "l2", "bm90IGFuIGltYWdl"]])
    with pytest.raises(ValueError, match=r"'4'.*not a base64-encoded image"):
        load_benchmark("mmbench", bad)


def test_scoring_errors(tmp_path):
    items, preds = gqa_fixture(tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'vizwiz'"):
        score_benchmark("vizwiz", items, preds)
    with pytest.raises(ValueError, match=r"no prediction for sample '203'"):
        score_benchmark("gqa", items, {k: v for k, v in preds.items() if k != "203"})
    with pytest.raises(ValueError, match="no samples"):
        score_benchmark("gqa", [], {})
    wrong = [BenchItem(id="x", question="q", image=None, reference=["a"] * 3)]
    with pytest.raises(ValueError, match=r"'x'.*10 answers"):
        score_benchmark("textvqa", wrong, {"x": "a"})


# ------------------------------------------------------------------------------------------------- table


def all_scores(tmp_path):
    fixtures = {"gqa": gqa_fixture, "sqa_img": sqa_fixture, "textvqa": textvqa_fixture, "pope": pope_fixture,
                "mme": mme_fixture, "mmbench": None}
    scores = {}
    for name, build in fixtures.items():
        sub = tmp_path / name
        sub.mkdir()
        if build is None:
            items = load_benchmark("mmbench", mmbench_fixture(sub))
            preds = {"0": "B", "1000000": "(A) dog", "1": "blue", "1000001": "C."}
        else:
            items, preds = build(sub)
        scores[name] = score_benchmark(name, items, preds)
    return scores


def test_score_table_and_markdown(tmp_path):
    scores = all_scores(tmp_path)
    table = score_table(scores)
    # GQA 50, SQA-IMG 50, TextVQA 87.5, POPE 700/9, MME 175/20 = 8.75, MMB 50 (all worked out above)
    # sum = 50 + 50 + 87.5 + 8.75 + 50 + 700/9 = 246.25 + 77.78 = 324.03; average = sum / 6 = 54.00
    assert table["benchmarks"] == pytest.approx({"gqa": 50.0, "sqa_img": 50.0, "textvqa": 87.5,
                                                 "pope": 700 / 9, "mme": 8.75, "mmbench": 50.0})
    assert table["average"] == pytest.approx((246.25 + 700 / 9) / 6)
    assert table["missing"] == []
    md = format_markdown(scores, "tiny|model")
    lines = md.splitlines()
    assert lines[0] == "| Model | GQA | SQA-IMG | TextVQA | POPE-F1 | MME-P/20 | MMB-dev | Avg |"
    assert lines[2] == "| tiny\\|model | 50.0 | 50.0 | 87.5 | 77.8 | 8.8 | 50.0 | 54.0 |"
    assert "adversarial 66.67, popular 100.00, random 66.67" in md
    assert "perception 175.0 / 2000" in md and "CircularEval over 2 questions" in md

    del scores["sqa_img"], scores["mme"]
    partial = score_table(scores)
    assert partial["average"] is None and partial["missing"] == ["sqa_img", "mme"]
    md = format_markdown(scores, "m")
    assert md.splitlines()[2] == "| m | 50.0 | – | 87.5 | 77.8 | – | 50.0 | – |"
    assert "missing: SQA-IMG, MME-P/20" in md

    hand_made = {"gqa": BenchScore("gqa", 61.0, {}, 10)}
    assert "- GQA: 61.00% exact match (n=10)" in format_markdown(hand_made, "m")
    with pytest.raises(ValueError, match="unknown benchmark 'vqav2'"):
        score_table({"vqav2": BenchScore("vqav2", 1.0, {}, 1)})
