"""The evaluation recipe (``aligntI eval --config``): one exported model on several benchmarks.

Loaded strictly like a training recipe (:func:`aligntI.yamlconf.load`); benchmark names are checked against
the registry, :data:`aligntI.eval.benchmarks.BENCHMARKS`. Its paths (``model``, ``out``, each benchmark's
files, a ``.jinja`` ``chat_template``) follow the recipes' rule: a relative one, in the file or an override, is
relative to the repository root, not to the current folder; ``~`` is expanded, an absolute path stays as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aligntI.eval.benchmarks import BENCHMARKS
from aligntI.yamlconf import ChatTemplate, ConfigError, RecipePath, load


@dataclass
class BenchmarkConfig:
    """One benchmark of an evaluation recipe, in LLaVA's evaluation-file layout (aligntI/eval/benchmarks/)."""

    name: str  # a key of BENCHMARKS
    data: RecipePath  # the question file
    images: RecipePath | None = None  # image folder (MMBench: inside the TSV)
    annotations: RecipePath | None = None  # references when the question file has none (GQA/SQA/TextVQA/POPE/MME)
    max_samples: int | None = None  # the first N questions

    def validate(self, where: str) -> None:
        if self.name not in BENCHMARKS:
            raise ConfigError(f"{where}.name: {self.name!r} is not one of {list(BENCHMARKS)}")


@dataclass
class EvalRecipe:
    """``aligntI eval --config``: one exported model on several benchmarks, one score table."""

    model: RecipePath
    benchmarks: list[BenchmarkConfig]
    out: RecipePath | None = None  # default: <model>/eval
    chat_template: ChatTemplate | None = None  # default: the processor's (saved with the model)
    batch_size: int = 16  # per rank
    max_new_tokens: int = 128  # LLaVA's evaluation default
    attn: str = "sdpa"  # text attention backend (flash_attention_2 on GPU)
    zero3: bool = False  # partition the model over the ranks (ZeRO-3, synchronised generation)

    def validate(self) -> None:
        for i, bench in enumerate(self.benchmarks):
            bench.validate(f"benchmarks.{i}")
        names = [b.name for b in self.benchmarks]
        if not names:
            raise ConfigError("benchmarks: empty; list at least one")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"benchmarks: {dup[0]} is listed twice")
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")


def load_eval_recipe(path: str | Path, overrides: list[str] | None = None) -> EvalRecipe:
    """An evaluation recipe from YAML (``base:``, ``${vars}``, ``a.b=value`` overrides), validated."""
    return load(path, overrides, EvalRecipe)
