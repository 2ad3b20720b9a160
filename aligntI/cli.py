"""The ``aligntI`` command: ``plan``, ``irs``, ``digitgrid``, ``init-model``, ``assemble``, ``export``, ``eval``,
``attention-maps``."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

from aligntI.config import ConfigError, IRSConfig, load_recipe
from aligntI.errors import run_reporting_errors
from aligntI.models.assemble import DTYPES, AssembleError, assemble
from aligntI.yamlconf import ChatTemplate, RecipePath, load


def cmd_plan(args) -> int:
    from aligntI.plan import print_plan

    return print_plan(args.config, args.overrides, args.world_size, args.gpu_memory_gib, args.train_samples)


# The flags of `aligntI irs` that a --config recipe gives instead (None when not given).
IRS_RECIPE_FLAGS = ("model", "data", "images", "samples", "seed", "pairing", "queries", "chat_template", "attn",
                    "max_length")


def given(args, names) -> dict:
    """The flags among ``names`` given on the command line (a flag left out is None and takes the default of
    what it fills, so the default is written once)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def cmd_irs(args) -> int:
    """IRS of every layer of a model on calibration samples: table, irs.json, irs.png, the chosen layer."""
    from aligntI.irs import run_irs

    model, irs, options = irs_from_recipe(args) if args.config else irs_from_flags(args)
    run_irs(model, irs, out=args.out, **options)
    return 0


def irs_from_flags(args) -> tuple[str, IRSConfig, dict]:
    if args.overrides:
        raise ConfigError(f"irs: overrides {args.overrides} only apply to --config recipes")
    if not args.model or not args.data:
        raise ConfigError("irs: --model and --data are required (or --config)")
    irs = IRSConfig(**given(args, ("samples", "pairing", "data", "images")))
    options = given(args, ("attn", "chat_template", "max_length", "batch_size", "seed", "queries"))
    return args.model, irs, options


def irs_from_recipe(args) -> tuple[str, IRSConfig, dict]:
    """The teacher, calibration data and settings of a distillation recipe, as its ``iva.layer: auto`` reads
    them at start-up (the first training source unless ``irs.data``; the micro-batch unless --batch-size)."""
    clash = [f"--{k.replace('_', '-')}" for k in given(args, IRS_RECIPE_FLAGS)]
    if clash:
        raise ConfigError(f"irs: with --config, the recipe gives {', '.join(clash)}; change it there or with "
                          "overrides (e.g. irs.samples=64)")
    cfg = load_recipe(args.config, args.overrides)
    if cfg.teacher is None:
        raise ConfigError(f"irs: {args.config} has no teacher: section; --config takes a distillation recipe")
    irs = cfg.irs
    if irs.data is None:
        irs = dataclasses.replace(irs, data=cfg.data.train[0].path, images=cfg.data.train[0].images)
    return cfg.teacher.path, irs, {
        "attn": cfg.teacher.attn_implementation.text, "chat_template": cfg.data.chat_template,
        "max_length": cfg.data.max_length, "batch_size": args.batch_size or cfg.train.micro_batch_size,
        "seed": cfg.seed, "queries": cfg.iva.queries}


def cmd_digitgrid(args) -> int:
    """Write the CPU example's dataset and a word-level tokenizer trained on its text."""
    from aligntI.tasks.digitgrid import write_digitgrid_with_tokenizer

    meta, tokenizer = write_digitgrid_with_tokenizer(args.out, train_size=args.train_size, val_size=args.val_size,
                                                     test_size=args.test_size, seed=args.seed)
    print(f"DigitGrid: {meta['sizes']} samples in {args.out}; tokenizer of {len(tokenizer)} tokens in "
          f"{Path(args.out, 'tokenizer')}")
    return 0


