"""Recipe schema: the nested dataclasses of a training recipe, the checks of its DeepSpeed JSON and the batch
arithmetic.

Loading is :mod:`aligntI.yamlconf`'s (strict: unknown keys, wrong types and inconsistent values raise
:class:`ConfigError` naming the file and the key). Fields typed ``RecipePath`` (``ChatTemplate``: a ``.jinja``
value) are paths: a relative one, in the file or an override, is relative to the repository root, not to the
current folder, and is absolute once loaded; ``~`` is expanded, an absolute path stays as given. Nothing here
mutates what the user wrote: derived values (gradient accumulation, world size) are computed in
:func:`resolve_batching`, which needs the world size and so runs after distributed start-up.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aligntI.yamlconf import ChatTemplate, ConfigError, RecipePath, flatten, load, read_utf8, under
from aligntI.yamlconf import from_dict as from_dict  # re-exported: the package imports it from here

TRAINABLE_PARTS = ("vision_tower", "projector", "llm")


@dataclass
class AttentionConfig:
    """Attention backend per sub-model (`sdpa` or `eager` on CPU, `flash_attention_2` on GPU)."""

    text: str = "sdpa"
    vision: str = "sdpa"


@dataclass
class ModelConfig:
    path: RecipePath
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

    path: RecipePath
    images: RecipePath | None = None  # image folder; default: the folder holding ``path``
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
    chat_template: ChatTemplate | None = None  # a shipped template's name or a .jinja; None: the processor's
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
    ds_config: RecipePath  # JSON under ds_configs/: ZeRO (its stage too) and communication settings
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass
class EvalConfig:
    """Exact match of greedy answers on a LLaVA file: a recipe's ``eval:``, or ``aligntI eval --data``."""

    data: RecipePath
    images: RecipePath | None = None
    max_new_tokens: int = 16
    batch_size: int = 64
    max_samples: int | None = None
    category_key: str = "category"  # record field that per-category accuracy groups by

    def validate(self, where: str = "eval") -> None:
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class TeacherConfig:
    """The frozen model distilled from: its own DeepSpeed engine, no optimizer."""

    path: RecipePath
    attn_implementation: AttentionConfig = field(default_factory=AttentionConfig)
    # sharded: ZeRO-3 over the ranks, gathered layer by layer in each forward; replicated: whole on every
    # rank, no gathers (for a teacher that fits beside the student); offload: sharded, held in CPU memory
    # between uses. auto: sharded when the student is ZeRO-3, else replicated.
    placement: Literal["auto", "sharded", "replicated", "offload"] = "auto"


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
    # The query rows of the focus α (IRS and IVA alike): the question's tokens, the position that predicts the
    # answer's first token, or both.
    queries: Literal["instruction", "answer_start", "both"] = "instruction"
    # Score only k vision rows per sample: both models project (and the student backpropagates) those rows alone.
    # None: every vision row, the paper's objective.
    row_budget: int | None = None
    # With row_budget. sampled: k draws in proportion to the weights, each counted 1/k (an unbiased estimate
    # of the all-row loss). top_k: the k largest weights, renormalised (teacher_attention only).
    row_choice: Literal["sampled", "top_k"] = "sampled"
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
        if self.queries != "instruction" and not self.uses_teacher_attention:
            raise ConfigError("iva.queries: only used with the teacher's attention (iva.weights: uniform reads none)")
        if self.row_budget is not None:
            if self.row_budget < 1:
                raise ConfigError(f"iva.row_budget: must be >= 1 (or null for every vision row), got {self.row_budget}")
            if self.mode != "weighted_kl":
                raise ConfigError("iva.row_budget: only used by iva.mode: weighted_kl (attention mode projects no "
                                  "vision rows)")
            if self.top_ratio < 1:
                raise ConfigError("iva.row_budget: set either it or iva.top_ratio, not both (both keep the heaviest "
                                  "rows)")
            if self.row_choice == "top_k" and self.weights == "uniform":
                raise ConfigError("iva.row_choice: top_k needs iva.weights: teacher_attention (uniform has no "
                                  "ranking); sampled draws uniformly")

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
    # How the student scores its candidates. separate: its ground-truth pass, then a candidate pass (fewest
    # FLOPs). joint: a no-grad pass to draw them (source: student), then one pass over ground truth and
    # candidates together. auto: whichever ZeRO-3 gathers fewer parameters for (see student_joint).
    student_passes: Literal["auto", "joint", "separate"] = "auto"

    def validate(self) -> None:
        if self.candidates < 1:
            raise ConfigError(f"tpa.candidates: must be >= 1, got {self.candidates}")
        if self.max_positions is not None and self.max_positions < 1:
            raise ConfigError(f"tpa.max_positions: must be >= 1 (or null for all), got {self.max_positions}")

    def student_joint(self, student_ds_config: dict, parts: dict[str, int]) -> bool:
        """``student_passes`` resolved for a student with ``parts`` parameters per part (vision_tower, projector,
        llm). auto picks the fewer ZeRO-3 gathers: joint gathers the whole model once more (the sampling
        pass), separate the LLM twice more (the candidate pass and its backward), so joint wins when the
        LLM outweighs the vision tower and projector. Without ZeRO-3 there are no gathers: separate."""
        if self.student_passes == "auto":
            return zero_stage(student_ds_config) == 3 and parts["llm"] > parts["vision_tower"] + parts["projector"]
        return self.student_passes == "joint"


