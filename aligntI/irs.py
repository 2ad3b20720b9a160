"""IRS, the Instruction-Relevance Score of each teacher layer, and the IVA layer it selects.

``IRS(l) = 1 − mean over sample pairs of cos(α_l(x1), α_l(x2))`` where ``α_l(x)`` is the instruction→vision
attention of layer ``l`` averaged over heads and instruction positions and renormalised over the vision
tokens. A layer whose visual focus follows the question scores high; one that looks at the same places
whatever is asked scores low. Ties go to the shallower layer.

The score, the calibration set and the choice of layer: docs/method.md, section 5.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from aligntI.config import ConfigError, DataConfig, DataSource, IRSConfig, RecipeConfig
from aligntI.data.dataset import model_inputs
from aligntI.data.loader import build_sequential_loader
from aligntI.hooks.attention import AttentionCapture, decoder_layers
from aligntI.losses.iva import focus_queries, instruction_to_vision_focus


def collect_focus(forward, model, loader, device, dtype, show_progress: bool = True, queries: str = "instruction"):
    """Run ``forward`` over ``loader`` capturing every decoder layer of ``model``.

    Returns (``[layers, N, V]`` focus of the N samples that have an image and query rows (``iva.queries``),
    their image names, the number of samples left out for lacking either).
    """
    n_layers = len(decoder_layers(model))
    focus, images, left_out = [], [], 0
    for batch in tqdm(loader, desc="IRS", disable=not show_progress, dynamic_ncols=True):
        query_rows = focus_queries(batch["instruction_mask"], batch["labels"], queries)
        rows = batch["vision_mask"].any(-1) & query_rows.any(-1)
        left_out += int((~rows).sum())
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        masks = [m.to(device) for m in (query_rows, batch["vision_mask"], batch["attention_mask"])]
        # Every rank runs every batch, even one with nothing to score: under ZeRO-3 the forward is collective.
        with AttentionCapture(model, list(range(n_layers)), *masks) as cap, torch.no_grad():
            forward(**inputs, logits_to_keep=1, use_cache=False)
        if not rows.any():
            continue
        per_layer = torch.stack([instruction_to_vision_focus(cap[layer], cap.inst_valid.to(device),
                                                             cap.vis_valid.to(device)) for layer in range(n_layers)])
        focus.append(per_layer[:, rows.to(device)].float().cpu())
        images += [name for name, keep in zip(batch["images"], rows.tolist()) if keep]
    return (torch.cat(focus, dim=1) if focus else torch.zeros(n_layers, 0, 0)), images, left_out


def pair_mask(images: list[str], pairing: str) -> torch.Tensor:
    """``[N, N]`` bool: which ordered pairs of the calibration samples IRS compares; at least one, or the
    calibration settings cannot measure anything (a :class:`ConfigError` saying which to change)."""
    n = len(images)
    mask = ~torch.eye(n, dtype=torch.bool)
    if pairing == "same_image":
        ids = {name: i for i, name in enumerate(dict.fromkeys(images))}
        key = torch.tensor([ids[name] for name in images])
        mask &= key[:, None] == key[None, :]
    if not mask.any():
        if n < 2:
            raise ConfigError(f"irs: {n} calibration samples have an image and instruction tokens; IRS compares "
                              "pairs of them, so it needs at least 2 (irs.data / --data of aligntI irs)")
        raise ConfigError(f"irs.pairing: same_image, but no two of the {n} calibration samples share an image, so "
                          "IRS has no pairs to compare; use pairing any, or more samples (irs.samples; "
                          "--pairing/--samples of aligntI irs)")
    return mask


def irs_scores(focus: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``focus`` [layers, N, V], ``pairs`` [N, N] bool from :func:`pair_mask` → IRS per layer."""
    unit = F.normalize(focus.double(), dim=-1)
    cos = unit @ unit.transpose(1, 2)
    return 1 - (cos * pairs).sum((1, 2)) / pairs.sum()


def choose_layer(scores: torch.Tensor) -> int:
    """argmax; ties go to the shallower layer."""
    return int(torch.nonzero(scores == scores.max())[0])


