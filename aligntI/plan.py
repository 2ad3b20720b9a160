"""The plan of a recipe, without loading a weight or starting torch.distributed (``aligntI plan``, ``--dry-run``).

What a run would do on the GPU cluster it is meant for, worked out on a login node: world size and batch
arithmetic, optimizer steps (counting the data files when they are there), the DeepSpeed configs of the student
and the teacher engines, and an itemised estimate of per-GPU memory from the models' ``config.json`` alone (the
models are built on the meta device for exact parameter counts).

The memory numbers are an estimate: they leave out the CUDA context, allocator fragmentation, NCCL and
DeepSpeed communication buckets and short-lived temporaries, and take every sequence at ``data.max_length``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from aligntI.config import (
    Batching,
    ConfigError,
    DataConfig,
    RecipeConfig,
    load_recipe,
    resolve_batching,
    zero_stage,
)
from aligntI.machine import machine_lines

GIB = 2**30
GPU_MEMORY_GIB = 80.0  # per-GPU memory a plan is checked against (an 80 GB A100/H100); --gpu-memory-gib
ADAM_BYTES = 12  # fp32 master copy + m + v per trainable parameter
DEFAULT_PREFETCH_BUCKET = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default
TARGET_DEVICE = "cuda"  # a plan is for the GPU run, wherever it is printed
LEAVES_OUT = ("the CUDA context, allocator fragmentation, NCCL/DeepSpeed communication buckets and "
              "short-lived temporaries")


# ---------------------------------------------------------------- the models, from their configs


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of one model: exact parameter counts and the widths of its layers."""

    path: str
    parts: dict[str, int]  # parameters per part of models.loading.model_parts (vision_tower, projector, llm)
    largest_module: str  # the module with the most parameters of its own (what ZeRO-3 gathers at once)
    largest_module_params: int
    layers: int  # LLM decoder layers
    hidden: int
    kv_dim: int  # num_key_value_heads x head_dim
    intermediate: int
    heads: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    image_tokens: int  # (image_size / patch_size)^2: tokens of one image in the vision tower

    @property
    def params(self) -> int:
        return sum(self.parts.values())

    def trainable(self, parts: list[str]) -> int:
        return sum(self.parts[p] for p in parts)


