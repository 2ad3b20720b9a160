"""What the miniature reproduction reports: test scores, mean ± std per row, diagnostics, the chart and heat-maps."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


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
    # Differences equal up to rounding have no spread to test against: no p-value (never "resolved").
    spread = std > 1e-9 * max(1.0, abs(mean))
    p = float(stats.ttest_rel(a, b).pvalue) if len(diffs) > 1 and spread else float("nan")
    se = std / len(diffs) ** 0.5  # the standard error of the mean difference (what the t-test divides by)
    return {"mean": mean, "std": std, "se": se, "n": len(diffs), "p_value": p, "per_seed": diffs}


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
        if "seconds" not in job:  # started, never finished
            continue
        ended = job.get("ended", record.stat().st_mtime)
        spans[record.parent] = (ended - job["seconds"], ended)
    teacher = [v for k, v in spans.items() if k.name == "teacher"]
    students = [v for k, v in spans.items() if k.name != "teacher"]
    span = lambda xs: (max(e for _, e in xs) - min(s for s, _ in xs)) / 60 if xs else 0.0  # noqa: E731
    return {"teacher": span(teacher), "students": span(students), "student_jobs": len(students)}


def fixed_samples(data: Path, per_category: int, categories: tuple[str, ...]) -> list[int]:
    """The first ``per_category`` test questions of each category: the same pictures in every run."""
    records = json.loads(Path(data).read_text())
    chosen = []
    for cat in categories:
        chosen += [i for i, r in enumerate(records) if r.get("category") == cat][:per_category]
    return sorted(chosen)


def summarise(repro, scores: dict[str, list[dict]]) -> dict:
    """Everything the report shows, as plain data (also written to results.json)."""
    rows = []
    categories = repro.task.categories
    for m in repro.methods:
        per_seed = scores[m.key]
        label = m.label + (f" (T={repro.temperature:g})" if m.temperatures else "")
        rows.append({
            "key": m.key, "label": label, "paper": m.paper,
            "all": mean_std([s["all"] for s in per_seed]),
            "categories": {c: mean_std([s[c] for s in per_seed]) for c in categories},
            "per_seed": [s["all"] for s in per_seed],
            "run_dirs": [str(d.relative_to(repro.out)) for d in repro.runs[m.key]],  # per seed, as reported
            "losses": {k: statistics.mean(d[k] for d in ls) for ls in
                       [[final_losses(r) for r in repro.runs[m.key]]] for k in ls[0]},
        })
    by_key = {r["key"]: r for r in rows}

    def difference(a: str, b: str) -> dict | None:  # None where --rows left either row out
        return paired_difference(by_key[a]["per_seed"], by_key[b]["per_seed"]) if a in by_key and b in by_key \
            else None

    return {
        "task": repro.task.name, "categories": list(categories),
        "task_options": vars(repro.task.options) if repro.task.options else None,
        "preset": vars(repro.preset), "ranks_per_job": repro.ranks_per_job, "cores": repro.cores,
        "slots": max(1, repro.cores // repro.ranks_per_job), "wall_minutes": training_minutes(repro.out),
        "teacher": scores["teacher"][0], "teacher_dir": str(repro.teacher_dir.relative_to(repro.out)),
        "rows": rows,
        "kd_temperature": repro.temperature,
        "kd_sweep_val": {f"{t:g}": v for t, v in repro.sweep.items()},
        "align_ti_minus_vanilla_kd": difference("align_ti", "vanilla_kd"),
        "align_ti_minus_sft": difference("align_ti", "sft"),
        "iva_minus_uniform": difference("iva", "visual_kd_uniform"),
    }


def attention_study(repro, out: Path) -> dict:
    """How close each student's attention is to the teacher's at the IVA layer, and the heat-maps; None without
    the align_ti row (its IRS calibration picks the layer)."""
    from aligntI.eval.attention_maps import compute_attention_maps, resolve_layers, write_attention_maps

    if "align_ti" not in repro.runs:
        return None
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
    questions = list(range(min(200, len(json.loads(test.read_text())))))
    result = compute_attention_maps(models, test, questions, layers, teacher="teacher", batch_size=100,
                                    layer_source=source)
    summary = result.summary()
    closeness = {}
    for key in ["before", *repro.runs]:
        names = [n for n in summary if n.split("/")[0] == key]
        closeness[key] = {stat: mean_std([summary[n][stat] for n in names]) for stat in ("cosine", "tv")}
    # Pictures: teacher, the student before training, after SFT and after Align-TI (seed 0), fixed questions.
    pictures = {"teacher": teacher, "student before": repro.student_init(0),
                **({"after SFT": repro.runs["sft"][0] / "final"} if "sft" in repro.runs else {}),
                "after Align-TI": repro.runs["align_ti"][0] / "final"}
    layers, source = resolve_layers(pictures, "teacher", irs=irs)
    shown = compute_attention_maps(pictures, test, fixed_samples(test, max(1, repro.preset.heatmap_samples // len(repro.task.categories)),
                                                 repro.task.categories),
                                   layers, teacher="teacher", layer_source=source)
    paths = write_attention_maps(shown, out / "attention_maps")
    report = json.loads(irs.read_text())
    found = {"closeness": closeness, "teacher_layer": layers["teacher"], "student_layer": layers["after Align-TI"],
             "irs": report.get("irs"), "chosen_layer": report.get("chosen_layer"),
             "overview": str(paths["overview"])}
    if "align_ti_as" in repro.runs:  # the same questions, the focus from the answer start (what that row aligns)
        irs_as = repro.runs["align_ti_as"][0] / "irs.json"
        pictures = {k: v for k, v in pictures.items() if k != "after Align-TI"}
        pictures["after Align-TI, answer start"] = repro.runs["align_ti_as"][0] / "final"
        layers, source = resolve_layers(pictures, "teacher", irs=irs_as)
        shown = compute_attention_maps(pictures, test, [s["index"] for s in shown.samples], layers,
                                       teacher="teacher", layer_source=source, queries="answer_start")
        found["overview_answer_start"] = str(write_attention_maps(shown, out / "attention_maps_answer_start")
                                             ["overview"])
    return found


def plot_results(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    categories = summary["categories"]
    fig, (ax, ax_cat) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    x = range(len(rows))
    means = [r["all"][0] for r in rows]
    ax.bar(x, means, yerr=[r["all"][1] for r in rows], capsize=4, color="#7aa6c2", label="mean ± std")
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["per_seed"]), r["per_seed"], s=12, color="#1f3b4d", zorder=3)
    ax.axhline(summary["teacher"]["all"], color="#c0392b", ls="--", label=f"teacher {summary['teacher']['all']:.1f}")
    ax.set_xticks(list(x), [r["label"].split(" (")[0] for r in rows], rotation=25, ha="right")
    ax.set_ylabel(f"{summary['task']} test exact match (%)")
    low = min(min(r["per_seed"]) for r in rows)
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_title(f"{len(rows[0]['per_seed'])} seeds, {summary['preset']['student_steps']} steps")
    ax.legend(loc="lower right", fontsize=8)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(categories))]
        ax_cat.bar(xs, [r["categories"][c][0] for c in categories], width,
                   yerr=[r["categories"][c][1] for c in categories], capsize=2, label=r["label"].split(" (")[0])
    ax_cat.scatter(range(len(categories)), [summary["teacher"][c] for c in categories], marker="_", s=400,
                   color="#c0392b", zorder=3, label="teacher")
    ax_cat.set_xticks(range(len(categories)), categories)
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
    return (f"{d['mean']:+.1f} ± {d['se']:.1f} SE (sd {d['std']:.1f}, paired over {d['n']} seeds, "
            f"p = {d['p_value']:.2f})")


def format_markdown(summary: dict, attention: dict, minutes: float) -> str:
    """``minutes``: this invocation's evaluation and report (training times come from the jobs' records)."""
    p = summary["preset"]
    categories = summary["categories"]
    w = summary["wall_minutes"]
    t = summary["teacher"]
    lines = [
        f"# Miniature reproduction of the paper's component table ({summary['task']}, CPU)",
        "",
        *([f"Task options: `{json.dumps(summary['task_options'])}`.", ""] if summary["task_options"] else []),
        f"Teacher: SigLIP h64/L2 + Qwen2 h128/L4, SFT {p['teacher_steps']} steps: test exact match "
        f"**{t['all']:.1f}**. Students: the teacher's frozen SigLIP + Qwen2 h64/L2, 3k training samples, "
        f"{p['student_steps']} steps, seeds 0-{p['seeds'] - 1} (initial weights and data order). Test: the held-out "
        f"split. Paper: Qwen2.5-0.5B student, average of the six benchmarks.",
        "",
        f"Wall time on {summary['cores']} CPU cores: teacher {w['teacher']:.1f} min (2 ranks), {w['student_jobs']} student "
        f"jobs {w['students']:.1f} min ({summary['slots']} side by side, {summary['ranks_per_job']} rank each), test "
        f"evaluation and this report {minutes:.1f} min; total {w['teacher'] + w['students'] + minutes:.1f} min.",
        "",
        "| method | test exact match (mean ± std) | " + " | ".join(categories) + " | per seed | paper (avg of six) |",
        "|---|---|" + "---|" * len(categories) + "---|---|",
    ]
    for r in summary["rows"]:
        cats = " | ".join(_pm(r["categories"][c]) for c in categories)
        seeds = " / ".join(f"{v:.1f}" for v in r["per_seed"])
        paper = f"{r['paper']:.1f}" if r["paper"] is not None else "—"
        lines.append(f"| {r['label']} | **{_pm(r['all'])}** | {cats} | {seeds} | {paper} |")
    cats = " | ".join(f"{t[c]:.1f}" for c in categories)
    lines += [f"| Teacher | {t['all']:.1f} | {cats} | | |", ""]
    a_kd = summary["align_ti_minus_vanilla_kd"]
    if a_kd is not None:
        resolved = a_kd["p_value"] < 0.05  # False for nan (one seed)
        verdict = ("Align-TI beats vanilla KD here" if resolved and a_kd["mean"] > 0 else
                   "vanilla KD beats Align-TI here" if resolved else
                   "Align-TI does **not** beat vanilla KD by a margin these seeds resolve")
        lines.append(f"- Align-TI − vanilla KD: {_diff(a_kd)}. {verdict}.")
    for key, name in (("align_ti_minus_sft", "Align-TI − student SFT"),
                      ("iva_minus_uniform", "+IVA − uniform visual KD")):
        if summary[key] is not None:
            lines.append(f"- {name}: {_diff(summary[key])}.")
    if summary["kd_temperature"] is not None:
        lines.append(
            f"- Vanilla KD temperature, chosen on the validation split ({_seeds(summary['kd_sweep_val'])}): "
            + ", ".join(f"T={k}: {statistics.mean(v):.1f}" for k, v in summary["kd_sweep_val"].items())
            + f" → T={summary['kd_temperature']:g}.")
    lines += ["", "## Diagnostics", ""]
    if attention is not None:
        lines += ["IRS per teacher layer (Align-TI seed 0's calibration): "
                  + ", ".join(f"L{i} {v:.3f}" for i, v in enumerate(attention["irs"] or []))
                  + f" → IVA layer {attention['chosen_layer']}; pictures and closeness compare it with student "
                  f"layer {attention['student_layer']}.", ""]
    else:
        lines += ["No attention study: it reads the IVA layer from the Align-TI row's calibration, and `--rows` "
                  "left that row out.", ""]
    close = attention["closeness"] if attention is not None else {}
    lines += [
        "| method | final loss terms (last 10% of steps, mean over seeds) | top-1 agreement | s/step | attention cosine to teacher | attention TV to teacher |",
        "|---|---|---|---|---|---|",
    ]
    if close:
        lines.append(f"| student before training | | | | {_pm(close['before']['cosine'], 3)} | "
                     f"{_pm(close['before']['tv'], 3)} |")
    for r in summary["rows"]:
        ls = r["losses"]
        terms = ", ".join(f"{k} {ls[k]:.3f}" for k in ("sft", "kd", "iva", "tpa") if k in ls) or f"sft {ls['loss']:.3f}"
        agree = f"{ls['top1_agreement']:.3f}" if "top1_agreement" in ls else ""
        c = close.get(r["key"])
        attn = f"{_pm(c['cosine'], 3)} | {_pm(c['tv'], 3)}" if c else "— | —"
        lines.append(f"| {r['label']} | {terms} | {agree} | {ls['step_time_s']:.3f} | {attn} |")
    lines.append("")
    if attention is not None:
        lines += [
            "Attention: the instruction→vision focus at the layers above on 200 test questions (cosine: 1 = the "
            "teacher's focus; TV: total variation distance, 0 = the same). Heat-maps of fixed questions: "
            f"`{attention['overview']}`"
            + (f"; the focus from the answer start, with Align-TI's answer-start row: "
               f"`{attention['overview_answer_start']}`" if "overview_answer_start" in attention else "")
            + ". Chart: `results.png`.", ""]
    else:
        lines += ["Chart: `results.png`.", ""]
    return "\n".join(lines)


def write_report(repro, scores: dict[str, list[dict]], minutes: float) -> str:
    summary = summarise(repro, scores)
    attention = attention_study(repro, repro.out)
    text = format_markdown(summary, attention, minutes)
    mech = None
    if repro.task.options is not None:  # GridRead: where the relevant region is known and answers are long
        mech = mechanism_study(repro)
        text += "\n" + format_mechanisms(summary, mech)
        plot_mechanisms(summary, mech, repro.out / "mechanisms.png")
    (repro.out / "results.md").write_text(text)
    (repro.out / "results.json").write_text(json.dumps({**summary, "attention": attention, "mechanisms": mech},
                                                       indent=2) + "\n")
    plot_results(summary, repro.out / "results.png")
    return text


# -- GridRead: the mechanisms, the predictions made from the task's design, and which held ----------------

# Written from GridRead's design before its table was run; each is checked against the table it reports.
# (key, what should happen, row a, row b, measure, sign: +1 if a should exceed b, -1 if it should be below)
PREDICTIONS = (
    ("iva_one_cell", "IVA's teacher-attention weights beat uniform weights on one-cell questions (a cell is 6% of "
     "the vision tokens: uniform weights spend the rest of the vision-token KL elsewhere)", "iva",
     "visual_kd_uniform", "exact:cells:1", +1),
    ("tpa_transition", "+TPA lowers the held-out transition KL against vanilla KD (what TPA minimises)", "tpa",
     "vanilla_kd", "transition_kl", -1),
    ("tpa_long", "+TPA beats vanilla KD on long answers (8+ words; per-item accuracy), where an early wrong token "
     "leaves the student off the path for many more", "tpa", "vanilla_kd", "items:long", +1),
    ("align_ti_vs_iva", "Align-TI beats +IVA overall (TPA adds to IVA)", "align_ti", "iva", "items:all", +1),
    ("align_ti_vs_kd", "Align-TI beats vanilla KD overall", "align_ti", "vanilla_kd", "items:all", +1),
    # Added after the capture check failed on the question's rows (the teacher looks at the asked cell from the
    # answer start, recipes/mini/gridread_focus_by_query.py), before the answer-start rows were first run.
    ("iva_as_one_cell", "IVA with the answer-start focus beats uniform weights on one-cell questions (its weights "
     "follow the asked cell)", "iva_as", "visual_kd_uniform", "exact:cells:1", +1),
    ("align_ti_as_vs_kd", "Align-TI with the answer-start focus beats vanilla KD overall", "align_ti_as",
     "vanilla_kd", "items:all", +1),
    # Added after the answer-start rows' table (weights on the asked cell, no gain), before these rows were run
    # on the test split (their IVA weight was chosen on the validation split).
    ("iva_attention_one_cell", "IVA aligning the answer-start attention itself (iva.mode: attention) beats uniform "
     "weights on one-cell questions (it teaches where to look)", "iva_attn", "visual_kd_uniform", "exact:cells:1",
     +1),
    ("align_ti_attention_vs_kd", "Align-TI with attention alignment beats vanilla KD overall", "align_ti_attn",
     "vanilla_kd", "items:all", +1),
    ("align_ti_attention_vs_iva", "TPA adds to attention-alignment IVA (Align-TI, attention alignment vs +IVA, "
     "attention alignment)", "align_ti_attn", "iva_attn", "items:all", +1),
    # Added with the two_rows category (long answers that need addressing: the teacher reads them, students do
    # not), before any table with it was run.
    ("tpa_two_rows", "+TPA beats vanilla KD on two-row read-outs (9 words that need addressing; per-item "
     "accuracy): after an off-path digit the teacher still says which cell comes next", "tpa", "vanilla_kd",
     "items:two_rows", +1),
    ("align_ti_attention_two_rows", "TPA adds to attention-alignment IVA on two-row read-outs (per-item accuracy)",
     "align_ti_attn", "iva_attn", "items:two_rows", +1),
)
LENGTH_KEYS = ("len:1-2", "len:3-7", "len:8-14", "len:15+")
QUERY_NAMES = {"instruction": "the question's tokens", "answer_start": "the answer-start position"}


def _items_of(model_dir: Path, records: dict) -> tuple[dict, set[str]]:
    from aligntI.eval.generation import normalize_answer
    from aligntI.eval.items import item_scores

    preds = [json.loads(line) for line in (Path(model_dir) / "eval" / "test_predictions.jsonl").open()]
    right = {p["id"] for p in preds if normalize_answer(p["prediction"]) == normalize_answer(p["reference"])}
    return item_scores(preds, records), right


def mechanism_study(repro) -> dict:
    """Per-item scores of every model (from its test predictions), the teacher's capture at the IVA layer and
    each student's ground-truth and transition KL to the teacher on the first test questions."""
    import torch

    from aligntI.config import AttentionConfig
    from aligntI.eval.mechanisms import divergences, held_out_loader, teacher_focus
    from aligntI.hooks.attention import install
    from aligntI.models.loading import load_model, load_processor

    install()  # before any model is loaded: the capture and the candidate pass go through the wrapped kernels
    test = repro.data / "test.json"
    records = {r["id"]: r for r in json.loads(test.read_text())}
    load = lambda d: load_model(str(d), AttentionConfig("sdpa", "sdpa"), torch.float32).eval()  # noqa: E731
    teacher_dir = repro.teacher_dir / "final"
    processor = load_processor(str(teacher_dir))
    teacher = load(teacher_dir)
    loader = held_out_loader(processor, str(test), repro.preset.mechanism_samples, batch_size=50)
    teacher_items, right = _items_of(teacher_dir, records)
    capture = {}  # query rows -> the teacher's capture at the layer the Align-TI row of those rows calibrated
    for queries, key in (("instruction", "align_ti"), ("answer_start", "align_ti_as")):
        if key in repro.runs:
            layer = json.loads((repro.runs[key][0] / "irs.json").read_text())["chosen_layer"]
            capture[queries] = teacher_focus(teacher, loader, records, repro.task.options.grid, layer,
                                             correct=right, queries=queries)
    rows = {}
    for key in tqdm_([m.key for m in repro.methods], "mechanisms"):  # the table's order
        dirs = repro.runs[key]
        per_seed = []
        for d in dirs:
            items, _ = _items_of(d / "final", records)
            kl = divergences(teacher, load(d / "final"), loader, records, never=(processor.image_token_id,))
            flat = {f"exact:{k}": v["exact"] for k, v in items.items()}
            flat |= {f"items:{k}": v["items"] for k, v in items.items()}
            flat |= {"transition_kl": kl["all"]["transition_kl"], "gt_kl": kl["all"]["gt_kl"]}
            flat |= {f"transition_kl:{k}": v["transition_kl"] for k, v in kl.items() if k != "all"}
            per_seed.append(flat)
        rows[key] = {k: [s[k] for s in per_seed] for k in per_seed[0]}
    checks = []
    for key, text, a, b, measure, sign in PREDICTIONS:
        if a not in rows or b not in rows or measure not in rows[a]:  # a row --rows left out, a category not mixed
            continue
        d = paired_difference(rows[a][measure], rows[b][measure])
        checks.append({"key": key, "prediction": text, "a": a, "b": b, "measure": measure, "sign": sign,
                       "difference": d, "held": d["mean"] * sign > 0,
                       "a_value": mean_std(rows[a][measure]), "b_value": mean_std(rows[b][measure])})
    return {"teacher_items": teacher_items, "capture": capture, "rows": rows, "checks": checks,
            "samples": repro.preset.mechanism_samples}


