"""What the miniature reproduction reports: test scores, mean ± std per row, diagnostics, the chart and heat-maps."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

CATEGORIES = ("pos", "read", "sum", "odd")


def evaluate_model_dir(model_dir: Path, data: Path, batch_size: int = 250, max_new_tokens: int = 8) -> dict:
    """Greedy exact match of an exported HF model (one process, no process group), written next to it."""
    import torch

    from aligntI.config import AttentionConfig, DataConfig, DataSource
    from aligntI.data.loader import build_encoder
    from aligntI.eval.generation import (
        exact_match_prompts,
        exact_match_scores,
        generate_answers,
        load_eval_items,
        with_answers,
        write_results,
    )
    from aligntI.models.loading import load_model, load_processor

    processor = load_processor(str(model_dir))
    model = load_model(str(model_dir), AttentionConfig("sdpa", "sdpa"), torch.float32).eval()
    encoder = build_encoder(processor, DataConfig(train=[DataSource(str(data))], chat_template=None,
                                                  max_length=10**9))
    items = load_eval_items(str(data), None, "category", None)
    answers = generate_answers(model, processor, encoder, exact_match_prompts(items), batch_size=batch_size,
                               max_new_tokens=max_new_tokens, device=torch.device("cpu"), progress=False)
    preds = with_answers(items, answers)
    scores = exact_match_scores(preds)
    write_results(Path(model_dir) / "eval", Path(data).stem, preds, scores)
    return {k: v["accuracy"] for k, v in scores.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of one value is 0."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(a: list[float], b: list[float]) -> dict:
    """``a - b`` seed by seed (same initial weights and data order), with a paired t-test."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, std = mean_std(diffs)
    p = float(stats.ttest_rel(a, b).pvalue) if len(diffs) > 1 and std > 0 else float("nan")
    return {"mean": mean, "std": std, "n": len(diffs), "p_value": p, "per_seed": diffs}


def final_losses(run_dir: Path, tail: float = 0.1) -> dict[str, float]:
    """Each logged term averaged over the last ``tail`` of the run's steps."""
    from aligntI.training.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    last = rows[-max(1, int(len(rows) * tail)):]
    keys = ("loss", "sft", "kd", "iva", "tpa", "top1_agreement", "step_time_s")
    return {k: statistics.mean(r[k] for r in last) for k in keys if all(k in r for r in last)}


def training_minutes(out: Path) -> dict[str, float]:
    """Wall time of the training jobs from their job.json records: the teacher, then all the students."""
    spans = {}
    for record in Path(out).glob("**/job.json"):
        job = json.loads(record.read_text())
        ended = job.get("ended", record.stat().st_mtime)
        spans[record.parent] = (ended - job["seconds"], ended)
    teacher = [v for k, v in spans.items() if k.name == "teacher"]
    students = [v for k, v in spans.items() if k.name != "teacher"]
    span = lambda xs: (max(e for _, e in xs) - min(s for s, _ in xs)) / 60 if xs else 0.0  # noqa: E731
    return {"teacher": span(teacher), "students": span(students), "student_jobs": len(students)}


def fixed_samples(data: Path, per_category: int) -> list[int]:
    """The first ``per_category`` test questions of each category: the same pictures in every run."""
    records = json.loads(Path(data).read_text())
    chosen = []
    for cat in CATEGORIES:
        chosen += [i for i, r in enumerate(records) if r.get("category") == cat][:per_category]
    return sorted(chosen)


