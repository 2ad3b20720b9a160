"""What a restart may change: this start's resolved recipe against the one its checkpoint was trained under.

Every checkpoint records the recipe it was trained under (``trainer_state.pt``). A restart compares, key by key:

* **refused** (exit 2, nothing in the run folder written): whatever decides the model the run produces: the
  models, the data, the loss terms and their weights, the method's options, the optimiser, the schedule, the
  global batch, the seed, ZeRO's stage, the precision and gradient clipping;
* **passes, recorded**: what cannot change the result: where the run lives, logging, checkpoint frequency,
  evaluation, data workers, attention kernels, activation checkpointing, the teacher's placement, chunk sizes,
  TPA's student passes (equal to 1e-7), the micro-batch and accumulation that make up the same global batch;
* **accepted, recorded**: a refused key the recipe names in ``accept_changes`` and that takes effect on a
  restart (:data:`ACCEPTABLE`). The optimiser's settings never do (its restored state carries them); neither do
  the seed and the global batch (they fix which samples each step draws) nor the trainable parts, ZeRO's stage
  and the precision (the checkpoint's layout).

Each start writes its resolved recipe and the differences it let through to ``run_dir/starts/NNN.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from aligntI.config import ConfigError, zero_stage
from aligntI.engine.checkpoints import atomic_write
from aligntI.training.schedule import cosine_with_warmup, warmup_steps_for
from aligntI.yamlconf import flatten, under

# Keys (dotted prefixes) whose change cannot alter the model a run produces.
INERT = (
    "run_dir", "resume", "logging", "eval",
    "train.save_every", "train.keep_last", "train.log_every",
    "train.micro_batch_size", "train.gradient_accumulation_steps",  # the same global batch, another layout
    "data.num_workers", "data.on_bad_sample", "data.allow_images_outside",
    "model.attn_implementation", "model.activation_checkpointing",
    "teacher.attn_implementation", "teacher.placement",
    "kd.chunk_size", "tpa.student_passes",
    "engine.ds_config",  # the file; what of it decides the result is compared under deepspeed.*
)
# Refused keys that ``accept_changes`` may let through, and what happens when it does.
ACCEPTABLE = {
    "train.max_steps": "the cosine schedule is recomputed for the new length",
    "train.epochs": "the cosine schedule is recomputed for the new length",
    "model.path": "the weights come from the checkpoint; the folder gives the architecture and the processor",
    "teacher.path": "the new teacher from the resumed step on (iva.layer auto is recalibrated for it)",
    "data": "the new data from the resumed step on, drawn in its own order",
    "loss": "the new weights from the resumed step on",
    "kd": "the new setting from the resumed step on",
    "iva": "the new setting from the resumed step on",
    "tpa": "the new setting from the resumed step on",
    "irs": "the new setting from the resumed step on",
}


def comparable(cfg, ds_config: dict) -> dict:
    """The resolved recipe as compared on restart: the recipe and what of the DeepSpeed JSON decides the result."""
    recipe = dataclasses.asdict(cfg)
    del recipe["accept_changes"]  # how this start treats differences, recorded with them in starts/NNN.yaml
    return {**recipe, "deepspeed": {
        "zero_optimization.stage": zero_stage(ds_config),
        "bf16.enabled": bool(ds_config.get("bf16", {}).get("enabled", False)),
        "gradient_clipping": ds_config.get("gradient_clipping", 0.0),
    }}


@dataclass
class Change:
    key: str
    was: object
    now: object
    verdict: str  # "passes", "accepted" or "refused"
    effect: str = ""

    def line(self) -> str:
        return f"{self.key}: {_show(self.was)} -> {_show(self.now)}"


class _Absent:
    """A key one of the two recipes does not have."""

    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class Verdict:
    changes: list[Change] = field(default_factory=list)

    @property
    def refused(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == "refused"]

    def record(self) -> list[dict]:
        return [{"key": c.key, "was": c.was if c.was is not _ABSENT else None,
                 "now": c.now if c.now is not _ABSENT else None, "verdict": c.verdict,
                 **({"effect": c.effect} if c.effect else {})} for c in self.changes]


def compare(saved: dict, current: dict, accept: list[str]) -> Verdict:
    """Each key that differs between the checkpoint's recipe and this start's, with its verdict."""
    old, new = flatten(saved), flatten(current)
    verdict = Verdict()
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if was == now:
            continue
        if under(key, INERT):
            verdict.changes.append(Change(key, was, now, "passes"))
            continue
        named = under(key, accept)
        acceptable = under(key, ACCEPTABLE)
        if named and acceptable:
            verdict.changes.append(Change(key, was, now, "accepted", ACCEPTABLE[acceptable]))
        else:
            verdict.changes.append(Change(key, was, now, "refused",
                                          f"cannot be accepted: {_why_not(key)}" if named else ""))
    return verdict


def check_restart(saved: dict, current: dict, accept: list[str], checkpoint: Path) -> Verdict:
    """The verdict on restarting from ``checkpoint``; a refused change is a ConfigError listing every one."""
    verdict = compare(saved, current, accept)
    refused = verdict.refused
    if refused:
        lines = "; ".join(c.line() + (f" ({c.effect})" if c.effect else "") for c in refused)
        acceptable = [c.key for c in refused if under(c.key, ACCEPTABLE) and not c.effect]
        ways = ["a new run_dir", "resume: never (starts over in this run_dir: step 1, a new metrics.jsonl)"]
        if acceptable:
            ways.append(f"accept_changes=[{','.join(acceptable)}] to continue with the change, recorded")
        raise ConfigError(f"resume: {checkpoint} was trained under another recipe: {lines}. Ways on: "
                          + "; ".join(ways))
    return verdict


def _why_not(key: str) -> str:
    if key.startswith("optim."):
        return "the optimizer's restored state carries its own settings"
    if key in ("seed", "train.global_batch_size"):
        return "it fixes which samples each step draws"
    return "the checkpoint's layout depends on it"


def record_start(run_dir: Path, cfg, resolved: dict, verdict: Verdict | None, step: int,
                 checkpoint: Path | None) -> Path:
    """``run_dir/starts/NNN.yaml``: this start's resolved recipe (with ``resolved``: the values derived at
    start-up), where it started and what changed; ``run_dir/config.yaml`` is a copy of the newest."""
    starts = run_dir / "starts"
    starts.mkdir(parents=True, exist_ok=True)
    number = len(list(starts.glob("[0-9][0-9][0-9].yaml"))) + 1
    path = starts / f"{number:03d}.yaml"
    payload = {**dataclasses.asdict(cfg), "resolved": resolved, "start": {
        "number": number, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from_step": step,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "changes": [] if verdict is None else verdict.record(),
    }}
    text = yaml.safe_dump(payload, sort_keys=False)
    atomic_write(path, text)
    atomic_write(run_dir / "config.yaml", text)
    return path


def describe(verdict: Verdict | None, point, total_steps: int, optim) -> list[str]:
    """Log lines for what a restart let through, and what a new run length does to the LR schedule."""
    lines = [f"resume: {c.line()} ({c.verdict}{': ' + c.effect if c.effect else ''})"
             for c in (verdict.changes if verdict else [])]
    was_total = point.saved.get("total_steps", total_steps)
    if was_total != total_steps:
        def lr(total: int) -> float:
            factor = cosine_with_warmup(total, warmup_steps_for(total, optim.warmup_ratio), optim.min_lr_ratio)
            return optim.lr * factor(point.step)

        lines.append(f"resume: the cosine schedule is recomputed for {total_steps} steps (was {was_total}): the lr "
                     f"of step {point.step + 1} is {lr(total_steps):.3g} (it would have been {lr(was_total):.3g})")
    return lines