def tqdm_(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, dynamic_ncols=True)


def plot_capture(ax_c, captures: dict) -> None:
    """The teacher's IVA weight on the relevant cells against their token share, per region and query rows."""
    first = next(iter(captures.values()))["relevant"]
    regions = sorted((k for k in first if k.startswith("cells:")), key=lambda k: int(k.split(":")[1]))
    width = 0.8 / (1 + len(captures))
    ax_c.bar([i - 0.4 + width / 2 for i in range(len(regions))], [first[k]["token_share"] for k in regions], width,
             label="token share (uniform)")
    for j, (queries, cap) in enumerate(captures.items(), start=1):
        ax_c.bar([i - 0.4 + (j + 0.5) * width for i in range(len(regions))],
                 [cap["relevant"][k]["weight_share"] for k in regions], width,
                 label=f"IVA weight, {QUERY_NAMES[queries]} (layer {cap['iva_layer']})")
    ax_c.set_xticks(range(len(regions)), [f"{k.split(':')[1]} cells" for k in regions])
    ax_c.set_ylabel("weight on the relevant cells' tokens")
    ax_c.set_title("the teacher's IVA weights on the relevant cells")
    ax_c.legend(fontsize=8)


def plot_mechanisms(summary: dict, mech: dict, path: Path) -> None:
    """Three panels: the teacher's IVA weight against the token share by region, each row's KLs, each row's
    per-item accuracy by answer length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {r["key"]: r["label"].split(" (")[0] for r in summary["rows"]}
    captures = mech["capture"]
    fig, axes = plt.subplots(1, 3 if captures else 2, figsize=(16 if captures else 11, 4.8))
    ax_kl, ax_len = axes[-2:]
    if captures:
        plot_capture(axes[0], captures)
    keys = [k for k in labels if k in mech["rows"]]
    for j, (measure, name) in enumerate((("gt_kl", "ground-truth path"), ("transition_kl", "after off-path token"))):
        vals = [mean_std(mech["rows"][k][measure]) for k in keys]
        ax_kl.bar([i + (j - 0.5) * 0.4 for i in range(len(keys))], [v[0] for v in vals], 0.4,
                  yerr=[v[1] for v in vals], capsize=3, label=name)
    ax_kl.set_xticks(range(len(keys)), [labels[k] for k in keys], rotation=25, ha="right")
    ax_kl.set_ylabel("KL(teacher ‖ student) per position")
    ax_kl.set_title("held-out next-token KL")
    ax_kl.legend(fontsize=8)
    present = [k for k in LENGTH_KEYS if f"items:{k}" in mech["rows"][keys[0]]]
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        vals = [mean_std(mech["rows"][k][f"items:{b}"]) for b in present]
        ax_len.bar([c + (i - (len(keys) - 1) / 2) * width for c in range(len(present))], [v[0] for v in vals], width,
                   yerr=[v[1] for v in vals], capsize=2, label=labels[k])
    ax_len.set_xticks(range(len(present)), [f"{b.split(':')[1]} words" for b in present])
    ax_len.set_ylabel("per-item accuracy (%)")
    ax_len.set_title("by answer length")
    ax_len.set_ylim(0, 115)
    ax_len.legend(fontsize=7, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_mechanisms(summary: dict, mech: dict) -> str:
    labels = {r["key"]: r["label"] for r in summary["rows"]}
    lines = ["## Predictions and what held", "",
             "Made from GridRead's design before the table was run (the direction each difference should take); "
             "a difference is resolved when its paired p < 0.05.", "",
             "| prediction | measure | rows | a | b | a − b (paired, ± SE) | held |", "|---|---|---|---|---|---|---|"]
    for c in mech["checks"]:
        d = c["difference"]
        resolved = d["p_value"] < 0.05
        verdict = ("yes" if c["held"] else "**no**") + (" (resolved)" if resolved else " (not resolved)")
        lines.append(f"| {c['prediction']} | `{c['measure']}` | {summary_label(labels, c['a'])} vs "
                     f"{summary_label(labels, c['b'])} | {_pm(c['a_value'], 3)} | {_pm(c['b_value'], 3)} | "
                     f"{d['mean']:+.3f} ± {d['se']:.3f} (p = {d['p_value']:.2f}) | {verdict} |")
    lines += ["", f"## Mechanisms (first {mech['samples']} test questions)", ""]
    for queries, cap in mech["capture"].items():
        rel = cap["relevant"]
        lines += [f"IVA's focus from {QUERY_NAMES[queries]} (`iva.queries: {queries}`). Teacher IRS per layer on "
                  "held-out questions: " + ", ".join(f"L{i} {v:.3f}" for i, v in enumerate(cap["irs"]))
                  + f"; IVA layer (chosen by the training calibration) {cap['iva_layer']}, {cap['vision_tokens']} "
                  "vision tokens.", "",
                  "| questions | n | IVA weight on the relevant cells | their token share (= uniform weights) | ratio |",
                  "|---|---|---|---|---|"]
        order = sorted(rel, key=lambda k: (k.startswith("right:"), not k.removeprefix("right:").startswith("cells:"),
                                           k))
        for k in order:
            v = rel[k]
            name = k.replace("right:", "teacher right, ")
            lines.append(f"| {name} | {v['n']} | {v['weight_share']:.3f} | {v['token_share']:.3f} | "
                         f"{v['weight_share'] / v['token_share']:.2f}x |")
        lines.append("")
    lines += ["| method | transition KL (off-path) | next-token KL (ground truth) | item accuracy | long answers, "
              "items | one-cell, exact | whole grid, exact |", "|---|---|---|---|---|---|---|"]
    cells = sorted((k for k in next(iter(mech["rows"].values())) if k.startswith("exact:cells:")),
                   key=lambda k: int(k.rsplit(":", 1)[1]))
    for key, m in mech["rows"].items():
        lines.append(f"| {labels[key]} | {_pm(mean_std(m['transition_kl']), 3)} | {_pm(mean_std(m['gt_kl']), 3)} | "
                     f"{_pm(mean_std(m['items:all']))} | {_pm(mean_std(m['items:long']))} | "
                     f"{_pm(mean_std(m[cells[0]]))} | {_pm(mean_std(m[cells[-1]]))} |")
    t = mech["teacher_items"]
    lines += [f"| Teacher | 0 | 0 | {t['all']['items']:.1f} | {t['long']['items']:.1f} | "
              f"{t[cells[0].removeprefix('exact:')]['exact']:.1f} | {t[cells[-1].removeprefix('exact:')]['exact']:.1f} |",
              "", "Exact match / per-item accuracy by answer length (words) and by relevant region (cells), mean "
              "over seeds:", "",
              "| method | " + " | ".join(k.replace("len:", "") + " words" for k in LENGTH_KEYS if k in t)
              + " | " + " | ".join(k.removeprefix("exact:cells:") + " cells" for k in cells) + " |",
              "|---|" + "---|" * (sum(k in t for k in LENGTH_KEYS) + len(cells))]
    for key, m in mech["rows"].items():
        by_len = [f"{statistics.mean(m[f'exact:{k}']):.1f} / {statistics.mean(m[f'items:{k}']):.1f}"
                  for k in LENGTH_KEYS if k in t]
        by_cells = [f"{statistics.mean(m[c]):.1f} / {statistics.mean(m['items:' + c.removeprefix('exact:')]):.1f}"
                    for c in cells]
        lines.append(f"| {labels[key]} | " + " | ".join(by_len + by_cells) + " |")
    by_len = [f"{t[k]['exact']:.1f} / {t[k]['items']:.1f}" for k in LENGTH_KEYS if k in t]
    by_cells = [f"{t[c.removeprefix('exact:')]['exact']:.1f} / {t[c.removeprefix('exact:')]['items']:.1f}"
                for c in cells]
    lines += ["| Teacher | " + " | ".join(by_len + by_cells) + " |", "", "Chart: `mechanisms.png`.", ""]
    return "\n".join(lines)


def summary_label(labels: dict, key: str) -> str:
    return labels[key].split(" (")[0]
