"""Scoring generated answers with each benchmark's convention, and the score table over the benchmarks.

The conventions themselves are in the benchmark modules of :mod:`aligntI.eval.benchmarks`, each naming the
script behind the numbers LLaVA-1.5-style papers report. Generated text is stripped of surrounding whitespace
first, as LLaVA's generation scripts (``model_vqa_loader.py``, ``model_vqa_science.py``,
``model_vqa_mmbench.py``) strip what they write. All accuracies in ``metrics`` are percentages (0-100); MME's
are its own points (0-2000 perception).
"""

from __future__ import annotations

from aligntI.eval.benchmarks import BENCHMARKS, BenchItem, BenchScore, title_of

__all__ = ["BenchScore", "format_markdown", "score_benchmark", "score_table"]


def score_benchmark(name: str, items: list[BenchItem], predictions: dict[str, str]) -> BenchScore:
    """Score generated answers (``predictions``: item id -> text) with the benchmark's convention."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if not items:
        raise ValueError(f"{name}: no samples to score")
    seen = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"{name}: sample id {it.id!r} appears twice")
        seen.add(it.id)
    missing = [it.id for it in items if it.id not in predictions]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{name}: no prediction for sample {missing[0]!r}{more}")
    for it in items:
        if not isinstance(predictions[it.id], str):
            raise ValueError(f"{name}: prediction for sample {it.id!r} is not text: {predictions[it.id]!r}")
    return BENCHMARKS[name].score_answers(items, predictions)


# ------------------------------------------------------------------------------------------- score table


def score_table(scores: dict[str, BenchScore]) -> dict:
    """``{"benchmarks": {name: paper number}, "average": mean of the six or None, "missing": [names]}``.

    The average (MME as perception / 20) is given only when all six benchmarks are present."""
    for name, s in scores.items():
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r} in the scores; known: {', '.join(BENCHMARKS)}")
        if s.name != name:
            raise ValueError(f"scores[{name!r}] holds the score of {s.name!r}")
    present = {name: scores[name].score for name in BENCHMARKS if name in scores}
    missing = [name for name in BENCHMARKS if name not in scores]
    average = sum(present.values()) / len(BENCHMARKS) if not missing else None
    return {"benchmarks": present, "average": average, "missing": missing}


def _detail(s: BenchScore) -> str:
    try:
        return BENCHMARKS[s.name].detail(s)
    except (KeyError, TypeError, AttributeError):
        return f"{title_of(s.name)}: {s.score:.2f} (n={s.n})"  # a hand-made score without the usual metrics


def format_markdown(scores: dict[str, BenchScore], model: str) -> str:
    """One table (the titles in BENCHMARKS order, then Avg) with a row for ``model``, and a detail list."""
    table = score_table(scores)
    header = ["Model"] + [bench.title for bench in BENCHMARKS.values()] + ["Avg"]
    cells = [model.replace("|", "\\|")]
    cells += [f"{table['benchmarks'][name]:.1f}" if name in table["benchmarks"] else "–" for name in BENCHMARKS]
    cells.append(f"{table['average']:.1f}" if table["average"] is not None else "–")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
             "| " + " | ".join(cells) + " |", ""]
    if table["missing"]:
        lines.append("Avg needs all six benchmarks; missing: "
                     + ", ".join(BENCHMARKS[name].title for name in table["missing"]) + ".")
    else:
        lines.append("Avg is the mean of the six numbers (MME as perception / 20).")
    lines.append("")
    lines += [f"- {_detail(scores[name])}" for name in BENCHMARKS if name in scores]
    return "\n".join(lines) + "\n"
