"""Recipe schema: nested dataclasses loaded strictly from YAML plus ``dotted.key=value`` overrides.

Unknown keys, wrong types and inconsistent values raise :class:`ConfigError` naming the file and the
key. Nothing here mutates what the user wrote: derived values (gradient accumulation, world size) are
computed in :func:`resolve_batching`, which needs the world size and so runs after distributed start-up.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

TRAINABLE_PARTS = ("vision_tower", "projector", "llm")


class ConfigError(ValueError):
    """A recipe is malformed: the message names the file and the key."""


@dataclass
class AttentionConfig:
    """Attention backend per sub-model (`sdpa` or `eager` on CPU, `flash_attention_2` on GPU)."""

    text: str = "sdpa"
    vision: str = "sdpa"


@dataclass
class ModelConfig:
    path: str
    attn_implementation: AttentionConfig = field(default_factory=AttentionConfig)
    trainable: list[str] = field(default_factory=lambda: ["projector", "llm"])
    activation_checkpointing: bool = False

    def validate(self, where: str) -> None:
        for part in self.trainable:
            if part not in TRAINABLE_PARTS:
                raise ConfigError(f"{where}.trainable: unknown part {part!r}; choose from {list(TRAINABLE_PARTS)}")
        if len(set(self.trainable)) != len(self.trainable):
            raise ConfigError(f"{where}.trainable: duplicate entries in {self.trainable}")


@dataclass
class DataSource:
    """One LLaVA-format JSON/JSONL file; ``weight`` scales how often it is drawn per epoch."""

    path: str
    images: str | None = None  # image folder; default: the folder holding ``path``
    weight: float = 1.0
    max_samples: int | None = None  # keep only the first N records (e.g. a student's data subset)


@dataclass
class DataConfig:
    """The training data and how its samples become batches.

    ``allow_images_outside``: a record's image path must resolve (``..``, absolute paths and symlinks
    followed) inside its source's image folder, so that a data file cannot make the trainer read any file;
    ``true`` lifts that for every file the recipe reads samples from (training, ``eval.data``, ``irs.data``).
    """

    train: list[DataSource]
    chat_template: str | None = None  # shipped template name or a .jinja path; None: the processor's own
    max_length: int = 2048
    padding_side: Literal["right", "left"] = "right"
    on_bad_sample: Literal["error", "skip"] = "error"
    num_workers: int = 2
    allow_images_outside: bool = False

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("data.train: at least one source is required")
        for i, src in enumerate(self.train):
            if src.weight <= 0:
                raise ConfigError(f"data.train.{i}.weight: must be > 0, got {src.weight}")
            if src.max_samples is not None and src.max_samples <= 0:
                raise ConfigError(f"data.train.{i}.max_samples: must be > 0, got {src.max_samples}")
        if self.max_length <= 0:
            raise ConfigError(f"data.max_length: must be > 0, got {self.max_length}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class OptimConfig:
    lr: float
    projector_lr: float | None = None  # LLaVA-style recipes train the projector faster
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise ConfigError(f"optim.projector_lr: must be > 0, got {self.projector_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: need two values in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int | None = None  # None: derived from the world size
    max_steps: int | None = None
    epochs: float | None = None
    save_every: int = 0  # optimizer steps between checkpoints; 0 saves only at the end
    keep_last: int = 2
    log_every: int = 1

    def validate(self) -> None:
        for key in ("global_batch_size", "micro_batch_size", "keep_last", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}: must be > 0, got {getattr(self, key)}")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError("train.max_steps / train.epochs: give exactly one of them")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"train.max_steps: must be > 0, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs: must be > 0, got {self.epochs}")
        if self.save_every < 0:
            raise ConfigError(f"train.save_every: must be >= 0, got {self.save_every}")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``epochs`` of ``steps_per_epoch`` (at least one)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, int(self.epochs * steps_per_epoch))


@dataclass
class EngineConfig:
    ds_config: str  # JSON under ds_configs/: ZeRO and communication settings
    zero_stage: Literal[0, 1, 2, 3] = 3  # must agree with the JSON; stated here so a recipe reads alone
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass
class EvalConfig:
    data: str
    images: str | None = None
    max_new_tokens: int = 16
    batch_size: int = 64
    max_samples: int | None = None
    category_key: str = "category"  # record field that per-category accuracy groups by


@dataclass
class BenchmarkConfig:
    """One benchmark of an evaluation recipe, in LLaVA's evaluation-file layout (aligntI/eval/benchmarks.py)."""

    name: Literal["gqa", "sqa_img", "textvqa", "pope", "mme", "mmbench"]
    data: str  # the question file
    images: str | None = None  # image folder (MMBench: inside the TSV)
    annotations: str | None = None  # references when the question file has none (GQA/SQA/TextVQA/POPE/MME)
    max_samples: int | None = None  # the first N questions


