"""GQA testdev-balanced: LLaVA-1.5's question file, GQA's references, exact match after LLaVA's clean-up."""

from __future__ import annotations

from pathlib import Path

from aligntI.data.records import DataError
from aligntI.eval.benchmarks.common import (
    SHORT_ANSWER_PROMPT,
    BenchItem,
    Benchmark,
    BenchScore,
    bad_sample,
    category_of,
    fail,
    image_path,
    inline_reference,
    need_annotations,
    numbered,
    pct,
    per_category,
    question_text,
    read_json,
    user_turn,
    with_suffix,
)


def read_questions(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """GQA testdev-balanced as LLaVA runs it (``scripts/v1_5/eval/gqa.sh`` + ``model_vqa_loader.py``).

    References come from GQA's ``testdev_balanced_questions.json`` ({question_id: {"answer", "types", ...}});
    the category is the question's structural type there (verify/query/choose/logical/compare) when known.
    """
    questions = None
    items = []
    for rec, sid in numbered(data, max_samples):
        qid = rec["question_id"]
        ref, category = inline_reference(rec), category_of(rec)
        if ref is None:
            path = need_annotations(annotations, data, sid, "GQA's testdev_balanced_questions.json")
            if questions is None:
                questions = read_json(path)
                if not isinstance(questions, dict):
                    raise DataError(path, "expected GQA's {question_id: question} object")
            entry = questions.get(str(qid))
            if not isinstance(entry, dict):
                raise fail(path, sid, f"question {qid} is not in the annotations (from {data})")
            ref = entry.get("answer")
            structural = (entry.get("types") or {}).get("structural")
            if structural and category == "all":
                category = str(structural)
        if not isinstance(ref, str) or not ref.strip():
            raise fail(data, sid, f"GQA reference must be a non-empty string, got {ref!r}")
        items.append(BenchItem(
            id=sid, question=user_turn(with_suffix(question_text(rec, data, sid), SHORT_ANSWER_PROMPT), True),
            image=image_path(rec, images, data, sid), reference=ref, category=category,
            meta={"question_id": qid}))
    return items


def parse_gqa_answer(text: str) -> str:
    """LLaVA's ``scripts/convert_gqa_for_eval.py``: trailing periods stripped, lowercased."""
    return text.strip().rstrip(".").lower()


def score_answers(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """GQA testdev-balanced accuracy: LLaVA's ``scripts/convert_gqa_for_eval.py`` (strip trailing periods,
    lowercase) then GQA's ``eval.py`` (exact match with the answer; GQA's answers are lowercase, the
    reference is lowercased here too)."""
    per, cats = {}, []
    for it in items:
        if not isinstance(it.reference, str):
            raise bad_sample("gqa", it, f"reference must be a string, got {it.reference!r}")
        parsed = parse_gqa_answer(preds[it.id])
        ok = parsed == it.reference.strip().lower()
        per[it.id] = {"parsed": parsed, "correct": ok}
        cats.append((it.category, ok))
    correct = sum(ok for _, ok in cats)
    acc = pct(correct, len(items))
    return BenchScore("gqa", acc, {"accuracy": acc, "correct": correct, "per_category": per_category(cats)},
                      len(items), per)


def detail(s: BenchScore) -> str:
    return f"GQA: {s.score:.2f}% exact match (n={s.n})"


BENCHMARK = Benchmark("gqa", "GQA", read_questions, score_answers, detail)
