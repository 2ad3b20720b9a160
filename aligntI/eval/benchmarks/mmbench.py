"""MMBench dev: the TSV (images inside), VLMEvalKit's rule-based letter matching, CircularEval."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from aligntI.data.records import DataError
from aligntI.eval.benchmarks.common import (
    IMAGE_TOKEN,
    LETTER_PROMPT,
    BenchItem,
    Benchmark,
    BenchScore,
    bad_sample,
    fail,
    pct,
    per_category,
    read_text,
)

MMBENCH_OPTIONS = ("A", "B", "C", "D")
MMBENCH_CIRCULAR_MOD = 1_000_000  # rotated copies of question i have index i + k * 1_000_000


def _is_none(value: Any) -> bool:
    """Empty cells, as LLaVA's ``is_none`` (NaN, 'nan', 'none') sees pandas' reading of them."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _read_tsv(path: Path) -> list[dict]:
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's default 128 KiB field
    try:
        return list(csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter="\t"))
    except csv.Error as e:
        raise DataError(path, f"not a readable TSV ({e})") from e
    finally:
        csv.field_size_limit(old)


def read_questions(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """MMBench dev, as LLaVA-1.5 runs it (``model_vqa_mmbench.py --single-pred-prompt``).

    The TSV holds ``index, question, hint, A, B, C, D, answer, category, l2-category, image`` (base64). The
    prompt is ``[hint\\n]question`` then ``\\nA. option`` for each option up to the first empty one, then
    ``\\nAnswer with the option's letter from the given choices directly.``. Rows with index >= 1,000,000 are
    the circularly rotated copies of row ``index % 1,000,000`` (CircularEval); an image cell that holds only
    an index refers to that row's image, as in OpenCompass's TSVs.
    """
    rows = _read_tsv(data)
    if rows and not {"index", "question", "image"} <= set(rows[0]):
        raise DataError(data, f"MMBench TSV needs columns index, question, image; has {sorted(rows[0])}")
    indices = []
    for n, row in enumerate(rows, 2):
        try:
            indices.append(int(float(row["index"])))
        except (TypeError, ValueError) as e:
            raise DataError(data, f"line {n} has index {row.get('index')!r}, not an integer") from e
    by_index = dict(zip(indices, rows))
    if max_samples is not None:
        rows, indices = rows[:max_samples], indices[:max_samples]
    items = []
    for index, row in zip(indices, rows):
        sid = str(index)
        options = {}
        for letter in MMBENCH_OPTIONS:
            if _is_none(row.get(letter)):
                break
            options[letter] = row[letter]
        if len(options) < 2:
            raise fail(data, sid, "has fewer than two options")
        ref = row.get("answer")
        ref = None if _is_none(ref) else ref.strip()
        if ref is None:
            raise fail(data, sid, "has no 'answer' (MMBench references come from the TSV's answer column)")
        if ref not in options:
            raise fail(data, sid, f"answer must be one of the options {list(options)}, got {ref!r}")
        question = row["question"]
        if not _is_none(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        for letter, option in options.items():
            question = f"{question}\n{letter}. {option}"
        question = f"{IMAGE_TOKEN}\n{question}\n{LETTER_PROMPT}"
        b64 = row.get("image") or ""
        if b64.strip().isdigit() and len(b64.strip()) <= 64:
            target = by_index.get(int(b64.strip()))
            if target is None:
                raise fail(data, sid, f"image refers to index {b64.strip()}, which is not in the file")
            b64 = target.get("image") or ""
        if not b64.strip():
            raise fail(data, sid, "has no image")
        try:
            image_bytes = base64.b64decode("".join(b64.split()), validate=True)
            with Image.open(io.BytesIO(image_bytes)) as im:
                im.size  # noqa: B018 - reads the header only: a bad image fails here, not mid-generation
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
            raise fail(data, sid, f"image is not a base64-encoded image ({e})") from e
        l2 = row.get("l2-category", row.get("l2_category"))
        items.append(BenchItem(
            id=sid, question=question, image=None, reference=ref,
            category="all" if _is_none(row.get("category")) else row["category"],
            meta={"question_id": index, "index": index, "group": index % MMBENCH_CIRCULAR_MOD,
                  "options": options, "hint": None if _is_none(row.get("hint")) else row["hint"],
                  "l2_category": None if _is_none(l2) else l2},
            image_bytes=image_bytes))
    return items


_MMB_SEPARATORS = ".()[],:;!*#{}"


def extract_option_letter(text: str, options: dict[str, str]) -> str | None:
    """Option letter of a multiple-choice answer: VLMEvalKit's ``can_infer`` (``vlmeval/utils/
    matching_util.py``), the rule-based step of MMBench's official evaluation, without its ChatGPT fallback.

    First ``can_infer_option``: ``.()[],:;!*#{}`` become spaces and the answer is the one option letter that
    stands as a word (``"B"``, ``"B."``, ``"(B) dog"``); none or several -> ``can_infer_text``: the one option
    whose text occurs (case-insensitively) in the answer, the answer being at most twice as long as all
    options together. Else ``None`` (counted wrong).
    """
    spaced = text
    for c in _MMB_SEPARATORS:
        spaced = spaced.replace(c, " ")
    words = spaced.split()
    hits = [letter for letter in options if letter in words]
    if len(hits) == 1:
        return hits[0]
    low = text.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    cands = [letter for letter, option in options.items() if str(option).lower() in low]
    return cands[0] if len(cands) == 1 else None


def score_answers(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """MMBench dev accuracy. Letters are read with :func:`extract_option_letter`. When the file holds the
    rotated copies (index >= 1,000,000) the score is CircularEval as in MMBench / VLMEvalKit: rows are
    grouped by ``index % 1,000,000`` and a question counts only if every row of its group is right; else
    plain accuracy. ``vanilla_accuracy`` is over the original rows (index < 1,000,000)."""
    per: dict[str, dict] = {}
    groups: dict[int, list[bool]] = defaultdict(list)
    group_cats: dict[int, tuple[str, str | None]] = {}
    main, circular, unparsed = [], False, 0
    for it in items:
        options = it.meta.get("options") or {}
        if it.reference not in options:
            raise bad_sample("mmbench", it,
                             f"reference must be one of the options {list(options)}, got {it.reference!r}")
        index = int(it.meta.get("index", it.id))
        group = int(it.meta.get("group", index % MMBENCH_CIRCULAR_MOD))
        circular |= index >= MMBENCH_CIRCULAR_MOD
        parsed = extract_option_letter(preds[it.id], options)
        unparsed += parsed is None
        ok = parsed == it.reference
        per[it.id] = {"parsed": parsed, "correct": ok, "group": group}
        groups[group].append(ok)
        group_cats.setdefault(group, (it.category, it.meta.get("l2_category")))
        if index < MMBENCH_CIRCULAR_MOD:
            main.append(ok)
    rows = main or [ok for oks in groups.values() for ok in oks]
    vanilla = pct(sum(rows), len(rows))
    circular_acc = pct(sum(all(oks) for oks in groups.values()), len(groups)) if circular else None
    if circular:
        unit = [(group_cats[g], all(oks)) for g, oks in groups.items()]
    else:
        unit = [((it.category, it.meta.get("l2_category")), per[it.id]["correct"]) for it in items]
    score = circular_acc if circular else vanilla
    metrics = {"accuracy": score, "circular": circular, "circular_accuracy": circular_acc,
               "vanilla_accuracy": vanilla, "groups": len(groups), "unparsed": unparsed,
               "per_category": per_category([(c[0], ok) for c, ok in unit]),
               "per_l2_category": per_category([(c[1], ok) for c, ok in unit if c[1] is not None])}
    return BenchScore("mmbench", score, metrics, len(items), per)


def detail(s: BenchScore) -> str:
    m = s.metrics
    if m["circular"]:
        return (f"MMB-dev: {s.score:.2f}% CircularEval over {m['groups']} questions (vanilla "
                f"{m['vanilla_accuracy']:.2f}%, n={s.n} rows)")
    return f"MMB-dev: {s.score:.2f}% accuracy, no rotated copies in the file (n={s.n})"


BENCHMARK = Benchmark("mmbench", "MMB-dev", read_questions, score_answers, detail, folders=False)