@dataclass
class EvalRecipe:
    """``aligntI eval --config``: one exported model on several benchmarks, one score table."""

    model: str
    benchmarks: list[BenchmarkConfig]
    out: str | None = None  # default: <model>/eval
    chat_template: str | None = None  # default: the processor's (saved with the model)
    batch_size: int = 16  # per rank
    max_new_tokens: int = 128  # LLaVA's evaluation default
    attn: str = "sdpa"  # text attention backend (flash_attention_2 on GPU)
    zero3: bool = False  # partition the model over the ranks (ZeRO-3, synchronised generation)

    def validate(self) -> None:
        names = [b.name for b in self.benchmarks]
        if not names:
            raise ConfigError("benchmarks: empty; list at least one")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"benchmarks: {dup[0]} is listed twice")
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class TeacherConfig:
    """The frozen model distilled from: its own DeepSpeed engine, no optimizer, sharded like the student."""

    path: str
    attn_implementation: AttentionConfig = field(default_factory=AttentionConfig)
    offload_params: bool = False  # ZeRO-3: keep the teacher's parameters in CPU memory between uses


@dataclass
class LossWeights:
    """λ of each term of ``λ_sft·L_sft + λ_kd·L_kd + λ_iva·L_iva + λ_tpa·L_tpa`` (1 for all, as in the paper)."""

    sft: float = 1.0
    kd: float = 1.0
    iva: float = 1.0
    tpa: float = 1.0

    def validate(self) -> None:
        for key, value in dataclasses.asdict(self).items():
            if value < 0:
                raise ConfigError(f"loss.{key}: must be >= 0, got {value}")


