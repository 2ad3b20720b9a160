"""Per-step metrics on rank 0: ``metrics.jsonl`` (append-only, trimmed on resume), copied to the trackers the
recipe turns on (TensorBoard, W&B: aligntI/training/trackers.py) with the evaluation's scores, and a loss-curve
PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int, trackers: Sequence = ()):
        self.path = Path(path)
        self.trackers = trackers
        if resume_step and self.path.is_file():
            # Lines written after the checkpoint we resume from would be repeated: drop them.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        elif not resume_step:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def write_scores(self, prefix: str, scores: dict, step: int) -> None:
        """Evaluation scores (``{category: {"accuracy": %, "n": count}}``) to the trackers, as ``prefix/category``."""
        record = {"step": step, **{f"{prefix}/{category}": s["accuracy"] for category, s in scores.items()}}
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        """Flush and close the trackers (the W&B run ends here)."""
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_png: Path, keys: tuple[str, ...] = ("loss",)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        steps, values = zip(*points)
        line = ax.plot(steps, values, linewidth=0.6, alpha=0.35)[0]
        window = max(1, len(values) // 50)  # a moving average: single steps are noisy at small batch sizes
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1))
                  for i in range(len(values))]
        ax.plot(steps, smooth, color=line.get_color(), linewidth=1.5, label=f"{key} (mean of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(metrics_path).parent.name)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
