"""POPE (COCO) adversarial / popular / random: ``eval_pope.py``'s yes/no reading, the mean F1 of the splits."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from aligntI.data.records import DataError
from aligntI.eval.benchmarks.common import (
    SHORT_ANSWER_PROMPT,
    BenchItem,
    Benchmark,
    BenchScore,
    bad_sample,
    category_of,
    existing,
    fail,
    image_path,
    inline_reference,
    need_annotations,
    numbered,
    pct,
    question_text,
    read_records,
    user_turn,
    with_suffix,
    yes_no,
)

POPE_SPLITS = ("adversarial", "popular", "random")


def read_questions(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """POPE (COCO) adversarial / popular / random, as LLaVA-1.5 runs it (``llava_pope_test.jsonl``, scored by
    ``eval_pope.py``). The record's ``category`` is the split.

    ``eval_pope.py`` pairs the n-th answer of a split with the n-th line of ``coco_pope_<split>.json`` (the
    question ids differ: LLaVA's file offsets each split by 10,000,000). The same pairing is used here, and a
    label line that names a different question or image than the record it is paired with is an error.
    """
    if annotations is not None and not annotations.is_dir():
        raise DataError(annotations, "POPE annotations must be the folder holding coco_pope_<split>.json")
    labels: dict[str, list[dict]] = {}
    position: Counter = Counter()
    items = []
    for rec, sid in numbered(data, max_samples):
        split = category_of(rec)
        n = position[split]
        position[split] += 1
        text = question_text(rec, data, sid)
        image = image_path(rec, images, data, sid)
        ref, where = inline_reference(rec), data
        meta: dict[str, Any] = {"question_id": rec["question_id"], "split": split}
        if ref is None:
            folder = need_annotations(annotations, data, sid, "the folder of coco_pope_<split>.json")
            if split == "all":
                raise fail(data, sid, "has no POPE split in 'category', so its label file is unknown")
            label_file = folder / f"coco_pope_{split}.json"
            if split not in labels:
                labels[split] = read_records(existing(label_file, f"POPE {split} labels"))
            if n >= len(labels[split]):
                raise fail(label_file, sid, f"is question {n + 1} of split {split} but the label file has "
                                             f"{len(labels[split])} lines")
            line = labels[split][n]
            question = text.replace(SHORT_ANSWER_PROMPT, "").strip().lower()
            if isinstance(line.get("text"), str) and line["text"].strip().lower() != question:
                raise fail(label_file, sid, f"label line {n + 1} asks {line['text']!r}, the question file asks "
                                             f"{question!r}: files out of step")
            if isinstance(line.get("image"), str) and Path(line["image"]).name != Path(rec["image"]).name:
                raise fail(label_file, sid, f"label line {n + 1} is for image {line['image']!r}, the question "
                                             f"is for {rec['image']!r}: files out of step")
            ref, where = line.get("label"), label_file
            meta["label_line"] = n + 1
        items.append(BenchItem(id=sid, question=user_turn(with_suffix(text, SHORT_ANSWER_PROMPT), True),
                               image=image, reference=yes_no(ref, where, sid), category=split, meta=meta))
    return items


def parse_pope_answer(text: str) -> str:
    """LLaVA's ``llava/eval/eval_pope.py``: keep the text before the first period, delete commas, split on
    spaces; the words ``No``, ``no`` or ``not`` make it "no", anything else is "yes" (case-sensitive, as
    there: ``NO`` reads as yes)."""
    t = text.strip()
    if "." in t:
        t = t.split(".")[0]
    words = t.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _split_order(names) -> list[str]:
    return [s for s in POPE_SPLITS if s in names] + sorted(set(names) - set(POPE_SPLITS))


def score_answers(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """POPE: LLaVA's ``llava/eval/eval_pope.py`` per split (see :func:`parse_pope_answer`; "yes" is the
    positive class), reported as the mean F1 over the splits present. A split with no "yes" prediction has
    precision 0 (eval_pope.py would divide by zero)."""
    per: dict[str, dict] = {}
    by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for it in items:
        if it.reference not in ("yes", "no"):
            raise bad_sample("pope", it, f"reference must be 'yes' or 'no', got {it.reference!r}")
        parsed = parse_pope_answer(preds[it.id])
        per[it.id] = {"parsed": parsed, "correct": parsed == it.reference}
        by_split[it.category].append((parsed, it.reference))
    splits = {}
    for split in _split_order(by_split):
        pairs = by_split[split]
        tp = sum(p == "yes" and r == "yes" for p, r in pairs)
        fp = sum(p == "yes" and r == "no" for p, r in pairs)
        tn = sum(p == "no" and r == "no" for p, r in pairs)
        fn = sum(p == "no" and r == "yes" for p, r in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        splits[split] = {"f1": 100 * f1, "accuracy": pct(tp + tn, len(pairs)), "precision": 100 * precision,
                         "recall": 100 * recall, "yes_ratio": pct(tp + fp, len(pairs)),
                         "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(pairs)}
    f1 = sum(s["f1"] for s in splits.values()) / len(splits)
    acc = sum(s["accuracy"] for s in splits.values()) / len(splits)
    return BenchScore("pope", f1, {"f1": f1, "accuracy": acc, "splits": splits}, len(items), per)


def detail(s: BenchScore) -> str:
    m = s.metrics
    splits = ", ".join(f"{k} {v['f1']:.2f}" for k, v in m["splits"].items())
    return f"POPE: F1 {splits}; mean {s.score:.2f}, accuracy {m['accuracy']:.2f}% (n={s.n})"


BENCHMARK = Benchmark("pope", "POPE-F1", read_questions, score_answers, detail)
