"""Where each GridRead student first leaves the reference answer, and whether it gets back on the path.

    python recipes/mini/gridread_recovery.py [--run runs/mini/reproduce_gridread] [--categories two_rows,grid]

TPA aligns the student with the teacher after tokens the student itself drew, off the ground-truth path; what it
should change at inference is what follows a mistake. For the test answers of the given question types, per
row of a finished reproduction (its ``results.json`` and each model's ``eval/test_predictions.jsonl``): the share
of answers with a wrong item, the mean position of the first wrong item, and the share of the items after it
that are right at their place (``aligntI.eval.items.first_error``), mean ± std over seeds, with the paired
differences TPA makes (+TPA − vanilla KD; Align-TI − +IVA, both with attention alignment, when they ran).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reproduce_report import mean_std, paired_difference

from aligntI.eval.items import first_error

REPO = Path(__file__).resolve().parents[2]
PAIRS = (("tpa", "vanilla_kd"), ("align_ti", "iva"), ("align_ti_attn", "iva_attn"))


def recovery(predictions: Path, records: dict, categories: set[str]) -> dict[str, float]:
    answers = with_error = first = after = right = 0
    for line in predictions.open():
        p = json.loads(line)
        record = records[p["id"]]
        if record["category"] not in categories:
            continue
        answers += 1
        wrong, rest, ok = first_error(p["prediction"], p["reference"], record["item_sep"])
        if wrong is not None:
            with_error += 1
            first += wrong + 1
            after += rest
            right += ok
    # None where there is nothing to average: no answer with a wrong item, or none with items after it.
    return {"with_error": 100.0 * with_error / answers, "first_wrong": first / with_error if with_error else None,
            "right_after": 100.0 * right / after if after else None, "answers": answers}


def cell(values: list[float | None], digits: int) -> str:
    """Mean ± std over the seeds where the measure is defined; "—" where it is nowhere."""
    known = [v for v in values if v is not None]
    if not known:
        return "—"
    mean, std = mean_std(known)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(known) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=str(REPO / "runs" / "mini" / "reproduce_gridread"),
                        help="a finished GridRead reproduction folder")
    parser.add_argument("--categories", default="two_rows,grid", help="question types, comma-separated")
    args = parser.parse_args()
    run = Path(args.run)
    res = json.loads((run / "results.json").read_text())
    records = {r["id"]: r for r in json.loads((run / "data" / "test.json").read_text())}
    categories = set(args.categories.split(","))
    if not categories & set(res["categories"]):
        parser.error(f"none of {sorted(categories)} is in this run's question types {res['categories']}")
    predictions = Path("final", "eval", "test_predictions.jsonl")
    rows = {r["key"]: [recovery(run / d / predictions, records, categories) for d in r["run_dirs"]]
            for r in res["rows"]}
    teacher = recovery(run / res["teacher_dir"] / predictions, records, categories)
    labels = {r["key"]: r["label"].split(" (")[0] for r in res["rows"]}
    print(f"{args.run}: {sorted(categories & set(res['categories']))}, {teacher['answers']} test answers\n")
    print("| method | answers with a wrong item (%) | first wrong item (position) | items right after it (%) |")
    print("|---|---|---|---|")
    for name, per_seed in [*((labels[k], v) for k, v in rows.items()), ("Teacher", [teacher])]:
        print(f"| {name} | {cell([s['with_error'] for s in per_seed], 1)} | "
              f"{cell([s['first_wrong'] for s in per_seed], 2)} | {cell([s['right_after'] for s in per_seed], 1)} |")
    print()
    for a, b in PAIRS:
        if a in rows and b in rows:
            for measure in ("first_wrong", "right_after"):
                both = [(x[measure], y[measure]) for x, y in zip(rows[a], rows[b], strict=True)
                        if x[measure] is not None and y[measure] is not None]  # the seeds where both are defined
                if not both:
                    continue
                d = paired_difference([x for x, _ in both], [y for _, y in both])
                print(f"{labels[a]} − {labels[b]}, {measure}: {d['mean']:+.2f} ± {d['se']:.2f} SE "
                      f"(p = {d['p_value']:.2f}, {d['n']} seeds)")


if __name__ == "__main__":
    main()