def cmd_init_model(args) -> int:
    """Build a randomly initialised LLaVA model from a spec YAML and save it with its processor."""
    from aligntI.models.builder import init_model_dir

    out, spec = init_model_dir(args.spec, args.tokenizer, args.out, vision_from=args.vision_from, seed=args.seed)
    copied = f" with the vision tower of {args.vision_from}" if args.vision_from else ""
    print(f"wrote a random {spec.text.family}/{spec.vision.family} LLaVA model{copied} to {out}")
    return 0


def default_of(function, name: str):
    """A flag's default is the default of the parameter it fills, so it is written once."""
    return inspect.signature(function).parameters[name].default


@dataclass
class AssembleRecipe:
    """``aligntI assemble --config`` (recipes/paper/assemble.yaml): the parts and the output of one starting
    model. Its paths follow the recipes' rule: relative ones are relative to the repository root. The keys left
    out take the defaults of :func:`aligntI.models.assemble.assemble`."""

    vision: RecipePath  # SigLIP or CLIP checkpoint directory with its preprocessor_config.json
    llm: RecipePath  # causal LM checkpoint directory with its tokenizer
    out: RecipePath  # the LLaVA model directory written
    chat_template: ChatTemplate = default_of(assemble, "chat_template")  # saved with the processor
    dtype: str = default_of(assemble, "dtype")  # of the saved weights
    seed: int = default_of(assemble, "seed")  # of the projector's random initialisation

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")


def assemble_recipe(args) -> AssembleRecipe:
    """``--config`` with its overrides, or the flags (their paths relative to the current folder, as any
    command's); not both."""
    flags = given(args, [f.name for f in dataclasses.fields(AssembleRecipe)])
    if args.config:
        if flags:
            raise ConfigError(f"assemble: give --config (an assemble recipe) or the flags, not both (got "
                              f"{', '.join('--' + k.replace('_', '-') for k in flags)})")
        return load(args.config, args.overrides, AssembleRecipe)
    if args.overrides:
        raise ConfigError(f"assemble: overrides {args.overrides} only apply to --config recipes")
    missing = [f"--{k}" for k in ("vision", "llm", "out") if k not in flags]
    if missing:
        raise ConfigError(f"assemble: {', '.join(missing)} required (or --config)")
    recipe = AssembleRecipe(**flags)
    recipe.validate()
    return recipe


def cmd_assemble(args) -> int:
    """The paper's starting LLaVA model: a pretrained vision tower + a seeded random projector + a pretrained LLM."""
    r = assemble_recipe(args)
    try:
        s = assemble(r.vision, r.llm, r.out, chat_template=r.chat_template, dtype=r.dtype, seed=r.seed)
    except (AssembleError, FileNotFoundError) as err:
        print(f"aligntI assemble: {err}", file=sys.stderr)
        return 2
    p = s["params"]
    added = ", embeddings resized for <image>" if s["resized_embeddings"] else ""
    print(f"wrote a {s['dtype']} LLaVA model to {s['out']}: {s['vision']} vision {p['vision']:,} params (from "
          f"{r.vision}) + projector {p['projector']:,} (random, seed {r.seed}) + {s['llm']} LLM "
          f"{p['llm']:,} (from {r.llm}{', tied embeddings' if s['tied_embeddings'] else ''}{added}); "
          f"{s['image_tokens']} image tokens per image (<image> = id {s['image_token_id']})")
    return 0