def model_shape(path: str | Path) -> ModelShape:
    """Read ``config.json`` of an HF model directory and build the model on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from aligntI.models.loading import part_sizes

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    cfg = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    parts = part_sizes(model)
    own = [(name, sum(p.numel() for p in m.parameters(recurse=False))) for name, m in model.named_modules()]
    largest, largest_params = max(own, key=lambda item: item[1])
    text, vision = cfg.get_text_config(), cfg.vision_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    image_size, patch = _first(vision.image_size), _first(vision.patch_size)
    return ModelShape(
        path=str(path), parts=parts, largest_module=largest, largest_module_params=largest_params,
        layers=text.num_hidden_layers, hidden=text.hidden_size, kv_dim=kv_heads * head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size, heads=heads,
        vocab=text.vocab_size, vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size,
        vision_intermediate=getattr(vision, "intermediate_size", None) or 4 * vision.hidden_size,
        image_tokens=(image_size // patch) ** 2,
    )


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- memory arithmetic


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: float
    formula: str


@dataclass
class MemoryEstimate:
    role: str  # student or teacher
    shape: ModelShape
    zero_stage: int
    bf16: bool
    world_size: int
    trainable_params: int
    items: list[MemoryItem] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(i.bytes for i in self.items)

    def __getitem__(self, name: str) -> float:
        """Bytes of the item called ``name`` (0 for an item that does not apply)."""
        return sum(i.bytes for i in self.items if i.name == name)


def _zero(ds_config: dict) -> tuple[dict, int, bool, bool]:
    zero = ds_config.get("zero_optimization", {})

    def off(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") not in ("none", None)

    return zero, zero_stage(ds_config), off("offload_param"), off("offload_optimizer")


def _layer_elements(hidden: int, kv_dim: int, intermediate: int) -> int:
    """Activations one decoder layer keeps per token (elements): flash/SDPA, so no L x L term."""
    return 5 * hidden + 2 * kv_dim + 4 * intermediate


def _parameter_items(shape: ModelShape, ds_config: dict, world: int, b: int) -> list[MemoryItem]:
    zero, stage, offload_param, _ = _zero(ds_config)
    p = shape.params
    if stage == 3:
        if offload_param:
            items = [MemoryItem("parameters", 0, "ZeRO-3, offload_param cpu: 0 on the GPU")]
        else:
            items = [MemoryItem("parameters", p * b / world, f"P*b/N = {p:,}*{b}/{world}")]
        bucket = zero.get("stage3_prefetch_bucket_size", DEFAULT_PREFETCH_BUCKET)
        gathered = min(shape.largest_module_params + bucket, p)
        items.append(MemoryItem("gathered (ZeRO-3)", gathered * b,
                                f"min(largest module {shape.largest_module_params:,} + prefetch {bucket:,}, P)*b"))
        return items
    return [MemoryItem("parameters", p * b, f"P*b = {p:,}*{b} (ZeRO-{stage}: whole on every GPU)")]


def student_memory(shape: ModelShape, cfg: RecipeConfig, ds_config: dict, world: int) -> MemoryEstimate:
    """Per-GPU bytes of the student (the model being trained) for one micro-batch of ``data.max_length``."""
    _, stage, _, offload_opt = _zero(ds_config)
    bf16 = ds_config["bf16"]["enabled"]
    b = 2 if bf16 else 4
    trainable = shape.trainable(cfg.model.trainable)
    est = MemoryEstimate("student", shape, stage, bf16, world, trainable)
    items = est.items
    items += _parameter_items(shape, ds_config, world, b)

    if stage >= 2:
        items.append(MemoryItem("gradients", trainable * b / world, f"trainable*b/N = {trainable:,}*{b}/{world}"))
    else:
        items.append(MemoryItem("gradients", trainable * b, f"trainable*b = {trainable:,}*{b} (not sharded)"))
    if offload_opt:
        items.append(MemoryItem("optimizer state", 0, "offload_optimizer cpu: 0 on the GPU"))
    elif stage >= 1:
        items.append(MemoryItem("optimizer state", ADAM_BYTES * trainable / world,
                                f"12*trainable/N (fp32 master + m + v) = 12*{trainable:,}/{world}"))
    else:
        items.append(MemoryItem("optimizer state", ADAM_BYTES * trainable,
                                f"12*trainable (fp32 master + m + v) = 12*{trainable:,}"))

    micro, length = cfg.train.micro_batch_size, cfg.data.max_length
    tokens = micro * length
    ckpt = cfg.model.activation_checkpointing
    per_layer = _layer_elements(shape.hidden, shape.kv_dim, shape.intermediate) * b
    if ckpt:
        act = shape.layers * tokens * shape.hidden * b + tokens * per_layer
        how = "checkpointed: layers*T*h*b + one layer"
    else:
        act = shape.layers * tokens * per_layer
        how = "layers*T*(5h+2kv+4I)*b"
    items.append(MemoryItem("activations (LLM)", act, f"{how}, T = {micro}x{length} tokens"))
    v_tokens = micro * shape.image_tokens
    v_layer = v_tokens * _layer_elements(shape.vision_hidden, shape.vision_hidden, shape.vision_intermediate) * b
    if "vision_tower" in cfg.model.trainable:
        if ckpt:
            v_act = shape.vision_layers * v_tokens * shape.vision_hidden * b + v_layer
        else:
            v_act = shape.vision_layers * v_layer
        v_how = f"trainable: kept like the LLM's, {v_tokens} image tokens"
    else:
        v_act, v_how = v_layer, f"frozen: one layer at a time, {v_tokens} image tokens"
    items.append(MemoryItem("activations (vision)", v_act, v_how))

    vocab = shape.vocab
    items.append(MemoryItem("logits + grad", 2 * tokens * vocab * b, "2*T*V*b"))
    # SFT's cross-entropy upcasts all response rows at once; distillation's losses go in kd.chunk_size chunks.
    rows = tokens if cfg.kd is None else min(cfg.kd.chunk_size, tokens)
    items.append(MemoryItem("loss fp32 chunks", rows * vocab * 4 * 3,
                            f"{'T' if cfg.kd is None else 'kd.chunk_size'}*V*4*3"))
    if cfg.teacher is not None and cfg.loss.tpa > 0:
        cand = _tpa_rows(cfg)
        items.append(MemoryItem("TPA logits + grad", 2 * cand * vocab * b,
                                f"2*positions*d*V*b, {cand:,} candidate rows (positions: max_positions or L)"))
        # The candidate pass: its own activations, plus each layer's prefix keys/values repeated d times.
        prefix = cfg.tpa.candidates * tokens * 2 * shape.kv_dim * b
        cand_layer = cand * per_layer + prefix
        if ckpt:
            tpa_act = shape.layers * cand * shape.hidden * b + cand_layer
            # The prefix record holds every layer's keys/values (saved activations anyway without checkpointing).
            tpa_act += shape.layers * tokens * 2 * shape.kv_dim * b
        else:
            tpa_act = shape.layers * cand_layer
        items.append(MemoryItem("TPA candidate pass", tpa_act, "activations of the d*positions candidate tokens"))
    if cfg.teacher is not None and cfg.loss.iva > 0 and cfg.iva.mode == "attention":
        cap = shape.heads * tokens * shape.image_tokens * 4 * 2
        items.append(MemoryItem("IVA capture + grad", cap, "heads*T*image tokens*4*2"))
    return est


def teacher_memory(shape: ModelShape, cfg: RecipeConfig, ds_config: dict, world: int) -> MemoryEstimate:
    """Per-GPU bytes of the frozen teacher (no gradients, no optimizer; forward under no_grad)."""
    _, stage, _, _ = _zero(ds_config)
    bf16 = ds_config["bf16"]["enabled"]
    b = 2 if bf16 else 4
    est = MemoryEstimate("teacher", shape, stage, bf16, world, 0)
    items = est.items
    items += _parameter_items(shape, ds_config, world, b)
    micro, length = cfg.train.micro_batch_size, cfg.data.max_length
    tokens = micro * length
    per_layer = _layer_elements(shape.hidden, shape.kv_dim, shape.intermediate) * b
    items.append(MemoryItem("activations (LLM)", tokens * per_layer,
                            f"no_grad: one layer, T = {micro}x{length} tokens"))
    v_tokens = micro * shape.image_tokens
    items.append(MemoryItem(
        "activations (vision)",
        v_tokens * _layer_elements(shape.vision_hidden, shape.vision_hidden, shape.vision_intermediate) * b,
        f"no_grad: one layer, {v_tokens} image tokens"))
    items.append(MemoryItem("logits", tokens * shape.vocab * b, "T*V*b"))
    if cfg.loss.tpa > 0:
        cand = _tpa_rows(cfg)
        items.append(MemoryItem("TPA logits", cand * shape.vocab * b,
                                f"positions*d*V*b, {cand:,} candidate rows (positions: max_positions or L)"))
        prefix = cfg.tpa.candidates * tokens * 2 * shape.kv_dim * b  # one layer's K/V, repeated per candidate
        if cfg.tpa.source == "teacher":  # it draws the candidates itself: a ground-truth then a candidate pass
            record = shape.layers * tokens * 2 * shape.kv_dim * b  # every layer's keys/values, kept for the pass
            items.append(MemoryItem("TPA candidate pass", record + cand * per_layer + prefix,
                                    "all layers' K/V record + one candidate layer"))
        else:
            items.append(MemoryItem("TPA joint pass", cand * per_layer + prefix,
                                    "the candidate rows of one layer + its K/V repeated d times"))
    if cfg.loss.iva > 0 and cfg.iva.uses_teacher_attention:
        items.append(MemoryItem("IVA capture", shape.heads * tokens * shape.image_tokens * 4,
                                "heads*T*image tokens*4"))
    return est


def _tpa_rows(cfg: RecipeConfig) -> int:
    """Candidate rows of one micro-batch: scored positions per sample (at most L) x d, x micro batch."""
    length = cfg.data.max_length
    positions = min(cfg.tpa.max_positions or length, length)
    return cfg.train.micro_batch_size * positions * cfg.tpa.candidates


# ---------------------------------------------------------------- parameter traffic


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU passes to collectives per optimizer step (as whole gathered tensors, the way DeepSpeed's
    comms logger counts them), and the parameter bytes it copies from CPU memory."""

    gathered: float
    reduced: float
    from_host: float


