"""MME: the release's yes/no ground truth, ``calculation.py``'s acc + acc+ per category, perception / 20."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from aligntI.data.records import DataError
from aligntI.eval.benchmarks.common import (
    SHORT_ANSWER_PROMPT,
    BenchItem,
    Benchmark,
    BenchScore,
    bad_sample,
    existing,
    fail,
    image_path,
    inline_reference,
    numbered,
    pct,
    question_text,
    read_text,
    user_turn,
    with_suffix,
    yes_no,
)

YES_NO_PROMPT = "Please answer yes or no."  # the MME release's questions end with it; LLaVA's prompts drop it
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _mme_key(question: str) -> str:
    q = question.replace(SHORT_ANSWER_PROMPT, "").replace(YES_NO_PROMPT, "")
    return " ".join(q.split()).lower()


def read_questions(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """MME, as LLaVA-1.5 runs it (``llava_mme.jsonl`` through ``model_vqa_loader.py``, then
    ``convert_answer_to_mme.py`` and MME's ``eval_tool/calculation.py``).

    ``question_id`` is ``<category>/[images/]<file>`` and each image is asked twice (one yes, one no). The
    ground truth is in the MME release folder (``annotations``, else the ``images`` folder, which LLaVA points
    at the same place): ``<category>/questions_answers_YN/<stem>.txt`` when the category has an ``images``
    folder, else ``<category>/<stem>.txt``; each line ``question<TAB>Yes|No``, the question ending with
    ``Please answer yes or no.``. LLaVA's prompt swaps that for the short-answer suffix; questions are matched
    with both suffixes removed and whitespace collapsed.
    """
    root = annotations if annotations is not None else images
    gt_files: dict[Path, list[tuple[str, str]]] = {}
    items = []
    for rec, sid in numbered(data, max_samples):
        qid = str(rec["question_id"])
        category = str(rec.get("category") or qid.split("/")[0])
        text = question_text(rec, data, sid)
        image = image_path(rec, images, data, sid)
        ref, where = inline_reference(rec), data
        if ref is None:
            if root is None:
                raise fail(data, sid, "carries no reference and no MME release folder was given as annotations")
            cat_dir = root / category
            qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "images").is_dir() else cat_dir
            gt_file = qa_dir / (qid.split("/")[-1].split(".")[0] + ".txt")
            if gt_file not in gt_files:
                existing(gt_file, f"MME ground truth for {qid}")
                pairs = []
                for n, line in enumerate(read_text(gt_file).splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise DataError(gt_file, f"line {n} is not 'question<TAB>answer'")
                    pairs.append((_mme_key(parts[0]), parts[1]))
                gt_files[gt_file] = pairs
            key = _mme_key(text)
            found = [a for q, a in gt_files[gt_file] if q == key]
            if not found:
                raise fail(gt_file, sid, f"question {key!r} is not in the ground-truth file (from {data})")
            ref, where = found[0], gt_file
        items.append(BenchItem(
            id=sid, question=user_turn(with_suffix(text, SHORT_ANSWER_PROMPT), True), image=image,
            reference=yes_no(ref, where, sid), category=category,
            meta={"question_id": rec["question_id"], "image_key": qid}))
    return items


def parse_mme_answer(text: str) -> str:
    """MME's ``eval_tool/calculation.py`` (``parse_pred_ans``, used by LLaVA's ``scripts/v1_5/eval/mme.sh``):
    lowercased, exactly "yes"/"no", else "yes" if the first 4 characters contain it, else "no" likewise, else
    "other" (counted wrong)."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_answers(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """MME: MME's ``eval_tool/calculation.py`` as LLaVA's ``scripts/v1_5/eval/mme.sh`` runs it. Per
    category, acc = right answers / questions and acc+ = images with every question right / images (an image
    is asked twice); its score is (acc + acc+) x 100. Perception is the sum over its 10 categories (max
    2000), cognition over its 4 (max 800); the reported number is perception / 20."""
    per: dict[str, dict] = {}
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other = 0
    for it in items:
        if it.reference not in ("yes", "no"):
            raise bad_sample("mme", it, f"reference must be 'yes' or 'no', got {it.reference!r}")
        parsed = parse_mme_answer(preds[it.id])
        other += parsed == "other"
        ok = parsed == it.reference
        per[it.id] = {"parsed": parsed, "correct": ok}
        by_cat[it.category][str(it.meta.get("image_key", it.image))].append(ok)
    categories, unpaired = {}, 0
    for cat in sorted(by_cat):
        images = by_cat[cat]
        answers = [ok for oks in images.values() for ok in oks]
        unpaired += sum(len(oks) != 2 for oks in images.values())
        acc, acc_plus = pct(sum(answers), len(answers)), pct(sum(all(oks) for oks in images.values()),
                                                              len(images))
        categories[cat] = {"score": acc + acc_plus, "acc": acc, "acc_plus": acc_plus, "n": len(answers),
                           "images": len(images)}
    perception = sum(categories[c]["score"] for c in MME_PERCEPTION if c in categories)
    cognition = sum(categories[c]["score"] for c in MME_COGNITION if c in categories)
    metrics = {"perception": perception, "cognition": cognition, "perception_div_20": perception / 20,
               "categories": categories,
               "missing_perception": [c for c in MME_PERCEPTION if c not in categories],
               "missing_cognition": [c for c in MME_COGNITION if c not in categories],
               "unknown_categories": sorted(set(categories) - set(MME_PERCEPTION) - set(MME_COGNITION)),
               "other_answers": other, "unpaired_images": unpaired}
    return BenchScore("mme", perception / 20, metrics, len(items), per)


def detail(s: BenchScore) -> str:
    m = s.metrics
    missing = f"; missing: {', '.join(m['missing_perception'])}" if m.get("missing_perception") else ""
    return (f"MME: perception {m['perception']:.1f} / 2000 (/20 = {s.score:.2f}), cognition "
            f"{m['cognition']:.1f} / 800 (n={s.n}{missing})")


BENCHMARK = Benchmark("mme", "MME-P/20", read_questions, score_answers, detail)