def summarise(repro, scores: dict[str, list[dict]]) -> dict:
    """Everything the report shows, as plain data (also written to results.json)."""
    rows = []
    for m in repro.methods:
        per_seed = scores[m.key]
        label = m.label + (f" (T={repro.temperature:g})" if m.temperatures else "")
        rows.append({
            "key": m.key, "label": label, "paper": m.paper,
            "all": mean_std([s["all"] for s in per_seed]),
            "categories": {c: mean_std([s[c] for s in per_seed]) for c in CATEGORIES},
            "per_seed": [s["all"] for s in per_seed],
            "losses": {k: statistics.mean(d[k] for d in ls) for ls in
                       [[final_losses(r) for r in repro.runs[m.key]]] for k in ls[0]},
        })
    by_key = {r["key"]: r for r in rows}
    return {
        "preset": vars(repro.preset), "ranks_per_job": repro.ranks_per_job, "cores": repro.cores,
        "slots": max(1, repro.cores // repro.ranks_per_job), "wall_minutes": training_minutes(repro.out),
        "teacher": scores["teacher"][0],
        "rows": rows,
        "kd_temperature": repro.temperature,
        "kd_sweep_val": {f"{t:g}": v for t, v in repro.sweep.items()},
        "align_ti_minus_vanilla_kd": paired_difference(by_key["align_ti"]["per_seed"], by_key["vanilla_kd"]["per_seed"]),
        "align_ti_minus_sft": paired_difference(by_key["align_ti"]["per_seed"], by_key["sft"]["per_seed"]),
        "iva_minus_uniform": paired_difference(by_key["iva"]["per_seed"], by_key["visual_kd_uniform"]["per_seed"]),
    }


def attention_study(repro, out: Path) -> dict:
    """How close each student's attention is to the teacher's at the IVA layer, and the heat-maps."""
    from aligntI.eval.attention_maps import compute_attention_maps, resolve_layers, write_attention_maps

    irs = repro.runs["align_ti"][0] / "irs.json"
    test = repro.data / "test.json"
    teacher = repro.teacher_dir / "final"
    # Closeness over many questions: every seed of every row, and the students before training.
    models = {"teacher": teacher}
    for s in range(repro.preset.seeds):
        models[f"before/seed{s}"] = repro.student_init(s)
    for key, dirs in repro.runs.items():
        for s, d in enumerate(dirs):
            models[f"{key}/seed{s}"] = d / "final"
    layers, source = resolve_layers(models, "teacher", irs=irs)
    result = compute_attention_maps(models, test, list(range(200)), layers, teacher="teacher", batch_size=100,
                                    layer_source=source)
    summary = result.summary()
    closeness = {}
    for key in ["before", *repro.runs]:
        names = [n for n in summary if n.split("/")[0] == key]
        closeness[key] = {stat: mean_std([summary[n][stat] for n in names]) for stat in ("cosine", "tv")}
    # Pictures: teacher, the student before training, after SFT and after Align-TI (seed 0), fixed questions.
    pictures = {"teacher": teacher, "student before": repro.student_init(0),
                "after SFT": repro.runs["sft"][0] / "final", "after Align-TI": repro.runs["align_ti"][0] / "final"}
    layers, source = resolve_layers(pictures, "teacher", irs=irs)
    shown = compute_attention_maps(pictures, test, fixed_samples(test, max(1, repro.preset.heatmap_samples // 4)),
                                   layers, teacher="teacher", layer_source=source)
    paths = write_attention_maps(shown, out / "attention_maps")
    report = json.loads(irs.read_text())
    return {"closeness": closeness, "teacher_layer": layers["teacher"], "student_layer": layers["after Align-TI"],
            "irs": report.get("irs"), "chosen_layer": report.get("chosen_layer"),
            "overview": str(paths["overview"])}


def plot_results(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, (ax, ax_cat) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    x = range(len(rows))
    means = [r["all"][0] for r in rows]
    ax.bar(x, means, yerr=[r["all"][1] for r in rows], capsize=4, color="#7aa6c2", label="mean ± std")
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["per_seed"]), r["per_seed"], s=12, color="#1f3b4d", zorder=3)
    ax.axhline(summary["teacher"]["all"], color="#c0392b", ls="--", label=f"teacher {summary['teacher']['all']:.1f}")
    ax.set_xticks(list(x), [r["label"].split(" (")[0] for r in rows], rotation=25, ha="right")
    ax.set_ylabel("DigitGrid test exact match (%)")
    low = min(min(r["per_seed"]) for r in rows)
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_title(f"{len(rows[0]['per_seed'])} seeds, {summary['preset']['student_steps']} steps")
    ax.legend(loc="lower right", fontsize=8)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(CATEGORIES))]
        ax_cat.bar(xs, [r["categories"][c][0] for c in CATEGORIES], width,
                   yerr=[r["categories"][c][1] for c in CATEGORIES], capsize=2, label=r["label"].split(" (")[0])
    ax_cat.scatter(range(len(CATEGORIES)), [summary["teacher"][c] for c in CATEGORIES], marker="_", s=400,
                   color="#c0392b", zorder=3, label="teacher")
    ax_cat.set_xticks(range(len(CATEGORIES)), CATEGORIES)
    ax_cat.set_ylabel("exact match (%)")
    ax_cat.set_title("per question type")
    ax_cat.set_ylim(0, 128)  # room above the bars for the legend
    ax_cat.legend(fontsize=7, ncol=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(value: tuple[float, float], digits: int = 1) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def _seeds(sweep: dict) -> str:
    n = len(next(iter(sweep.values())))
    return "seed 0" if n == 1 else f"mean over seeds 0-{n - 1}"


def _diff(d: dict) -> str:
    return f"{d['mean']:+.1f} ± {d['std']:.1f} (paired over {d['n']} seeds, p = {d['p_value']:.2f})"


def format_markdown(summary: dict, attention: dict, minutes: float) -> str:
    """``minutes``: this invocation's evaluation and report (training times come from the jobs' records)."""
    p = summary["preset"]
    w = summary["wall_minutes"]
    t = summary["teacher"]
    lines = [
        "# Miniature reproduction of the paper's component table (DigitGrid, CPU)",
        "",
        f"Teacher: SigLIP h64/L2 + Qwen2 h128/L4, SFT {p['teacher_steps']} steps on 30k samples: test exact match "
        f"**{t['all']:.1f}**. Students: the teacher's frozen SigLIP + Qwen2 h64/L2, 3k training samples, "
        f"{p['student_steps']} steps, seeds 0-{p['seeds'] - 1} (initial weights and data order). Test: 1000 held-out "
        f"questions. Paper: Qwen2.5-0.5B student, average of the six benchmarks.",
        "",
        f"Wall time on {summary['cores']} CPU cores: teacher {w['teacher']:.1f} min (2 ranks), {w['student_jobs']} student "
        f"jobs {w['students']:.1f} min ({summary['slots']} side by side, {summary['ranks_per_job']} rank each), test "
        f"evaluation and this report {minutes:.1f} min; total {w['teacher'] + w['students'] + minutes:.1f} min.",
        "",
        "| method | test exact match (mean ± std) | pos | read | sum | odd | per seed | paper (avg of six) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        cats = " | ".join(_pm(r["categories"][c]) for c in CATEGORIES)
        seeds = " / ".join(f"{v:.1f}" for v in r["per_seed"])
        paper = f"{r['paper']:.1f}" if r["paper"] is not None else "—"
        lines.append(f"| {r['label']} | **{_pm(r['all'])}** | {cats} | {seeds} | {paper} |")
    cats = " | ".join(f"{t[c]:.1f}" for c in CATEGORIES)
    lines += [f"| Teacher | {t['all']:.1f} | {cats} | | |", ""]
    a_kd = summary["align_ti_minus_vanilla_kd"]
    resolved = a_kd["p_value"] < 0.05  # False for nan (one seed)
    verdict = ("Align-TI beats vanilla KD here" if resolved and a_kd["mean"] > 0 else
               "vanilla KD beats Align-TI here" if resolved else
               "Align-TI does **not** beat vanilla KD by a margin these seeds resolve")
    lines += [
        f"- Align-TI − vanilla KD: {_diff(a_kd)}. {verdict}.",
        f"- Align-TI − student SFT: {_diff(summary['align_ti_minus_sft'])}.",
        f"- +IVA − uniform visual KD: {_diff(summary['iva_minus_uniform'])}.",
        f"- Vanilla KD temperature, chosen on the validation split ({_seeds(summary['kd_sweep_val'])}): "
        + ", ".join(f"T={k}: {statistics.mean(v):.1f}" for k, v in summary["kd_sweep_val"].items())
        + f" → T={summary['kd_temperature']:g}.",
        "",
        "## Diagnostics",
        "",
        "IRS per teacher layer (Align-TI seed 0's calibration): "
        + ", ".join(f"L{i} {v:.3f}" for i, v in enumerate(attention["irs"] or []))
        + f" → IVA layer {attention['chosen_layer']}; pictures and closeness compare it with student layer "
        f"{attention['student_layer']}.",
        "",
        "| method | final loss terms (last 10% of steps, mean over seeds) | top-1 agreement | s/step | attention cosine to teacher | attention TV to teacher |",
        "|---|---|---|---|---|---|",
    ]
    close = attention["closeness"]
    lines.append(f"| student before training | | | | {_pm(close['before']['cosine'], 3)} | "
                 f"{_pm(close['before']['tv'], 3)} |")
    for r in summary["rows"]:
        ls = r["losses"]
        terms = ", ".join(f"{k} {ls[k]:.3f}" for k in ("sft", "kd", "iva", "tpa") if k in ls) or f"sft {ls['loss']:.3f}"
        agree = f"{ls['top1_agreement']:.3f}" if "top1_agreement" in ls else ""
        c = close[r["key"]]
        lines.append(f"| {r['label']} | {terms} | {agree} | {ls['step_time_s']:.3f} | {_pm(c['cosine'], 3)} | "
                     f"{_pm(c['tv'], 3)} |")
    lines += [
        "",
        "Attention: the instruction→vision focus at the layers above on 200 test questions (cosine: 1 = the "
        "teacher's focus; TV: total variation distance, 0 = the same). Heat-maps of fixed questions: "
        f"`{attention['overview']}`. Chart: `results.png`.",
        "",
    ]
    return "\n".join(lines)


def write_report(repro, scores: dict[str, list[dict]], minutes: float) -> str:
    summary = summarise(repro, scores)
    attention = attention_study(repro, repro.out)
    text = format_markdown(summary, attention, minutes)
    (repro.out / "results.md").write_text(text)
    (repro.out / "results.json").write_text(json.dumps({**summary, "attention": attention}, indent=2) + "\n")
    plot_results(summary, repro.out / "results.png")
    return text