def _gathers_per_micro_batch(cfg: RecipeConfig, role: str, parts: dict[str, int], student_joint: bool) -> tuple[
        int, str]:
    """Parameters a ZeRO-3 model gathers per micro-batch under this recipe's step (recipes/train.py), and how.

    A forward with an image gathers every part; a candidate pass (no image) only the LLM; backward gathers
    what gradients flow through: the LLM and projector, the vision tower too when it trains.
    """
    full, llm = sum(parts.values()), parts.get("llm", 0)
    tpa = cfg.teacher is not None and cfg.loss.tpa > 0
    if role == "teacher":
        if not tpa:
            return full, "1 forward"
        if cfg.tpa.source == "teacher":
            return full + llm, "ground-truth forward + candidate forward (LLM)"
        return full, "1 joint forward"
    backward = full - (0 if "vision_tower" in cfg.model.trainable else parts.get("vision_tower", 0))
    if not tpa:
        return full + backward, "forward + backward"
    if student_joint:
        sampling = full if cfg.tpa.source == "student" else 0
        return sampling + full + backward, ("sampling forward + " if sampling else "") + "joint forward + backward"
    return full + llm + backward + llm, "ground-truth + candidate forwards, both backwards"


def step_traffic(cfg: RecipeConfig, shape: ModelShape, role: str, ds_config: dict, batching: Batching,
                 student_joint: bool) -> tuple[Traffic, str]:
    _, stage, offload_param, _ = _zero(ds_config)
    b = 2 if ds_config["bf16"]["enabled"] else 4
    world, accumulation = batching.world_size, batching.gradient_accumulation_steps
    gathered, how = _gathers_per_micro_batch(cfg, role, shape.parts, student_joint)
    if stage != 3 or world == 1:
        gathered, how = 0, f"ZeRO-{stage}: no parameter gathers" if world > 1 else "one GPU: no gathers"
    reduced = shape.trainable(cfg.model.trainable) * b * accumulation if role == "student" and world > 1 else 0
    per_step = gathered * b * accumulation
    return Traffic(per_step, reduced, per_step / world if offload_param else 0), how


