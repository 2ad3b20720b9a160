"""ScienceQA test, image subset (SQA-IMG): LLaVA-1.5's letter prompt and ``eval_science_qa.py``'s reading."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aligntI.data.records import DataError
from aligntI.eval.benchmarks.common import (
    IMAGE_TOKEN,
    LETTER_PROMPT,
    BenchItem,
    Benchmark,
    BenchScore,
    bad_sample,
    existing,
    fail,
    image_path,
    inline_reference,
    pct,
    per_category,
    raw_id,
    read_json,
    read_records,
    unique_ids,
    user_turn,
    with_suffix,
)

SQA_OPTIONS = ("A", "B", "C", "D", "E")


_OPTION_LINE = re.compile(r"^([A-E])\. ")


def _count_option_lines(text: str) -> int:
    """Options are the last lines of a LLaVA ScienceQA prompt: ``A. ...``, ``B. ...`` in order."""
    lines = text.strip().split("\n")
    if lines and lines[-1].strip() == LETTER_PROMPT:
        lines.pop()
    letters = []
    for line in reversed(lines):
        m = _OPTION_LINE.match(line)
        if not m:
            break
        letters.append(m.group(1))
    letters.reverse()
    return len(letters) if letters == list(SQA_OPTIONS[: len(letters)]) else 0


def _sqa_letter(value: Any, n_choices: int, where: Path, sample: str) -> str:
    if isinstance(value, bool):  # bool is an int: never an answer index
        value = None
    if isinstance(value, int) and 0 <= value < min(n_choices, len(SQA_OPTIONS)):
        return SQA_OPTIONS[value]
    if isinstance(value, str) and value.strip() in SQA_OPTIONS[:n_choices]:
        return value.strip()
    raise fail(where, sample, f"ScienceQA reference must be an option letter or index among {n_choices} "
                               f"choices, got {value!r}")


def read_questions(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """ScienceQA test, image subset (SQA-IMG), as LLaVA-1.5 runs it (``model_vqa_science.py`` with
    ``--single-pred-prompt``, scored by ``eval_science_qa.py``'s IMG-Accuracy).

    Records are LLaVA conversations (``id``, ``image``, ``conversations``); only those with an image are kept.
    The prompt is the human turn plus ``"\\nAnswer with the option's letter from the given choices directly."``.
    The reference letter comes from the record's own ``answer`` (letter or index), else from ``problems.json``
    (``answer`` index, ``choices``, ``subject``), else from the record's gpt turn when it is a single letter
    (LLaVA's file has it there).
    """
    records = read_records(data)
    raw = [str(raw_id(rec, "id", data, i)) for i, rec in enumerate(records)]
    pairs = [(rec, sid) for rec, sid in zip(records, unique_ids(raw)) if rec.get("image")]
    if max_samples is not None:
        pairs = pairs[:max_samples]
    problems = None
    items = []
    for rec, sid in pairs:
        turns = rec.get("conversations")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) or not isinstance(
                turns[0].get("value"), str):
            raise fail(data, sid, "has no human turn in 'conversations'")
        human = turns[0]["value"]
        n_choices = _count_option_lines(human.replace(IMAGE_TOKEN, ""))
        category = str(rec.get("subject") or rec.get("category") or "all")
        ref = inline_reference(rec)
        where = data
        if ref is None and annotations is not None:
            path = annotations / "problems.json" if annotations.is_dir() else annotations
            if problems is None:
                problems = read_json(existing(path, "ScienceQA problems.json"))
                if not isinstance(problems, dict):
                    raise DataError(path, "expected ScienceQA's {problem_id: problem} object")
            prob = problems.get(str(rec["id"]))
            if not isinstance(prob, dict):
                raise fail(path, sid, f"problem {rec['id']} is not in problems.json (from {data})")
            if isinstance(prob.get("choices"), list):
                n_choices = len(prob["choices"])
            category = str(prob.get("subject") or category)
            ref, where = prob.get("answer"), path
        if ref is None and len(turns) > 1 and isinstance(turns[1], dict):
            gpt = str(turns[1].get("value", "")).strip()
            ref = gpt if gpt in SQA_OPTIONS else None
        if ref is None:
            raise fail(data, sid, "carries no reference (no 'answer', no letter in its gpt turn) and no "
                                   "problems.json was given as annotations")
        if n_choices == 0:
            raise fail(data, sid, "its options ('A. ...' lines) cannot be found and problems.json gives none")
        letter = _sqa_letter(ref, n_choices, where, sid)
        items.append(BenchItem(
            id=sid, question=user_turn(with_suffix(human.replace(IMAGE_TOKEN, ""), LETTER_PROMPT), True),
            image=image_path(rec, images, data, sid), reference=letter, category=category,
            meta={"question_id": rec["id"], "n_choices": n_choices}))
    return items


_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_sqa_letter(text: str, n_choices: int = len(SQA_OPTIONS)) -> str | None:
    """LLaVA-1.5's ``llava/eval/eval_science_qa.py``: the text is one option letter, or starts with a letter
    and ``". "``, or holds exactly one ``The answer is X.``; the letter must be one of the question's
    choices. Anything else (``"B."`` alone too) is ``None`` and counts wrong."""
    t = text.strip()
    if t in SQA_OPTIONS:
        letter = t
    elif len(t) >= 3 and t[0] in SQA_OPTIONS and t[1:3] == ". ":
        letter = t[0]
    else:
        found = _SQA_ANSWER_IS.findall(t)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SQA_OPTIONS[:n_choices] else None


def score_answers(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """ScienceQA IMG-Accuracy: LLaVA-1.5's ``llava/eval/eval_science_qa.py`` (see :func:`parse_sqa_letter`;
    an answer that is not one of the question's option letters counts wrong)."""
    per, cats, unparsed = {}, [], 0
    for it in items:
        n_choices = int(it.meta.get("n_choices", len(SQA_OPTIONS)))
        if it.reference not in SQA_OPTIONS[:n_choices]:
            raise bad_sample("sqa_img", it,
                             f"reference must be an option letter among {n_choices}, got {it.reference!r}")
        parsed = parse_sqa_letter(preds[it.id], n_choices)
        unparsed += parsed is None
        ok = parsed == it.reference
        per[it.id] = {"parsed": parsed, "correct": ok}
        cats.append((it.category, ok))
    correct = sum(ok for _, ok in cats)
    acc = pct(correct, len(items))
    return BenchScore("sqa_img", acc, {"accuracy": acc, "correct": correct, "unparsed": unparsed,
                                       "per_category": per_category(cats)}, len(items), per)


def detail(s: BenchScore) -> str:
    return f"SQA-IMG: {s.score:.2f}% accuracy (n={s.n}, {s.metrics['unparsed']} not an option letter)"


BENCHMARK = Benchmark("sqa_img", "SQA-IMG", read_questions, score_answers, detail)
