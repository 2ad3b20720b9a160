"""Per-item scoring of structured answers: the fraction of answer items right, so a long answer is not
all-or-nothing, and exact match / item accuracy broken down by answer length and by relevant region.

A record says how its answer splits into items with ``item_sep`` (GridRead writes it): ``space``, every word
but ``,`` is an item (digits read from a row or the grid); ``comma``, every ``,``-separated group is one
(a number of several digit words, a row-column pair). Items are compared position by position; the count is
divided by the longer of the two lists, so a missing or an extra item costs as much as a wrong one.
"""

from __future__ import annotations

from collections import defaultdict

from aligntI.eval.generation import normalize_answer

ITEM_SEPS = ("space", "comma")
# Answer lengths in words (= tokens of the word-level tokenizer), lower bounds of the buckets.
LENGTH_BUCKETS = (1, 3, 8, 15)
LONG_ANSWER = 8  # words: what counts as a long answer (key ``long``)


def answer_items(text: str, sep: str) -> list[str]:
    words = normalize_answer(text).split()
    if sep == "space":
        return [w for w in words if w != ","]
    if sep == "comma":
        return [g.strip() for g in " ".join(words).split(",") if g.strip()]
    raise ValueError(f"unknown item_sep {sep!r}; expected one of {', '.join(ITEM_SEPS)}")


def item_accuracy(prediction: str, reference: str, sep: str) -> float:
    """Items equal at the same place / the longer list's length (1.0 for two empty answers)."""
    pred, ref = answer_items(prediction, sep), answer_items(reference, sep)
    if not pred and not ref:
        return 1.0
    return sum(p == r for p, r in zip(pred, ref)) / max(len(pred), len(ref))


def first_error(prediction: str, reference: str, sep: str) -> tuple[int | None, int, int]:
    """Where a prediction first leaves the reference and how it goes on: (index of the first reference item it
    gets wrong or misses, None if none; reference items after that one; how many of those it gets right at their
    place). A student that recovers after a mistake gets the later items right; one thrown off gets them wrong."""
    pred, ref = answer_items(prediction, sep), answer_items(reference, sep)
    wrong = next((i for i, r in enumerate(ref) if i >= len(pred) or pred[i] != r), None)
    if wrong is None:
        return None, 0, 0
    rest = range(wrong + 1, len(ref))
    return wrong, len(rest), sum(i < len(pred) and pred[i] == ref[i] for i in rest)


def length_bucket(reference: str) -> str:
    n = len(normalize_answer(reference).split())
    lows = [b for b in LENGTH_BUCKETS if b <= n]
    low = lows[-1] if lows else LENGTH_BUCKETS[0]
    nxt = [b for b in LENGTH_BUCKETS if b > low]
    return f"{low}-{nxt[0] - 1}" if nxt else f"{low}+"


def item_scores(predictions: list[dict], records: dict[str, dict]) -> dict:
    """Exact match and item accuracy (both in %) overall, per category, per answer-length bucket (``len:``),
    on answers of ``LONG_ANSWER`` words or more (``long``) and per relevant-region size in cells (``cells:``); ``predictions`` as :func:`with_answers` gives them,
    ``records`` the data file's records by id (with ``item_sep`` and ``cells``)."""
    exact, items, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    for p in predictions:
        record = records[p["id"]]
        ok = normalize_answer(p["prediction"]) == normalize_answer(p["reference"])
        acc = item_accuracy(p["prediction"], p["reference"], record["item_sep"])
        keys = ["all", p["category"], f"len:{length_bucket(p['reference'])}", f"cells:{len(record['cells'])}"]
        if len(normalize_answer(p["reference"]).split()) >= LONG_ANSWER:
            keys.append("long")
        for key in keys:
            exact[key] += ok
            items[key] += acc
            counts[key] += 1
    return {k: {"exact": 100.0 * exact[k] / counts[k], "items": 100.0 * items[k] / counts[k], "n": counts[k]}
            for k in sorted(counts)}