# ---------------------------------------------------------------- data and steps


@dataclass
class DataCount:
    samples: int | None  # draws per epoch, as the sampler makes them (weights and max_samples applied)
    source: str  # how it was found
    per_file: list[tuple[str, int, float, int]] = field(default_factory=list)  # path, records, weight, draws
    missing: list[str] = field(default_factory=list)
    problem: str | None = None


def count_samples(data: DataConfig, seed: int = 0, train_samples: int | None = None) -> DataCount:
    """Draws per epoch: ``train_samples`` when given, else the records of the data files as the sampler weighs
    them (``aligntI.data.loader.build_records``: ``max_samples`` then ``round(weight x records)`` per file)."""
    if train_samples is not None:
        return DataCount(train_samples, "--train-samples")
    missing = [s.path for s in data.train if not Path(s.path).is_file()]
    if missing:
        return DataCount(None, "data files", missing=missing)
    from aligntI.data.loader import build_records

    try:
        records = build_records(data, seed)
    except ValueError as err:
        return DataCount(None, "data files", problem=str(err))
    per_file = [(str(s.path), len(s), w, int(round(w * len(s)))) for s, w in zip(records.sources, records.weights)]
    return DataCount(records.epoch_size(), "data files", per_file=per_file)


@dataclass
class Steps:
    total: int | None
    per_epoch: int | None
    source: str
    problem: str | None = None