@dataclass
class KDConfig:
    """Response-token distillation."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"] = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5  # jsd: M = β·P_teacher + (1-β)·P_student
    skew_alpha: float = 0.1  # skew_kl: KL(P_teacher ‖ α·P_teacher + (1-α)·P_student)
    chunk_size: int = 1024  # positions per fp32 softmax chunk

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"kd.temperature: must be > 0, got {self.temperature}")
        if not 0 < self.jsd_beta < 1:
            raise ConfigError(f"kd.jsd_beta: must be in (0, 1) (the endpoints are forward_kl/reverse_kl), "
                              f"got {self.jsd_beta}")
        if not 0 <= self.skew_alpha < 1:
            raise ConfigError(f"kd.skew_alpha: must be in [0, 1), got {self.skew_alpha}")
        if self.chunk_size <= 0:
            raise ConfigError(f"kd.chunk_size: must be > 0, got {self.chunk_size}")


@dataclass
class IVAConfig:
    """Instruction-aware vision alignment."""

    layer: Literal["auto"] | int = "auto"  # teacher layer; auto: argmax IRS on calibration samples at start-up
    mode: Literal["weighted_kl", "attention"] = "weighted_kl"
    weights: Literal["teacher_attention", "uniform"] = "teacher_attention"  # weighted_kl only
    top_ratio: float = 1.0  # teacher_attention: keep the largest ρ·N_v weights, renormalised
    student_layer: int | None = None  # attention mode; default: the teacher layer's relative depth

    def validate(self) -> None:
        if isinstance(self.layer, int) and self.layer < 0:
            raise ConfigError(f"iva.layer: must be >= 0 or 'auto', got {self.layer}")
        if not 0 < self.top_ratio <= 1:
            raise ConfigError(f"iva.top_ratio: must be in (0, 1], got {self.top_ratio}")
        if self.weights == "uniform" and self.top_ratio < 1:
            raise ConfigError("iva.top_ratio: only applies to iva.weights: teacher_attention (uniform has no ranking)")
        if self.mode == "attention" and self.weights == "uniform":
            raise ConfigError("iva.weights: uniform is a weighted_kl baseline; iva.mode: attention aligns the "
                              "teacher's attention itself")
        if self.mode == "weighted_kl" and self.student_layer is not None:
            raise ConfigError("iva.student_layer: only used by iva.mode: attention")
        if self.student_layer is not None and self.student_layer < 0:
            raise ConfigError(f"iva.student_layer: must be >= 0, got {self.student_layer}")

    @property
    def uses_teacher_attention(self) -> bool:
        return self.mode == "attention" or self.weights == "teacher_attention"


@dataclass
class TPAConfig:
    """Transition probability alignment."""

    candidates: int = 4  # d tokens per response position
    source: Literal["student", "teacher", "gt_bigram"] = "student"  # whose distribution the candidates come from
    exclude_gt: bool = True  # never draw the ground-truth token (its transition is the next KD row)
    weighting: Literal["uniform", "student_prob"] = "uniform"  # candidate weights within a position
    max_positions: int | None = None  # per sample, drawn at random each step; default: every response position

    def validate(self) -> None:
        if self.candidates < 1:
            raise ConfigError(f"tpa.candidates: must be >= 1, got {self.candidates}")
        if self.max_positions is not None and self.max_positions < 1:
            raise ConfigError(f"tpa.max_positions: must be >= 1 (or null for all), got {self.max_positions}")


@dataclass
class IRSConfig:
    """Calibration for ``iva.layer: auto``: IRS on a random sample (seeded by the recipe's ``seed``) of
    ``samples`` records of the calibration source, the same count on every rank."""

    samples: int = 256
    pairing: Literal["any", "same_image"] = "any"
    data: str | None = None  # LLaVA JSON/JSONL; default: the first training source
    images: str | None = None

    def validate(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"irs.samples: need at least 2 samples to form pairs, got {self.samples}")
        if self.images is not None and self.data is None:
            raise ConfigError("irs.images: only used with irs.data (the training source has its own images)")


@dataclass
class LoggingConfig:
    """Copies of every ``metrics.jsonl`` record on rank 0 (aligntI/training/trackers.py); both off by default.

    ``tensorboard``: event files in ``run_dir/tensorboard``. ``wandb``: a Weights & Biases run named after
    ``run_dir``, its files in ``run_dir/wandb``; ``WANDB_MODE=offline`` needs no network (``wandb sync`` uploads).
    """

    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "aligntI"


@dataclass
class RecipeConfig:
    run_dir: str
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    engine: EngineConfig
    seed: int = 0
    resume: Literal["auto", "never"] = "auto"
    eval: EvalConfig | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Distillation: a teacher turns the recipe into KD; the loss sections below need one.
    teacher: TeacherConfig | None = None
    loss: LossWeights | None = None
    kd: KDConfig | None = None
    iva: IVAConfig | None = None
    tpa: TPAConfig | None = None
    irs: IRSConfig | None = None

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        ds = check_ds_config(self.engine)
        distill_sections = ("loss", "kd", "iva", "tpa", "irs")
        if self.teacher is None:
            given = [k for k in distill_sections if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"{given[0]}: distillation settings need a teacher (add a teacher: section)")
            return
        if self.teacher.offload_params and ds.get("zero_optimization", {}).get("stage", 0) != 3:
            raise ConfigError("teacher.offload_params: needs ZeRO-3 (engine.zero_stage: 3)")
        # Defaults are filled in so the resolved config.yaml shows every value in effect.
        self.loss = self.loss or LossWeights()
        self.kd = self.kd or KDConfig()
        self.iva = self.iva or IVAConfig()
        self.tpa = self.tpa or TPAConfig()
        self.irs = self.irs or IRSConfig()
        for key in distill_sections:
            getattr(self, key).validate()
        if self.loss.sft + self.loss.kd + self.loss.iva + self.loss.tpa == 0:
            raise ConfigError("loss: every weight is 0; nothing would train")


def check_ds_config(engine: EngineConfig) -> dict:
    """Load the DeepSpeed JSON and reject what belongs to the recipe or disagrees with it."""
    path = Path(engine.ds_config)
    if not path.is_file():
        raise ConfigError(f"engine.ds_config: file not found: {path}")
    try:
        ds = json.loads(_read_utf8(path))
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.ds_config: {path} is not valid JSON: {err}") from err
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"engine.ds_config: {path} must be a JSON object (with zero_optimization an object)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != engine.zero_stage:
        raise ConfigError(
            f"engine.zero_stage: recipe says {engine.zero_stage} but {path} has zero_optimization.stage={stage}"
        )
    # One source of truth: batch sizes, optimizer and schedule come from the recipe.
    owned = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "optimizer", "scheduler"]
    clash = [k for k in owned if k in ds]
    if clash:
        raise ConfigError(f"engine.ds_config: {path} sets {clash}; these come from the recipe (train/optim)")
    for key, value in _walk(ds):
        if value == "auto":
            raise ConfigError(f"engine.ds_config: {path} key {key} is 'auto'; DeepSpeed needs a number here")
    return ds


def _walk(d: Any, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix, d


# ---------------------------------------------------------------- strict loading


def load_recipe(path: str | Path, overrides: list[str] | None = None, schema: type = RecipeConfig):
    """Read a YAML recipe (with its ``base:`` files), apply ``a.b=value`` overrides, substitute ``${vars}``,
    build and validate the typed config."""
    path = Path(path)
    raw = read_composed(path)
    try:
        for item in overrides or []:
            try:
                apply_override(raw, item)
            except yaml.YAMLError as err:
                raise ConfigError(f"override {item!r}: the value is not valid YAML{_yaml_problem(err)}") from None
            except (TypeError, AttributeError):  # the dotted path runs through a scalar
                raise ConfigError(f"override {item!r}: the key goes through a value that is not a mapping") \
                    from None
        raw = substitute_vars(raw)
        cfg = from_dict(schema, raw)
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg


def read_composed(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping merged over its ``base:`` files (paths relative to it, applied in order; the file wins).

    Mappings merge key by key; lists and scalars replace. ``vars`` merge like any mapping, so a recipe
    overrides only the variables it names.
    """
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}" + (f" (base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: base cycle: {' -> '.join(map(str, (*chain, path.resolve())))}")
    try:
        raw = yaml.safe_load(_read_utf8(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(err)}") from err
    if not isinstance(raw, dict):
        got = "the file is empty" if raw is None else f"got {type(raw).__name__} {str(raw)[:40]!r}"
        raise ConfigError(f"{path}: the top level must be a mapping of keys; {got}")
    bases = raw.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, read_composed(path.parent / base, (*chain, path.resolve())))
    return _merge(merged, raw)


def _read_utf8(path: Path) -> str:
    """A config file's text; one that is not UTF-8 or cannot be read is a ConfigError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {err.start}; save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line, to follow "not valid YAML": `` at line L, column C: what (context)``."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ": "
    what = " ".join(str(getattr(err, "problem", None) or err).split())
    context = getattr(err, "context", None)
    return where + what + (f" ({context})" if context else "")


def _merge(under: dict, over: dict) -> dict:
    out = dict(under)
    for key, value in over.items():
        both_maps = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both_maps else value
    return out


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute_vars(raw: dict) -> dict:
    """Replace ``${name}`` in every string by ``vars.name``; the ``vars`` mapping itself is then dropped.

    Variables may use other variables. A string that is exactly ``${name}`` takes the variable's type.
    """
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"vars: expected a mapping of names to values, got {variables!r}")
    for name, value in variables.items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"vars.{name}: expected a string or a number, got {value!r}")

    def resolve(value: Any, key: str, seen: tuple[str, ...] = ()) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, f"{key}.{k}" if key else str(k), seen) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{key}.{i}", seen) for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value

        def lookup(name: str) -> Any:
            if name not in variables:
                raise ConfigError(f"{key}: unknown variable ${{{name}}} (vars defines {sorted(variables)})")
            if name in seen:
                raise ConfigError(f"vars.{name}: refers to itself through {' -> '.join((*seen, name))}")
            return resolve(variables[name], f"vars.{name}", (*seen, name))

        whole = _VAR.fullmatch(value)
        if whole:
            return lookup(whole.group(1))
        return _VAR.sub(lambda m: str(lookup(m.group(1))), value)

    return {k: resolve(v, k) for k, v in raw.items() if k != "vars"}


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.0.c=value`` in a nested dict/list; the value is parsed as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text else ""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_index(node, part, key)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    else:
        node[last] = value


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index of a list of length {len(node)}")
    return int(part)


def from_dict(cls: type, data: Any, where: str = ""):
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    label = where or "<top>"
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{name}: unknown key (allowed here: {sorted(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        kwargs[name] = _coerce(hints[name], data[name], key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {options}")
    if origin is Literal:
        if value not in args or type(value) is not type(next(a for a in args if a == value)):
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # YAML reads 1e-3 as a string (no dot in the mantissa): accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        if not value.strip():  # every string here is a path or a name: empty is never meant
            raise ConfigError(f"{key}: must not be empty")
        return value
    raise TypeError(f"{key}: unsupported schema type {tp!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str | Path, extra: dict | None = None) -> None:
    """Write the fully resolved config (plus derived values) so a run documents itself."""
    payload = to_dict(cfg)
    if extra:
        payload["resolved"] = extra
    Path(path).write_text(yaml.safe_dump(payload, sort_keys=False))


@dataclass(frozen=True)
class Batching:
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int


def resolve_batching(train: TrainConfig, world_size: int) -> Batching:
    """Check micro × accumulation × world = global, deriving accumulation when the recipe leaves it open."""
    per_step = train.micro_batch_size * world_size
    if train.gradient_accumulation_steps is None:
        if train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size: {train.global_batch_size} is not divisible by "
                f"train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size})"
            )
        accum = train.global_batch_size // per_step
    else:
        accum = train.gradient_accumulation_steps
        if per_step * accum != train.global_batch_size:
            raise ConfigError(
                f"train.gradient_accumulation_steps: micro_batch_size {train.micro_batch_size} x "
                f"gradient_accumulation_steps {accum} x world size {world_size} = {per_step * accum}, "
                f"but train.global_batch_size is {train.global_batch_size}"
            )
    return Batching(world_size, train.micro_batch_size, accum, train.global_batch_size)
