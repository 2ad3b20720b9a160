"""Greedy generation over a LLaVA-format evaluation file, sharded over ranks, scored by exact match.

Under ZeRO-3 every rank must run the same forwards: each rank gets the same number of batches (short
shards repeat a batch whose answers are dropped) and ``generate`` runs with ``synced_gpus`` so ranks
keep stepping until all are done.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed
from PIL import Image
from tqdm import tqdm

from aligntI.data.dataset import check_sample, decode_image
from aligntI.data.formatting import ConversationEncoder, FormatError
from aligntI.data.records import DataError, RecordSource


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def load_eval_items(path: str, images: str | None, category_key: str, max_samples: int | None,
                    allow_images_outside: bool = False) -> list[dict]:
    """Single-answer items: the prompt is every turn but the last, the reference is the last answer.

    Every record is checked as training records are (:func:`aligntI.data.dataset.check_sample`), so a bad
    one raises :class:`DataError` here rather than during generation.
    """
    source = RecordSource(path, images, max_samples, allow_images_outside)
    items = []
    for i in range(len(source)):
        sample = check_sample(source, i)
        items.append({
            "id": sample.id if sample.id is not None else f"#{i}",
            "prompt": sample.messages[:-1],
            "reference": sample.messages[-1]["content"],
            "image": str(sample.image_path) if sample.image_path else None,
            "category": str(sample.record.get(category_key, "all")),
            "file": str(source.path),
            "record": i,
        })
    return items


def eval_image(item: dict) -> Image.Image:
    """An item's image as RGB; pixels that do not decode are a :class:`DataError` naming the record."""
    try:
        return decode_image(Path(item["image"]))
    except FormatError as err:
        raise DataError(item["file"], str(err), record=item["record"], sample_id=item["id"]) from None


@dataclass
class Prompt:
    """One generation request: the conversation so far and, when it has one, how to read its image."""

    id: str
    messages: list[dict]
    image: Callable[[], Image.Image] | None = None


def exact_match_prompts(items: list[dict]) -> list[Prompt]:
    return [Prompt(it["id"], it["prompt"], partial(eval_image, it) if it["image"] else None) for it in items]


@torch.no_grad()
def generate_answers(model, processor, encoder: ConversationEncoder, prompts: list[Prompt], *, batch_size: int,
                     max_new_tokens: int, device, rank: int = 0, world_size: int = 1,
                     progress: bool = True) -> dict[str, str]:
    """Greedy answers to this rank's share of ``prompts`` (every ``world_size``-th one), by id."""
    mine = prompts[rank::world_size]
    n_batches = -(-len(prompts) // (batch_size * world_size))
    tok = processor.tokenizer
    out = {}
    bar = tqdm(range(n_batches), desc="eval", disable=not progress or rank != 0, leave=False)
    for b in bar:
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        real = len(chunk)
        if not chunk:  # this rank ran out: repeat its first batch so collectives stay in step
            chunk = mine[:batch_size] or prompts[:1]
        ids = [encoder.prompt_ids(p.messages) for p in chunk]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, p in enumerate(ids):  # left padding: generation continues from the right edge
            input_ids[row, width - len(p):] = torch.tensor(p)
            attention[row, width - len(p):] = 1
        images = [p.image() for p in chunk if p.image is not None]
        kwargs = {}
        if images:
            kwargs["pixel_values"] = processor.image_processor(images=images, return_tensors="pt")[
                "pixel_values"].to(device=device, dtype=model.dtype)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, synced_gpus=world_size > 1, pad_token_id=pad, eos_token_id=tok.eos_token_id,
            **kwargs,
        )
        texts = tok.batch_decode(generated[:, width:], skip_special_tokens=True)
        out.update({p.id: text.strip() for p, text in zip(chunk[:real], texts[:real])})
    return out


def gather_answers(local: dict[str, str], rank: int, world_size: int) -> dict[str, str] | None:
    """Every rank's answers on rank 0 (None elsewhere)."""
    if world_size == 1:
        return local
    parts = [None] * world_size
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()} if rank == 0 else None


def with_answers(items: list[dict], answers: dict[str, str]) -> list[dict]:
    return [{"id": it["id"], "category": it["category"], "reference": it["reference"], "prediction": answers[it["id"]]}
            for it in items]


def exact_match_scores(predictions: list[dict]) -> dict:
    """Accuracy (in %) overall and per category; exact match after whitespace/case normalisation."""
    hits, counts = defaultdict(int), defaultdict(int)
    for p in predictions:
        ok = normalize_answer(p["prediction"]) == normalize_answer(p["reference"])
        for key in ("all", p["category"]):
            hits[key] += ok
            counts[key] += 1
    return {k: {"accuracy": 100.0 * hits[k] / counts[k], "n": counts[k]} for k in sorted(counts)}


def format_scores(scores: dict, title: str) -> str:
    lines = [f"{title}", f"{'category':<12}{'accuracy':>10}{'n':>8}"]
    order = ["all"] + [k for k in scores if k != "all"]
    for k in order:
        if k in scores:
            lines.append(f"{k:<12}{scores[k]['accuracy']:>9.1f}%{scores[k]['n']:>8}")
    return "\n".join(lines)


def write_results(out_dir: Path, name: str, predictions: list[dict], scores: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}_predictions.jsonl", "w") as f:
        for p in sorted(predictions, key=lambda p: p["id"]):
            f.write(json.dumps(p) + "\n")
    (out_dir / f"{name}_scores.json").write_text(json.dumps(scores, indent=2) + "\n")


def evaluate_exact_match(model, processor, encoder: ConversationEncoder, items: list[dict], *, batch_size: int,
                         max_new_tokens: int, device, rank: int, world_size: int, out_dir: Path, name: str,
                         title: str) -> dict | None:
    """Generate on every rank, gather on rank 0, score, write and print; returns the scores on rank 0."""
    local = generate_answers(model, processor, encoder, exact_match_prompts(items), batch_size=batch_size,
                             max_new_tokens=max_new_tokens, device=device, rank=rank, world_size=world_size)
    answers = gather_answers(local, rank, world_size)
    if answers is None:
        return None
    everything = with_answers(items, answers)
    scores = exact_match_scores(everything)
    write_results(Path(out_dir), name, everything, scores)
    print(format_scores(scores, f"{title}: exact match on {name} ({len(everything)} samples)"), flush=True)
    return scores
