"""TensorBoard and Weights & Biases copies of every ``metrics.jsonl`` record (the recipe's ``logging:`` section).

Rank 0 only, like ``metrics.jsonl``. Each library is imported only when its key is on, so neither is a
dependency of the package. Both continue a resumed run at the step after its checkpoint:

* TensorBoard writes to ``run_dir/tensorboard`` with ``purge_step`` = that step, so what an interrupted run logged
  after its checkpoint (and, for a fresh start, an older run in the same directory) is hidden, not repeated.
* W&B continues the run whose id is kept in ``run_dir/wandb_run_id`` (``resume="allow"``). Steps it already
  has are dropped by W&B itself; an exact resume recomputes the same values for them. ``WANDB_MODE=offline``
  writes ``run_dir/wandb/offline-run-*`` without any network; ``wandb sync <that folder>`` uploads it later.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from aligntI.config import ConfigError, LoggingConfig

WANDB_ID_FILE = "wandb_run_id"


def scalars(record: dict) -> dict[str, float]:
    """A metrics record as flat scalars: a nested mapping (``lr``) as ``lr/<group>``; no ``step``, no None."""
    flat = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}/{name}": v for name, v in value.items() if v is not None})
        else:
            flat[key] = value
    return flat


def _not_installed(key: str, package: str) -> ConfigError:
    return ConfigError(f"{key}: true needs the {package} package, which is not installed: pip install {package}")


class TensorBoardTracker:
    """Scalars for every metric in ``run_dir/tensorboard``, the optimizer step as TensorBoard's step."""

    def __init__(self, run_dir: Path, resume_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise _not_installed("logging.tensorboard", "tensorboard") from err
        # Events at or after purge_step in earlier files are dropped when TensorBoard reads the directory.
        self.writer = SummaryWriter(Path(run_dir) / "tensorboard", purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run with the run's resolved ``config.yaml`` as its config and every metric logged at its step."""

    def __init__(self, run_dir: Path, resume_step: int, project: str):
        try:
            import wandb
        except ImportError as err:
            raise _not_installed("logging.wandb", "wandb") from err
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID_FILE
        # A resumed run continues its W&B run; a fresh start (like metrics.jsonl) begins a new one.
        run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else None
        self.run = wandb.init(
            project=project, name=str(run_dir), id=run_id, resume="allow", dir=run_dir,
            config=yaml.safe_load((run_dir / "config.yaml").read_text()),  # written by setup before this
            allow_val_change=True,  # a resumed run may bring other overrides than the first start
        )
        id_file.write_text(self.run.id + "\n")

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: LoggingConfig, run_dir: Path, resume_step: int) -> list:
    """The trackers the recipe turns on (none by default)."""
    trackers = []
    if cfg.tensorboard:
        trackers.append(TensorBoardTracker(run_dir, resume_step))
    if cfg.wandb:
        trackers.append(WandbTracker(run_dir, resume_step, cfg.wandb_project))
    return trackers