def plan_steps(cfg: RecipeConfig, batching: Batching, data: DataCount) -> Steps:
    """Optimizer steps as recipes/train.py computes them (TrainConfig.total_steps over the sampler's epoch)."""
    per_epoch = None if data.samples is None else data.samples // batching.global_batch_size
    problem = None
    if per_epoch == 0:
        problem = (f"the training data has {data.samples} draws per epoch, fewer than one global batch "
                   f"({batching.global_batch_size}): training would stop at start-up")
    if cfg.train.max_steps is not None:
        return Steps(cfg.train.max_steps, per_epoch, "train.max_steps", problem)
    if not per_epoch:
        return Steps(None, per_epoch, f"train.epochs {cfg.train.epochs:g}", problem)
    return Steps(cfg.train.total_steps(per_epoch), per_epoch,
                 f"train.epochs {cfg.train.epochs:g} x {per_epoch:,} steps per epoch", problem)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Placement:
    name: str
    chosen: bool
    teacher_bytes: float  # per GPU
    traffic: Traffic
    how: str


@dataclass
class Plan:
    recipe: str
    overrides: list[str]
    world_size: int
    world_size_source: str
    batching: Batching
    data: DataCount
    steps: Steps
    student_ds: dict
    teacher_ds: dict | None
    student: MemoryEstimate | None
    teacher: MemoryEstimate | None
    memory_problems: list[str]
    gpu_memory_gib: float
    run_dir: str
    resume_from: str | None
    student_traffic: tuple[Traffic, str] | None = None
    placements: list[Placement] = field(default_factory=list)  # each teacher.placement, this recipe's marked
    machine: list[str] = field(default_factory=list)  # what the machine printing the plan lacks (machine.py)

    @property
    def distill(self) -> bool:
        return self.teacher_ds is not None

    @property
    def memory_total(self) -> float | None:
        if self.student is None or (self.distill and self.teacher is None):
            return None
        return self.student.total + (self.teacher.total if self.teacher else 0)

    @property
    def fits(self) -> bool | None:
        total = self.memory_total
        return None if total is None else total <= self.gpu_memory_gib * GIB


def world_size_of(world_size: int | None, environ=None) -> tuple[int, str]:
    """``--world-size``, else ``WORLD_SIZE`` as launchers set it, else 1."""
    environ = os.environ if environ is None else environ
    if world_size is not None:
        size, source = world_size, "--world-size"
    elif environ.get("WORLD_SIZE"):
        size, source = int(environ["WORLD_SIZE"]), "WORLD_SIZE"
    else:
        size, source = 1, "default: one process"
    if size < 1:
        raise ConfigError(f"world size: must be >= 1, got {size} ({source})")
    return size, source


def make_plan(recipe: str | Path, overrides: list[str] | None = None, *, world_size: int | None = None,
              gpu_memory_gib: float = GPU_MEMORY_GIB, train_samples: int | None = None, environ=None) -> Plan:
    """Everything a run of ``recipe`` would set up, without weights or a process group."""
    from aligntI.engine import (
        build_ds_config,
        latest_complete_checkpoint,
        teacher_ds_config,
        teacher_placement,
    )

    cfg = load_recipe(recipe, overrides)
    world, world_source = world_size_of(world_size, environ)
    if train_samples is not None and train_samples < 1:
        raise ConfigError(f"--train-samples: must be >= 1, got {train_samples}")
    try:
        batching = resolve_batching(cfg.train, world)
    except ConfigError as err:
        raise ConfigError(f"{recipe}: {err}") from None
    data = count_samples(cfg.data, cfg.seed, train_samples)
    steps = plan_steps(cfg, batching, data)
    student_ds = build_ds_config(cfg.engine, batching, device=TARGET_DEVICE)
    teacher_ds = None
    if cfg.teacher is not None:
        teacher_ds = teacher_ds_config(student_ds, cfg.teacher.placement, device=TARGET_DEVICE)

    problems: list[str] = []
    student = teacher = None
    try:
        student = student_memory(model_shape(cfg.model.path), cfg, student_ds, world)
    except FileNotFoundError as err:
        problems.append(f"student (model.path): {err}")
    if cfg.teacher is not None:
        try:
            teacher = teacher_memory(model_shape(cfg.teacher.path), cfg, teacher_ds, world)
        except FileNotFoundError as err:
            problems.append(f"teacher (teacher.path): {err}")
    resume = None
    if cfg.resume == "auto" and Path(cfg.run_dir, "checkpoints").is_dir():
        resume = latest_complete_checkpoint(Path(cfg.run_dir, "checkpoints"))
    joint = cfg.teacher is not None and student is not None and cfg.tpa.student_joint(student_ds, student.shape.parts)
    student_traffic = None if student is None else step_traffic(cfg, student.shape, "student", student_ds,
                                                                batching, joint)
    placements = []
    if teacher is not None:
        chosen = teacher_placement(student_ds, cfg.teacher.placement)
        for name in ("sharded", "replicated", "offload"):
            ds = teacher_ds_config(student_ds, name, device=TARGET_DEVICE)
            traffic, how = step_traffic(cfg, teacher.shape, "teacher", ds, batching, joint)
            placements.append(Placement(name, name == chosen, teacher_memory(teacher.shape, cfg, ds, world).total,
                                        traffic, how))
    return Plan(str(recipe), list(overrides or []), world, world_source, batching, data,
                steps, student_ds, teacher_ds, student, teacher, problems, gpu_memory_gib, cfg.run_dir, resume,
                student_traffic, placements, machine_lines(cfg))


