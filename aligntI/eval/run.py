"""Evaluation jobs, in one process or over the ranks of a launcher: a model loaded for evaluation, a benchmark
recipe (``aligntI eval --config`` / ``--bench``), and exact match on a LLaVA-format file (the CPU example)."""

from __future__ import annotations

from pathlib import Path

import torch

from aligntI import engine as ds
from aligntI.config import AttentionConfig, DataConfig, DataSource, EvalConfig
from aligntI.data.loader import build_encoder
from aligntI.eval.benchmarks import title_of
from aligntI.eval.generation import evaluate_exact_match, load_eval_items
from aligntI.eval.recipe import EvalRecipe
from aligntI.eval.suite import evaluate_benchmark, write_table
from aligntI.models.loading import load_model, load_processor


def load_eval_model(path: str, attn: str, zero3: bool, dist: ds.DistInfo):
    """The model in eval mode on this rank's device, or partitioned over the ranks (ZeRO-3)."""
    dtype = torch.bfloat16 if dist.device.type == "cuda" else torch.float32
    attention = AttentionConfig(attn, "sdpa")  # the attention choice is the LLM's; the vision tower runs SDPA
    model = load_model(path, attention, dtype)
    if zero3:
        return ds.inference_engine(model, bf16=dtype == torch.bfloat16).module
    return model.to(dist.device).eval()


def encoder_for(processor, data: str, chat_template: str):
    """The training pipeline's formatting, without its length limit (an evaluation never truncates)."""
    return build_encoder(processor, DataConfig(train=[DataSource(data)], chat_template=chat_template,
                                               max_length=10**9))


def run_eval_recipe(recipe: EvalRecipe) -> None:
    """Every benchmark of ``recipe``: answers, scores and (on the main rank) the score table in ``recipe.out``."""
    dist = ds.init_distributed()
    processor = load_processor(recipe.model)
    model = load_eval_model(recipe.model, recipe.attn, recipe.zero3, dist)
    encoder = encoder_for(processor, recipe.benchmarks[0].data, recipe.chat_template)
    out = Path(recipe.out) if recipe.out else Path(recipe.model) / "eval"
    for bench in recipe.benchmarks:
        score = evaluate_benchmark(model, processor, encoder, bench, recipe, out, device=dist.device,
                                   rank=dist.rank, world_size=dist.world_size)
        if score is not None:
            print(f"[aligntI] {title_of(bench.name)}: {score.score:.2f} ({score.n} questions) -> "
                  f"{out / (bench.name + '_answers.jsonl')}", flush=True)
    if dist.is_main:
        print(write_table(out, recipe.model), flush=True)
        print(f"[aligntI] wrote {out / 'scores.md'} and {out / 'scores.json'}", flush=True)
    ds.destroy()


def run_exact_match(model_dir: str, ev: EvalConfig, *, chat_template: str, attn: str, out: str | None) -> None:
    """Greedy generation and exact match against the last turn of each record of ``ev.data``."""
    ev.validate()
    dist = ds.init_distributed()
    processor = load_processor(model_dir)
    model = load_eval_model(model_dir, attn, False, dist)
    items = load_eval_items(ev.data, ev.images, ev.category_key, ev.max_samples)
    evaluate_exact_match(
        model, processor, encoder_for(processor, ev.data, chat_template), items, batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens, device=dist.device, rank=dist.rank, world_size=dist.world_size,
        out_dir=Path(out) if out else Path(model_dir) / "eval", name=Path(ev.data).stem, title=model_dir,
    )
    ds.destroy()