def format_table(scores: list[float], chosen: int) -> str:
    lines = ["layer  IRS", "-----  ------"]
    lines += [f"{i:>5}  {s:.4f}" + ("  <- IVA layer" if i == chosen else "") for i, s in enumerate(scores)]
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict) -> None:
    """``irs.json`` and ``irs.png`` (bar chart, the chosen layer highlighted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "irs.json").write_text(json.dumps(report, indent=2) + "\n")
    scores = report["irs"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(scores) + 2), 3.2))
    colors = ["tab:orange" if i == report["chosen_layer"] else "tab:blue" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("IRS")
    ax.set_title(f"IRS per layer ({report['samples']} samples, {report['pairing']} pairs); "
                 f"IVA layer {report['chosen_layer']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "irs.png", dpi=120)
    plt.close(fig)


def compute_irs(forward, model, loader, device, dtype, pairing: str, is_main: bool, name: str,
                queries: str = "instruction") -> dict:
    """Focus on this rank's share, gathered from all ranks (if distributed), then the scores and the layer."""
    focus, images, left_out = collect_focus(forward, model, loader, device, dtype, show_progress=is_main,
                                            queries=queries)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (focus, images, left_out))
        focus = torch.cat([p[0] for p in parts if p[0].shape[1]], dim=1)
        images = [name for p in parts for name in p[1]]
        left_out = sum(p[2] for p in parts)
    pairs = pair_mask(images, pairing)
    scores = irs_scores(focus, pairs)
    return {
        "model": name, "irs": scores.tolist(), "chosen_layer": choose_layer(scores),
        "samples": len(images), "left_out_no_image_or_instruction": left_out,
        "pairs": int(pairs.sum()) // 2, "pairing": pairing, "queries": queries,
    }


def saved_layer(report_path: Path, teacher: str, queries: str) -> int | None:
    """The IVA layer an ``irs.json`` chose, when it was computed for this teacher from these query rows."""
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    if (report["model"], report.get("queries", "instruction")) != (teacher, queries):
        return None
    return report["chosen_layer"]


def calibrate_iva_layer(teacher, processor, cfg, dist) -> dict:
    """``iva.layer: auto`` at start-up: IRS of the teacher engine on ``irs.samples`` calibration samples, drawn
    at random (seeded by the recipe's seed) from the whole calibration source, the same count on every rank."""
    data = cfg.data
    if cfg.irs.data is not None:
        data = replace(data, train=[replace(data.train[0], path=cfg.irs.data, images=cfg.irs.images,
                                            weight=1.0, max_samples=None)])
    else:
        data = replace(data, train=data.train[:1])
    loader = build_sequential_loader(processor, data, batch_size=cfg.train.micro_batch_size,
                                     sample=cfg.irs.samples, seed=cfg.seed, rank=dist.rank,
                                     world_size=dist.world_size)
    report = compute_irs(teacher, teacher.module, loader, dist.device, teacher.module.dtype, cfg.irs.pairing,
                         dist.is_main, cfg.teacher.path, cfg.iva.queries)
    if dist.is_main:
        write_report(Path(cfg.run_dir), report)
    return report


def run_irs(model_dir: str, irs: IRSConfig, *, attn: str = "sdpa", chat_template: str | None = None,
            max_length: int = 4096, batch_size: int = 16, seed: int = RecipeConfig.seed,
            out: str | None = None, queries: str = "instruction") -> dict:
    """``aligntI irs``: IRS of every layer of the model in ``model_dir`` on ``irs.samples`` samples of ``irs.data``,
    one process or sharded over the ranks of a launcher; the main rank writes irs.json and irs.png to ``out``
    (default ``<model>/irs``) and prints the table. Returns the report."""
    from aligntI import engine as ds
    from aligntI.eval.run import load_eval_model
    from aligntI.hooks.attention import install
    from aligntI.models.loading import load_processor

    irs.validate()  # the checks of a recipe's irs: section
    install()
    dist = ds.init_distributed()
    processor = load_processor(model_dir)
    model = load_eval_model(model_dir, attn, False, dist)
    data = DataConfig(train=[DataSource(irs.data, images=irs.images)], chat_template=chat_template,
                      max_length=max_length, num_workers=1)
    loader = build_sequential_loader(processor, data, batch_size=batch_size, sample=irs.samples, seed=seed,
                                     rank=dist.rank, world_size=dist.world_size)
    report = compute_irs(model, model, loader, dist.device, model.dtype, irs.pairing, dist.is_main, model_dir,
                         queries)
    if dist.is_main:
        out_dir = Path(out) if out else Path(model_dir) / "irs"
        write_report(out_dir, report)
        print(format_table(report["irs"], report["chosen_layer"]))
        print(f"IRS on {report['samples']} samples ({report['pairs']} {report['pairing']} pairs; "
              f"{report['left_out_no_image_or_instruction']} without image or instruction left out). "
              f"Chosen IVA layer: {report['chosen_layer']}. Wrote {out_dir / 'irs.json'} and {out_dir / 'irs.png'}")
    ds.destroy()
    return report