# ---------------------------------------------------------------- text


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _gib(n: float) -> str:
    return f"{n / GIB:9.3f}"


def _memory_table(est: MemoryEstimate) -> list[str]:
    shape = est.shape
    parts = ", ".join(f"{k} {_count(v)}" for k, v in shape.parts.items())
    trains = f"trainable {_count(est.trainable_params)}" if est.role == "student" else "frozen"
    out = [f"{est.role}: {shape.path}",
           f"  {_count(shape.params)} parameters ({parts}); {trains}; "
           f"largest module {shape.largest_module} ({_count(shape.largest_module_params)})",
           f"  ZeRO-{est.zero_stage}, {'bf16' if est.bf16 else 'fp32'}, N = {est.world_size}",
           f"  {'item':<24}{'GiB':>9}   how"]
    out += [f"  {i.name:<24}{_gib(i.bytes)}   {i.formula}" for i in est.items]
    out.append(f"  {'total':<24}{_gib(est.total)}")
    return out


def format_plan(plan: Plan) -> str:
    b = plan.batching
    lines = [f"aligntI dry run: {plan.recipe}" + (f" {' '.join(plan.overrides)}" if plan.overrides else ""),
             "(nothing loaded, no process group started, nothing written)",
             f"kind          {'distillation (teacher section)' if plan.distill else 'SFT'}",
             f"run_dir       {plan.run_dir}" + (f" (resume: auto would restart from {plan.resume_from})"
                                              if plan.resume_from else ""),
             f"world size    {plan.world_size} ({plan.world_size_source})",
             f"batch         micro {b.micro_batch_size} x accumulation {b.gradient_accumulation_steps} x world "
             f"{b.world_size} = global {b.global_batch_size}"]
    data = plan.data
    if data.per_file:
        for path, records, weight, draws in data.per_file:
            lines.append(f"data          {path}: {records:,} records x weight {weight:g} = {draws:,} per epoch")
    if data.samples is not None:
        spe = plan.steps.per_epoch
        lines.append(f"samples       {data.samples:,} per epoch ({data.source}) -> {spe:,} steps per epoch "
                     f"of {b.global_batch_size}")
    elif data.missing:
        lines.append("samples       unknown: data file(s) not found: " + ", ".join(data.missing)
                     + " (download them, or give --train-samples N)")
    else:
        lines.append(f"samples       unknown: {data.problem}")
    steps = plan.steps
    if steps.total is not None:
        epochs = f"; {steps.total / steps.per_epoch:.2f} epochs" if steps.per_epoch and steps.source == \
            "train.max_steps" else ""
        lines.append(f"steps         {steps.total:,} optimizer steps ({steps.source}{epochs})")
    elif data.samples is None:
        lines.append(f"steps         unknown ({steps.source} x steps per epoch; the number of samples is unknown)")
    else:
        lines.append(f"steps         none ({steps.source} x 0 steps per epoch)")
    if steps.problem:
        lines.append(f"PROBLEM       {steps.problem}")

    lines += ["", "DeepSpeed config, student (for the GPU run: precision auto = bf16, pinned offload memory):",
              json.dumps(plan.student_ds, indent=2)]
    if plan.teacher_ds is not None:
        lines += ["DeepSpeed config, teacher (engine.teacher_ds_config):", json.dumps(plan.teacher_ds, indent=2)]

    lines += ["", f"Memory per GPU: an ESTIMATE from the model configs (one micro-batch of data.max_length "
                  f"tokens per sequence; it leaves out {LEAVES_OUT})"]
    for est in (plan.student, plan.teacher):
        if est is not None:
            lines += _memory_table(est)
    for problem in plan.memory_problems:
        lines.append(f"unknown: {problem}")
    total = plan.memory_total
    who = "teacher + student" if plan.distill else "student"
    if total is None:
        lines.append(f"{who}: memory unknown (a model config is missing)")
    elif plan.fits:
        lines.append(f"{who}: {total / GIB:.3f} GiB of {plan.gpu_memory_gib:g} GiB per GPU: FITS "
                     f"({plan.gpu_memory_gib - total / GIB:.2f} GiB left for what the estimate leaves out)")
    else:
        lines.append(f"{who}: {total / GIB:.3f} GiB of {plan.gpu_memory_gib:g} GiB per GPU: DOES NOT FIT "
                     f"(over by {total / GIB - plan.gpu_memory_gib:.2f} GiB; more GPUs, offload, activation "
                     "checkpointing or a smaller micro batch)")
    lines += _traffic_lines(plan)
    return "\n".join(lines)