def cmd_eval(args) -> int:
    """Benchmarks (``--bench`` or ``--config``) or exact match on a LLaVA-format file, one process or many."""
    from aligntI.config import EvalConfig
    from aligntI.eval.recipe import BenchmarkConfig, EvalRecipe, load_eval_recipe
    from aligntI.eval.run import run_eval_recipe, run_exact_match

    if args.config:
        if args.model or args.data or args.bench:
            raise ConfigError("eval: give --config (an evaluation recipe) or --model/--data, not both")
        run_eval_recipe(load_eval_recipe(args.config, args.overrides))
        return 0
    if not args.model or not args.data:
        raise ConfigError("eval: --model and --data are required (or --config)")
    if args.overrides:
        raise ConfigError(f"eval: overrides {args.overrides} only apply to --config recipes")
    # --batch-size / --max-new-tokens as given; the others keep the defaults of the dataclass they fill.
    given = {k: getattr(args, k) for k in ("batch_size", "max_new_tokens") if getattr(args, k) is not None}
    if args.bench:
        recipe = EvalRecipe(
            model=args.model, benchmarks=[BenchmarkConfig(args.bench, args.data, args.images, args.annotations,
                                                          args.max_samples)],
            out=args.out, chat_template=args.chat_template, attn=args.attn, zero3=args.zero3, **given)
        recipe.validate()
        run_eval_recipe(recipe)
        return 0
    if args.annotations or args.zero3:
        raise ConfigError("eval: --annotations and --zero3 apply to --bench/--config evaluations")
    ev = EvalConfig(data=args.data, images=args.images, max_samples=args.max_samples,
                    category_key=args.category_key, **given)
    run_exact_match(args.model, ev, chat_template=args.chat_template, attn=args.attn, out=args.out)
    return 0


def cmd_export(args) -> int:
    """HF model directory from any complete checkpoint of a run (e.g. one that died before its export)."""
    from aligntI.engine import export_checkpoint

    tag, out = export_checkpoint(Path(args.run), args.tag, Path(args.out) if args.out else None)
    print(f"exported {Path(args.run) / 'checkpoints' / tag} to {out}")
    return 0