@dataclass
class IRSConfig:
    """Calibration for ``iva.layer: auto``: IRS on a random sample (seeded by the recipe's ``seed``) of
    ``samples`` records of the calibration source, the same count on every rank."""

    samples: int = 256
    pairing: Literal["any", "same_image"] = "any"
    data: RecipePath | None = None  # LLaVA JSON/JSONL; default: the first training source
    images: RecipePath | None = None

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
    run_dir: RecipePath
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    engine: EngineConfig
    seed: int = 0
    resume: Literal["auto", "never"] = "auto"
    # Keys (or sections) a restart may change against its checkpoint's recipe (aligntI/training/resume.py).
    accept_changes: list[str] = field(default_factory=list)
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
        check_ds_config(self.engine)
        if self.eval is not None:
            self.eval.validate()
        distill_sections = ("loss", "kd", "iva", "tpa", "irs")
        if self.teacher is None:
            given = [k for k in distill_sections if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"{given[0]}: distillation settings need a teacher (add a teacher: section)")
            self._check_accept_changes()
            return
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
        self._check_accept_changes()

    def _check_accept_changes(self) -> None:
        keys = flatten(dataclasses.asdict(self))
        for i, name in enumerate(self.accept_changes):
            if not any(under(key, [name]) for key in keys):
                raise ConfigError(f"accept_changes.{i}: {name!r} names no key of this recipe")


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a DeepSpeed config (DeepSpeed's default: 0)."""
    return ds.get("zero_optimization", {}).get("stage", 0)


def check_ds_config(engine: EngineConfig) -> dict:
    """Load the DeepSpeed JSON and reject what belongs to the recipe or what DeepSpeed would not take."""
    path = Path(engine.ds_config)
    if not path.is_file():
        raise ConfigError(f"engine.ds_config: file not found: {path}")
    try:
        ds = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.ds_config: {path} is not valid JSON: {err}") from err
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"engine.ds_config: {path} must be a JSON object (with zero_optimization an object)")
    stage = zero_stage(ds)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.ds_config: {path} has zero_optimization.stage {stage!r}; ZeRO's stages are "
                          "0, 1, 2 and 3")
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


def load_recipe(path: str | Path, overrides: list[str] | None = None, schema: type = RecipeConfig):
    """A training recipe (or another ``schema``) read strictly from YAML, with its ``base:`` files,
    ``a.b=value`` overrides and ``${vars}``, then validated."""
    return load(path, overrides, schema)


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