def _traffic_lines(plan: Plan) -> list[str]:
    if plan.student_traffic is None:
        return []
    traffic, how = plan.student_traffic
    lines = ["", "Traffic per optimizer step and GPU: an ESTIMATE from parameter counts (ZeRO-3 gathers counted as "
                 "whole gathered tensors)",
             f"  student: {traffic.gathered / GIB:.3f} GiB of parameters gathered ({how}), "
             f"{traffic.reduced / GIB:.3f} GiB of gradients reduced"]
    if not plan.placements:
        return lines
    lines += ["Teacher placement (teacher.placement; * = this recipe):",
              f"  {'placement':<13}{'teacher GiB':>12}{'total GiB':>11}  {'fits':<5}{'gathered GiB':>13}"
              f"{'from CPU GiB':>13}   gathers"]
    student = plan.student.total
    for p in plan.placements:
        total = student + p.teacher_bytes
        fits = "yes" if total <= plan.gpu_memory_gib * GIB else "NO"
        lines.append(f"  {p.name + (' *' if p.chosen else ''):<13}{p.teacher_bytes / GIB:>12.3f}{total / GIB:>11.3f}  "
                     f"{fits:<5}{p.traffic.gathered / GIB:>13.3f}{p.traffic.from_host / GIB:>13.3f}   {p.how}")
    return lines


def print_plan(config: str, overrides: list[str], world_size: int | None = None,
               gpu_memory_gib: float | None = None, train_samples: int | None = None) -> int:
    """Print the recipe's plan (``aligntI plan``, ``recipes/train.py --dry-run``); no weights, no process group.

    ``gpu_memory_gib``: None checks against :data:`GPU_MEMORY_GIB`. Under a launcher only rank 0 prints; the
    other ranks exit 0 at once.
    """
    if os.environ.get("RANK", "0") != "0":
        return 0
    plan = make_plan(config, overrides, world_size=world_size,
                     gpu_memory_gib=GPU_MEMORY_GIB if gpu_memory_gib is None else gpu_memory_gib,
                     train_samples=train_samples)
    print(format_plan(plan) + "\n\n" + "\n".join(plan.machine), flush=True)
    return 0