def cmd_attention_maps(args) -> int:
    """Teacher vs student instruction→vision attention maps on a few samples: PNGs and attention_maps.json."""
    import torch

    from aligntI.data.records import RecordSource
    from aligntI.eval.attention_maps import (
        compute_attention_maps,
        format_summary,
        read_predictions,
        resolve_layers,
        write_attention_maps,
    )

    def named(spec: str, default: str) -> tuple[str, str]:
        # NAME=DIR, or a bare DIR named after its folder.
        name, sep, path = spec.partition("=")
        return (name, path) if sep and "/" not in name else (Path(spec).name or default, spec)

    try:
        models = {"teacher": args.teacher}
        for i, spec in enumerate(args.student):
            name, path = named(spec, f"student{i}")
            if name in models:
                raise ValueError(f"model name {name!r} used twice; name the students NAME=DIR")
            models[name] = path
        if args.samples is None:
            indices = list(range(min(args.first, len(RecordSource(args.data)))))
        else:
            try:
                indices = [int(s) for s in args.samples.split(",") if s.strip()]
            except ValueError:
                raise ValueError(f"--samples: expected comma-separated record indices, got {args.samples!r}") \
                    from None
        layers, source = resolve_layers(models, "teacher", teacher_layer=args.teacher_layer, irs=args.irs,
                                        student_layer=args.student_layer)
        predictions = dict(named(spec, "") for spec in args.predictions)
        unknown = set(predictions) - set(models)
        if unknown:
            raise ValueError(f"--predictions for unknown models {sorted(unknown)}; models: {list(models)}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        result = compute_attention_maps(
            models, args.data, indices, layers, teacher="teacher", images=args.images,
            chat_template=args.chat_template, batch_size=args.batch_size, attn=args.attn, device=device,
            max_length=args.max_length, predictions={n: read_predictions(p) for n, p in predictions.items()},
            layer_source=source, queries=args.queries,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"aligntI attention-maps: {err}", file=sys.stderr)
        return 2
    paths = write_attention_maps(result, args.out)
    print(format_summary(result))
    print(f"{len(indices)} samples; teacher layer {layers['teacher']} ({source}). Wrote {paths['json']}, "
          f"{paths['overview']} and {len(paths['samples'])} sample_*.png in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from aligntI.config import EvalConfig
    from aligntI.eval.attention_maps import compute_attention_maps
    from aligntI.eval.benchmarks import BENCHMARKS
    from aligntI.eval.recipe import EvalRecipe
    from aligntI.irs import run_irs
    from aligntI.losses.iva import QUERY_ROWS
    from aligntI.plan import GPU_MEMORY_GIB
    from aligntI.tasks.digitgrid import write_digitgrid

    parser = argparse.ArgumentParser(prog="aligntI", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="a recipe's batching, steps, DeepSpeed configs and per-GPU memory estimate "
                                    "(no weights loaded)")
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("--world-size", type=int, default=None, help="ranks of the run (default: $WORLD_SIZE, else 1)")
    p.add_argument("--gpu-memory-gib", type=float, default=GPU_MEMORY_GIB,
                   help=f"memory of one GPU (default: {GPU_MEMORY_GIB:g})")
    p.add_argument("--train-samples", type=int, default=None,
                   help="samples per epoch, instead of counting the data files (e.g. before they are downloaded)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("irs", help="instruction-relevance score of every layer; picks the IVA layer")
    p.add_argument("--config", default=None,
                   help="a distillation recipe: its teacher, calibration data (irs.data, else the first training "
                        "source) and settings, as its iva.layer: auto reads them; instead of the flags up to "
                        "--max-length")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the --config recipe")
    # None: the default of what the flag fills (IRSConfig, run_irs), shown in the help.
    p.add_argument("--model", default=None, help="HF model directory (the teacher)")
    p.add_argument("--data", default=None, help="LLaVA-format JSON/JSONL calibration samples")
    p.add_argument("--images", default=None, help="image folder (default: the data file's folder)")
    p.add_argument("--samples", type=int, default=None,
                   help="a random sample of N records of --data (all of them if fewer; the same count per rank; "
                        f"default: {IRSConfig.samples})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the sample (default: {default_of(run_irs, 'seed')}, as in a recipe)")
    p.add_argument("--pairing", choices=["any", "same_image"], default=None,
                   help=f"default: {IRSConfig.pairing}")
    p.add_argument("--queries", choices=QUERY_ROWS, default=None,
                   help="the focus's query rows, as a recipe's iva.queries (default: "
                        f"{default_of(run_irs, 'queries')})")
    p.add_argument("--chat-template", default=None, help="template name or .jinja (default: the processor's)")
    p.add_argument("--attn", default=None, help=f"text attention backend (default: {default_of(run_irs, 'attn')})")
    p.add_argument("--max-length", type=int, default=None, help=f"default: {default_of(run_irs, 'max_length')}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default: {default_of(run_irs, 'batch_size')}; with --config, the recipe's micro-batch")
    p.add_argument("--out", default=None, help="output folder (default: <model>/irs)")
    p.set_defaults(func=cmd_irs)

    p = sub.add_parser("digitgrid", help="write the DigitGrid CPU example dataset and its tokenizer")
    p.add_argument("--out", default="data/digitgrid")
    for name in ("train_size", "val_size", "test_size", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default_of(write_digitgrid, name))
    p.set_defaults(func=cmd_digitgrid)

    p = sub.add_parser("init-model", help="save a random LLaVA model of a spec YAML with its processor")
    p.add_argument("--spec", required=True, help="model spec YAML (see recipes/mini/models/)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True)
    p.add_argument("--vision-from", default=None, help="copy the trained vision tower of this model directory")
    p.add_argument("--seed", type=int, default=None, help="seed of the random weights (default: the spec's)")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("assemble", help="the starting LLaVA model from a SigLIP/CLIP checkpoint and an LLM "
                                        "checkpoint (random projector), with its processor")
    p.add_argument("--config", default=None, help="assemble recipe YAML (recipes/paper/assemble.yaml), instead of "
                                                  "the flags")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the --config recipe")
    # None: the default of AssembleRecipe (that is, of assemble()), shown in the help.
    p.add_argument("--vision", default=None, help="SigLIP or CLIP checkpoint directory (full model or vision "
                                                  "half) with its preprocessor_config.json")
    p.add_argument("--llm", default=None, help="causal LM checkpoint directory with its tokenizer (e.g. Qwen2.5)")
    p.add_argument("--out", default=None, help="output model directory")
    p.add_argument("--chat-template", default=None,
                   help="template name or .jinja (saved with the processor; default: "
                        f"{AssembleRecipe.chat_template})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help=f"dtype of the saved weights (default: {AssembleRecipe.dtype})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the projector's random initialisation (default: {AssembleRecipe.seed})")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("export", help="write an HF model directory from a run's checkpoint (fp32, offline)")
    p.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00001000 (default: the latest complete)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/export_<tag>)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="greedy generation of an HF model directory scored on the paper's benchmarks "
                                    "(--bench, --config) or by exact match (--data alone)")
    p.add_argument("--config", default=None, help="evaluation recipe YAML (recipes/eval/): model + benchmarks")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the --config recipe")
    p.add_argument("--model", default=None, help="HF model directory (e.g. a run's final/)")
    p.add_argument("--bench", default=None, choices=list(BENCHMARKS),
                   help="score --data with this benchmark's conventions (LLaVA's evaluation files)")
    p.add_argument("--data", default=None, help="question file; without --bench: LLaVA-format JSON/JSONL whose "
                                                "last turn is the reference (exact match)")
    p.add_argument("--images", default=None, help="image folder (default: the data file's folder)")
    p.add_argument("--annotations", default=None, help="--bench: reference file or folder when the question "
                                                       "file has no answers (layout: recipes/README.md, Evaluation)")
    p.add_argument("--chat-template", default=None, help="template name or .jinja (default: the processor's)")
    p.add_argument("--attn", default=EvalRecipe.attn)
    p.add_argument("--zero3", action="store_true", help="partition the model over the ranks (ZeRO-3)")
    # None: the default of the dataclass filled, EvalRecipe (--bench) or EvalConfig (exact match).
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"per rank (default {EvalRecipe.batch_size} with --bench, else {EvalConfig.batch_size})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {EvalRecipe.max_new_tokens} with --bench, else {EvalConfig.max_new_tokens}")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--category-key", default=EvalConfig.category_key,
                   help="exact match: record field to group accuracy by")
    p.add_argument("--out", default=None, help="output folder (default: <model>/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("attention-maps", help="pictures of the teacher's and students' instruction→vision "
                                              "attention on a few samples, with similarity numbers")
    p.add_argument("--teacher", required=True, help="teacher HF model directory")
    layer = p.add_mutually_exclusive_group(required=True)
    layer.add_argument("--teacher-layer", type=int, default=None, help="the teacher's layer to read")
    layer.add_argument("--irs", default=None, help="irs.json (or the run directory holding it) whose "
                                                   "chosen_layer is the teacher's layer")
    p.add_argument("--student", action="append", default=[], metavar="NAME=DIR",
                   help="a student model directory, repeatable (e.g. before=<dir> after=<run>/export)")
    p.add_argument("--student-layer", type=int, default=None,
                   help="every student's layer (default: the teacher layer's relative depth)")
    p.add_argument("--data", required=True, help="LLaVA-format JSON/JSONL")
    p.add_argument("--images", default=None, help="image folder (default: the data file's folder)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--samples", default=None, help="record indices of --data, e.g. 0,5,9")
    which.add_argument("--first", type=int, default=8, help="the first N records (default: 8)")
    p.add_argument("--chat-template", default=None, help="template name or .jinja (default: the processor's)")
    p.add_argument("--predictions", action="append", default=[], metavar="NAME=FILE",
                   help="optional: a model's answers (aligntI eval's *_predictions.jsonl) shown in the titles")
    p.add_argument("--attn", default=default_of(compute_attention_maps, "attn"),
                   help="text attention backend (sdpa or eager)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=default_of(compute_attention_maps, "batch_size"))
    p.add_argument("--max-length", type=int, default=default_of(compute_attention_maps, "max_length"))
    p.add_argument("--queries", choices=QUERY_ROWS, default=default_of(compute_attention_maps, "queries"),
                   help="the maps' query rows, as a recipe's iva.queries (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_attention_maps)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends it with one line on stderr, exit code 2 (aligntI/errors.py)."""
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
