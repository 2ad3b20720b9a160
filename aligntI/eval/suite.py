"""One model on the paper's benchmarks: generate (sharded over ranks), gather, score, write.

Per benchmark ``<out>/<name>_answers.jsonl`` (every question, the model's answer and how the scorer read it)
and ``<out>/<name>_score.json``; then ``<out>/scores.json`` and ``scores.md``, the table over every
benchmark scored into ``<out>`` so far (so benchmarks run as separate jobs end up in one table), with the
average of the six once all are there.
"""

from __future__ import annotations

import json
from pathlib import Path

from aligntI.eval.benchmarks import BENCHMARKS, load_benchmark, title_of
from aligntI.eval.generation import Prompt, gather_answers, generate_answers
from aligntI.eval.recipe import BenchmarkConfig, EvalRecipe
from aligntI.eval.scoring import BenchScore, format_markdown, score_benchmark, score_table


def prompts_of(items) -> list[Prompt]:
    return [Prompt(it.id, [{"role": "user", "content": it.question}],
                   it.open_image if (it.image is not None or it.image_bytes is not None) else None) for it in items]


def write_benchmark(out: Path, items, answers: dict[str, str], score: BenchScore) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{score.name}_answers.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps({**it.to_json(), "prediction": answers[it.id],
                                **score.per_sample.get(it.id, {})}) + "\n")
    summary = {"title": title_of(score.name), **{k: v for k, v in score.to_json().items() if k != "per_sample"}}
    (out / f"{score.name}_score.json").write_text(json.dumps(summary, indent=2) + "\n")


def read_scores(out: Path) -> dict[str, BenchScore]:
    """Every ``<name>_score.json`` in ``out``."""
    scores = {}
    for name in BENCHMARKS:
        path = out / f"{name}_score.json"
        if path.is_file():
            d = json.loads(path.read_text())
            scores[name] = BenchScore(name=d["name"], score=d["score"], metrics=d["metrics"], n=d["n"])
    return scores


def write_table(out: Path, model: str) -> str:
    scores = read_scores(out)
    table = score_table(scores)
    (out / "scores.json").write_text(json.dumps({"model": model, **table}, indent=2) + "\n")
    text = format_markdown(scores, model)
    (out / "scores.md").write_text(text)
    return text


def evaluate_benchmark(model, processor, encoder, bench: BenchmarkConfig, recipe: EvalRecipe, out: Path, *,
                       device, rank: int, world_size: int) -> BenchScore | None:
    """Every rank loads the questions and answers its share; rank 0 scores and writes (None elsewhere)."""
    items = load_benchmark(bench.name, bench.data, bench.images, bench.annotations, bench.max_samples)
    local = generate_answers(model, processor, encoder, prompts_of(items), batch_size=recipe.batch_size,
                             max_new_tokens=recipe.max_new_tokens, device=device, rank=rank, world_size=world_size)
    answers = gather_answers(local, rank, world_size)
    if answers is None:
        return None
    score = score_benchmark(bench.name, items, answers)
    write_benchmark(out, items, answers, score)
    return score
