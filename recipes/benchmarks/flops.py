"""FLOPs per optimizer step of each distillation variant, teacher and student apart, counted by torch.

    python recipes/benchmarks/flops.py [--shapes cpu_example paper paper_widths] [--out runs/bench]

The variants are distill_cost.py's (sft, vanilla_kd, vkd_uniform, iva, tpa, align_ti, tpa_paper) and ``iva_rows``
(IVA scoring ``ROW_BUDGET`` vision rows per sample, ``iva.row_budget``), each counted
with ``torch.utils.flop_counter.FlopCounterMode`` at three shapes:

* ``cpu_example`` and ``paper`` (distill_cost.py's models and data): one real step of recipes/train.py's own
  ``build`` + ``train_step`` on 1 rank (ZeRO-3 engines, CPU). The teacher's FLOPs are what runs inside its
  forward calls (forward hooks on ``run.teacher.module`` read the counter before and after; it runs under
  ``no_grad``, so it has no backward); the student's are the rest: its forwards, backward, optimizer step.
  The hooks also record the step's *trace*: each model forward in order, its kind (ground truth, TPA candidate
  pass, joint pass, the paper's ribbon pass), whether it builds a graph and which logit rows it keeps. So the
  count and the trace follow whatever structure the objective has.
* ``paper_widths``: a Qwen2.5-7B-shaped teacher and a Qwen2.5-1.5B-shaped student (tied embeddings) with a
  SigLIP-so400m-shaped tower (729 image tokens), samples of 729 vision + 64 instruction + 128-200 response
  tokens, built on the meta device: nothing is allocated. The objective itself cannot run there (candidate
  draws, boolean indexing and LLaVA's image-token check need values), so the trace of the same variant at the
  ``paper`` shape is replayed pass by pass (:func:`replay`): the vision tower and projector on the images,
  the decoder over the pass's tokens with the real TPA records (``PrefixCache``, ``CandidateBatch``,
  ``JointPass``, built from the batch's masks on the CPU and moved to meta) so that our attention wrapper runs
  the candidate rows' attention as in training, the LM head on the kept rows, one backward over the passes
  that build a graph. The replay is validated at the ``paper`` shape, where it must give the real step's
  count: both are printed.

What is counted: matmuls (``mm``, ``addmm``, ``bmm``), the patch convolution and attention kernels at 2 FLOPs
per multiply-add. Attention is counted as the kernel computes it: the dense ``Q·Kᵀ`` and ``P·V`` blocks of every
query row against every key it is given (``4·b·h·q·k·d`` forward, no discount for causal or masked entries; a
fused kernel's backward ``10·b·h·q·k·d``, which includes recomputing the scores). So a candidate row of the
candidate or joint pass costs its ``L + R`` keys (the ground-truth prefix and its row's candidates, masked to
itself). torch has no formula for the CPU flash kernel: it is given the CUDA flash kernel's. On meta tensors
SDPA would fall back to its math decomposition (a backward without the recompute), so there it runs the CPU
flash kernel's meta function. Not counted: element-wise work (norms, softmax, the losses, AdamW), which is
small beside the matmuls. One step = the recipe's global batch (``paper_widths``: the paper recipes' global
batch in micro-batches of 4 such samples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_cost import (  # noqa: E402
    REPO,
    ROW_BUDGET,
    ROW_BUDGET_CHOICES,
    VARIANTS,
    D,
    PaperStyleTPA,
    load_train_script,
    prepare,
    recipe_for,
)

COUNTED = (*VARIANTS, *ROW_BUDGET_CHOICES)  # iva_rows: IVA with its logits at ROW_BUDGET vision rows per sample

aten = torch.ops.aten
SHAPES = ("cpu_example", "paper", "paper_widths")
MICRO = 4  # paper_widths: samples per micro-batch (as the paper shape's)
RESPONSES = (128, 152, 176, 200)  # paper_widths: response tokens of the micro-batch's samples


# ---------------------------------------------------------------------------------------------- counting

def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the CPU flash-attention kernel (torch has no formula for it)."""
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    })


class FusedSDPA(TorchFunctionMode):
    """SDPA through the CPU flash kernel's meta function: on meta tensors SDPA would otherwise decompose into
    matmuls whose backward skips the fused kernels' recompute of the scores, and count less than a real run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return fused_sdpa(*args, **kwargs)


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                             attn_mask=attn_mask, scale=scale)[0]


# ---------------------------------------------------------------------------------------------- the real step

@dataclass
class Pass:
    """One model forward of a step, as the trace records it."""

    model: str  # teacher | student
    kind: str  # gt | candidates | joint | ribbon
    grad: bool  # builds a graph (the student's graded passes)
    keep: str  # logit rows: all | response | response+vision | response+budget (candidates on top of these)
    capture: bool  # an IVA attention capture is open on one layer
    flops: int = 0  # forward FLOPs, measured (real step) or counted (replay)


def keep_kind(kept: int, mb: dict, extra: int) -> str:
    """Name the logit rows a pass keeps from their count: ``kept`` minus its ``extra`` candidate rows."""
    response = int(scored(mb).sum())
    vision = (mb["vision_mask"] & mb["instruction_mask"].any(-1, keepdim=True)).sum(-1)
    rows = kept - extra
    counts = (("all", mb["input_ids"].numel()), ("response", response),
              ("response+vision", response + int(vision.sum())),
              ("response+budget", response + int(vision.clamp(max=ROW_BUDGET).sum())))
    for name, count in counts:
        if rows == count:
            return name
    raise RuntimeError(f"a pass keeps {rows} logit rows, none of {dict(counts)}; teach flops.py")


def scored(mb: dict) -> torch.Tensor:
    from aligntI.losses.tpa import scored_rows

    return scored_rows(mb["labels"])


class StepTrace:
    """Hooks on both models' forwards: the FLOPs counter read around each call and the pass it was."""

    def __init__(self, run, flop_counter: FlopCounterMode):
        self.counter, self.passes, self.micro, self.draws = flop_counter, [], [], []
        self.extra = 0  # the candidate rows of the pass being traced
        objective = run.objective
        self.inner = getattr(objective, "inner", objective)  # PaperStyleTPA wraps the recipe's objective
        plan, loss = objective.plan, objective.loss

        def recorded_plan(micro, step):
            out = plan(micro, step)
            self.draws = out.draws
            return out

        def recorded_loss(mb, draws, counts):
            self.micro.append(mb)
            self.passes.append([])
            return loss(mb, draws, counts)

        objective.plan, objective.loss = recorded_plan, recorded_loss
        models = {"student": run.student.module}
        if hasattr(self.inner, "teacher"):
            models["teacher"] = self.inner.teacher.module
        self.handles = []
        for name, module in models.items():
            self.handles += [module.register_forward_pre_hook(self._before(name), with_kwargs=True),
                             module.register_forward_hook(self._after),
                             module.get_output_embeddings().register_forward_hook(self._head)]

    def _before(self, name):
        def hook(module, args, kwargs):
            mb = self.micro[-1]
            keep = kwargs.get("logits_to_keep")
            kept = int(keep.sum()) if isinstance(keep, torch.Tensor) else mb["input_ids"].numel()
            if kwargs.get("candidates") is not None:
                kind, rows = "candidates", "response"
            else:
                mask = kwargs.get("attention_mask")
                kind = "joint" if kwargs.get("joint") is not None else \
                    "ribbon" if mask is not None and mask.dim() == 4 else "gt"
                extra = D * int(self.draws[len(self.micro) - 1].tpa.rows.sum()) if kind != "gt" else 0
                rows = keep_kind(kept, mb, extra)
                self.extra = extra
            grad = torch.is_grad_enabled()
            if name == "teacher":
                capture = self.inner.needs_teacher_attention and kind != "candidates"
            else:
                capture = getattr(self.inner, "student_layer", None) is not None and grad and kind != "candidates"
            self.passes[-1].append(Pass(name, kind, grad, rows, capture, -self.counter.get_total_flops()))
        return hook

    def _after(self, module, args, output):
        self.passes[-1][-1].flops += self.counter.get_total_flops()

    def _head(self, module, args, output):
        """The rows the LM head did project: fewer than ``logits_to_keep`` when the objective chose them during
        the forward (``iva.row_budget``)."""
        last = self.passes[-1][-1]
        if last.kind != "candidates":
            last.keep = keep_kind(args[0].shape[0], self.micro[-1], self.extra)

    def remove(self):
        for h in self.handles:
            h.remove()


def count_step(train, run, micro: list[dict], step: int) -> dict:
    """One ``train_step`` of ``run`` under the counter: FLOPs per model, and the trace with each micro-batch and
    its TPA positions (the real step's work: its optimizer update counts)."""
    flop_counter = counter()
    trace = StepTrace(run, flop_counter)
    try:
        with flop_counter:
            train.train_step(run, micro, step)
    finally:
        trace.remove()
    total = flop_counter.get_total_flops()
    teacher = sum(p.flops for passes in trace.passes for p in passes if p.model == "teacher")
    return {"teacher": teacher, "student": total - teacher, "trace": trace}


def count_real_step(variant: str, root: Path, shape: str, ds_config: str) -> dict:
    """One step of train.py's own ``train_step``: FLOPs per model, the trace, and the replay of that trace on
    meta copies of the same models (the composition's check)."""
    from aligntI import engine

    train = load_train_script()
    run = train.build(recipe_for(variant, root, shape, ds_config, 1), [])
    if variant == "tpa_paper":
        run.objective = PaperStyleTPA(run.objective)
    run.student.train()
    micro = [b for b, _ in zip(iter(run.loader), range(run.batching.gradient_accumulation_steps))]
    counted = count_step(train, run, micro, 1)
    trace = counted["trace"]
    trainable = run.cfg.model.trainable
    engine.destroy()
    models = {"student": meta_model_from_dir(root / "student", trainable)}
    if "teacher" in {p.model for p in trace.passes[0]}:
        models["teacher"] = meta_model_from_dir(root / "teacher", trainable)
    layers = capture_layers(trace.inner)
    replayed = [replay(passes, models, mb, draws.tpa.rows if draws.tpa is not None else None, layers)
                for passes, mb, draws in zip(trace.passes, trace.micro, trace.draws)]
    tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)
    positions = sum(int(d.tpa.rows.sum()) for d in trace.draws if d.tpa is not None)
    return {
        "variant": variant, "teacher": counted["teacher"], "student": counted["student"],
        "trace": [[vars(p) for p in passes] for passes in trace.passes],
        "replay": {"teacher": sum(r["teacher"] for r in replayed), "student": sum(r["student"] for r in replayed),
                   "passes": [[vars(p) for p in r["passes"]] for r in replayed]},
        "tokens": tokens, "samples": sum(mb["input_ids"].shape[0] for mb in micro), "tpa_positions": positions,
    }


def capture_layers(objective) -> dict[str, int | None]:
    return {"teacher": getattr(objective, "iva_layer", None), "student": getattr(objective, "student_layer", None)}


# ---------------------------------------------------------------------------------------------- meta models

def meta_model_from_dir(path: Path, trainable: list[str]):
    """The model of an HF directory, on the meta device, trainable parts as the recipe's."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from aligntI.config import AttentionConfig
    from aligntI.models.loading import set_trainable

    attn = AttentionConfig()  # distill_cost's recipes keep the default backends
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(
            config, attn_implementation={"text_config": attn.text, "vision_config": attn.vision})
    set_trainable(model, trainable)
    return model


class Vocabulary:
    """The tokenizer facts :func:`aligntI.models.builder.build_model` reads, for a vocabulary of ``size`` ids
    (no tokenizer of that size exists here; the ids only need to be distinct)."""

    bos_token_id, eos_token_id, pad_token_id, image_token_id = 1, 2, 0, 3

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.image_token_id


def paper_width_models() -> dict:
    """Qwen2.5-7B / Qwen2.5-1.5B-shaped LLaVA teacher and student, SigLIP-so400m-shaped tower, on meta."""
    from aligntI.models.builder import TextSpec, TinyModelSpec, VisionSpec, build_model
    from aligntI.models.loading import set_trainable

    vision = VisionSpec("siglip", hidden_size=1152, num_layers=27, num_heads=16, intermediate_size=4304,
                        image_size=384, patch_size=14)
    specs = {
        "teacher": (TextSpec("qwen2", hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                             intermediate_size=18944), 152064, False),
        "student": (TextSpec("qwen2", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                             intermediate_size=8960), 151936, True),
    }
    models = {}
    for name, (text, vocab, tied) in specs.items():
        with torch.device("meta"):
            model = build_model(TinyModelSpec(text, vision), Vocabulary(vocab))
        if tied:  # one matrix for embedding and LM head: the same FLOPs, fewer parameters
            model.lm_head.weight = model.model.language_model.embed_tokens.weight
        set_trainable(model, ["projector", "llm"])
        models[name] = model
    return models


def synthetic_batch(image_tokens: int, instruction: int, responses, image_size: int, vocab: Vocabulary,
                    pixels_device: str = "meta", seed: int = 0) -> dict:
    """A right-padded micro-batch of the collator's layout, one sample per entry of ``responses`` (its response
    length): ``[2 text] image instruction [2 text] response [EOS]``, response and EOS labelled, random text ids."""
    from aligntI.data.dataset import Collator

    rng = np.random.default_rng(seed)
    items = []
    for response in responses:
        parts = [(2, "text"), (image_tokens, "vision"), (instruction, "instruction"), (2, "text"),
                 (response + 1, "response")]
        kinds = np.concatenate([np.full(n, k) for n, k in parts])
        text = rng.integers(vocab.image_token_id + 1, len(vocab), kinds.size)
        ids = np.where(kinds == "vision", vocab.image_token_id, text).astype(np.int64)
        encoded = SimpleNamespace(input_ids=ids, labels=np.where(kinds == "response", ids, -100),
                                  vision_mask=kinds == "vision", instruction_mask=kinds == "instruction",
                                  response_mask=kinds == "response", truncated=False)
        pixels = torch.randn((1, 3, image_size, image_size), device=pixels_device)
        items.append({"encoded": encoded, "pixel_values": pixels, "id": str(len(items)), "image": None, "skips": []})
    return Collator(vocab.pad_token_id, vocab.image_token_id, image_tokens, (3, image_size, image_size))(items)


def paper_width_batch() -> dict:
    """The paper_widths micro-batch: 729 image tokens, 64 instruction tokens, responses of ``RESPONSES``."""
    return synthetic_batch(729, 64, RESPONSES, 384, Vocabulary(151936))


# ---------------------------------------------------------------------------------------------- the replay

def to_meta(obj, names):
    for name in names:
        setattr(obj, name, getattr(obj, name).to("meta"))
    return obj


def replay(passes: list[Pass] | list[dict], models: dict, mb: dict, rows: torch.Tensor | None,
           layers: dict[str, int | None]) -> dict:
    """Count a micro-batch's passes (a trace) on meta models: FLOPs per model, forwards and backward.

    ``mb`` is a CPU batch (its pixels may be on meta), ``rows [B, L]`` the TPA positions; the candidate ids are
    0 (FLOPs do not depend on them). Each model's candidate pass reads the prefix its last ``gt`` pass recorded.
    """
    from aligntI.hooks import attention as capture
    from aligntI.hooks.transitions import CandidateBatch, JointPass, PrefixCache

    capture.install()
    passes = [p if isinstance(p, Pass) else Pass(**{**p, "flops": 0}) for p in passes]
    keep = {"all": torch.ones_like(mb["attention_mask"], dtype=torch.bool), "response": scored(mb)}
    vision = mb["vision_mask"] & mb["instruction_mask"].any(-1, keepdim=True)
    keep["response+vision"] = keep["response"] | vision
    keep["response+budget"] = keep["response"] | (vision & (vision.cumsum(-1) <= ROW_BUDGET))  # the first k: a count
    layout = None
    if rows is not None:
        candidates = torch.zeros((int(rows.sum()), D), dtype=torch.long)
        layout = CandidateBatch(rows, candidates, mb["attention_mask"], mb["position_ids"])
    prefixes, graded, out = {}, [], []
    flop_counter = counter()
    with flop_counter, FusedSDPA():
        for p in passes:
            model = models[p.model]
            before = flop_counter.get_total_flops()
            with torch.set_grad_enabled(p.grad), _capture(p, model, mb, layers):
                if p.kind == "candidates":
                    cand = to_meta(_copy(layout), ("input_ids", "position_ids", "index", "key_valid"))
                    hidden = _decoder(model, ids=cand.input_ids,
                                      prefix_cache=prefixes[p.model], candidates=cand)
                    kept = int(layout.valid.sum())
                elif p.kind == "joint":
                    joint = JointPass(model, layout, mb_inputs(mb), keep[p.keep])
                    joint.layout = to_meta(_copy(layout), ("input_ids", "position_ids", "index", "key_valid"))
                    ins = joint.inputs
                    hidden = _decoder(model, ids=ins["input_ids"], pixels=mb["pixel_values"],
                                      attention_mask=ins["attention_mask"], joint=joint)
                    kept = int(ins["logits_to_keep"].sum())
                elif p.kind == "ribbon":
                    from distill_cost import ribbon_expand

                    expanded, _ = ribbon_expand(mb_inputs(mb), rows, candidates, D)
                    hidden = _decoder(model, ids=expanded["input_ids"], pixels=mb["pixel_values"],
                                      attention_mask=expanded["attention_mask"])
                    kept = int(expanded["logits_to_keep"].sum())
                else:
                    prefixes[p.model] = PrefixCache(model) if layout is not None else None
                    hidden = _decoder(model, ids=mb["input_ids"], pixels=mb["pixel_values"],
                                      attention_mask=mb["attention_mask"], prefix_cache=prefixes[p.model])
                    kept = int(keep[p.keep].sum())
                # The kept rows' count is what costs; which rows they are needs values (boolean indexing).
                logits = model.lm_head(hidden.flatten(0, 1)[:kept])
            if p.grad:
                graded.append(logits)
            p.flops = flop_counter.get_total_flops() - before
            out.append(p)
        forward = flop_counter.get_total_flops()
        if graded:
            sum(x.float().sum() for x in graded).backward()
        backward = flop_counter.get_total_flops() - forward
    teacher = sum(p.flops for p in out if p.model == "teacher")
    return {"teacher": teacher, "student": forward + backward - teacher, "backward": backward, "passes": out}


def mb_inputs(mb: dict) -> dict:
    return {k: mb[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values")}


def _copy(layout):
    new = object.__new__(type(layout))
    new.__dict__.update(layout.__dict__, _masks={})
    return new


def _capture(p: Pass, model, mb: dict, layers: dict):
    from aligntI.hooks.attention import AttentionCapture

    if not p.capture:
        return contextlib.nullcontext()
    return AttentionCapture(model, [layers[p.model]], mb["instruction_mask"], mb["vision_mask"],
                            mb["attention_mask"].bool())


def _decoder(model, ids, pixels=None, attention_mask=None, **records):
    """Vision tower and projector (when the pass carries the image), then the text decoder, all on meta.

    LLaVA's own forward checks the image-token count by value; here the projected patches are scattered into
    the image-token slots of the embeddings, as it does."""
    inner = model.model
    embeds = inner.get_input_embeddings()(ids.to("meta"))
    if pixels is not None:
        cfg = model.config
        feats = inner.get_image_features(pixels.to("meta"), vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = torch.cat(list(feats.pooler_output))  # [images · patches, H]
        slots = (ids == cfg.image_token_id)[..., None].to("meta").expand_as(embeds)
        embeds = embeds.masked_scatter(slots, feats.to(embeds.dtype))
    # transformers reads a 2-D padding mask's values (to skip it when all ones) and, without one, the position
    # ids' (to detect packed sequences): on meta every pass gets a 4-D mask, which it takes as given. The kernels
    # are counted dense, so its values change nothing; default positions neither.
    batch, length = ids.shape
    if attention_mask is None or attention_mask.dim() != 4:
        attention_mask = torch.zeros((batch, 1, length, length))
    return inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask.to("meta"), use_cache=False,
                                **records).last_hidden_state


# ---------------------------------------------------------------------------------------------- shapes

def count_paper_widths(paper: dict) -> dict:
    """Each variant's trace at the ``paper`` shape, replayed at the paper's widths on meta."""
    import yaml

    global_batch = yaml.safe_load((REPO / "recipes/paper/_common.yaml").read_text())["train"]["global_batch_size"]
    micro = global_batch // MICRO
    models, mb = paper_width_models(), paper_width_batch()
    out = {}
    for variant in COUNTED:
        print(f"[flops] paper_widths: {variant} (the paper shape's passes on meta models)", flush=True)
        passes = paper[variant]["trace"][0]
        tpa = any(p["kind"] != "gt" for p in passes)
        r = replay(passes, models, mb, scored(mb) if tpa else None, {"teacher": 2, "student": None})
        out[variant] = {"variant": variant, "teacher": r["teacher"] * micro, "student": r["student"] * micro,
                        "passes": [vars(p) for p in r["passes"]], "micro_batches": micro,
                        "tokens": int(mb["attention_mask"].sum()) * micro, "samples": global_batch,
                        "tpa_positions": int(scored(mb).sum()) * micro if tpa else 0}
    return out


def report(shape: str, results: dict) -> list[str]:
    kd = results["vanilla_kd"]
    tokens, positions = kd["tokens"], results["tpa"]["tpa_positions"]
    floor = (tokens + D * positions) / tokens
    lines = [f"\n== {shape}: FLOPs per optimizer step ({kd['samples']} samples, L = {tokens / kd['samples']:.1f} "
             f"tokens and |R| = {positions / kd['samples']:.1f} TPA positions per sample, d = {D}): TPA token floor "
             f"(L + d|R|)/L = {floor:.2f}"]
    base = kd["teacher"] + kd["student"]
    unit, scale = ("TF", 1e12) if base > 1e13 else ("GF", 1e9)
    lines += [f"{'variant':<12}{'teacher ' + unit:>14}{'student ' + unit:>14}{'total ' + unit:>14}{'x KD':>7}"]
    for v in COUNTED:
        r = results[v]
        total = r["teacher"] + r["student"]
        lines.append(f"{v:<12}{r['teacher'] / scale:>14.2f}{r['student'] / scale:>14.2f}{total / scale:>14.2f}"
                     f"{total / base:>7.2f}")
    iva, rows = (results[v]["teacher"] + results[v]["student"] for v in ("iva", "iva_rows"))
    lines.append(f"IVA at {ROW_BUDGET} vision rows per sample (iva_rows) saves {(iva - rows) / scale:.2f} {unit} per step: "
                 f"{100 * (iva - rows) / iva:.1f}% of the IVA step, {100 * (iva - rows) / max(iva - base, 1):.0f}% of "
                 "what IVA adds to vanilla KD")
    if "replay" in kd:
        lines.append(f"check: the passes replayed on meta models vs the real step (teacher / student, {unit})")
        for v in COUNTED:
            r, m = results[v], results[v]["replay"]
            diff = max(abs(m[k] - r[k]) / max(r[k], 1) for k in ("teacher", "student"))
            passes = " ".join(f"{p['model'][0]}:{p['kind']}{'+grad' if p['grad'] else ''}" for p in r["trace"][0])
            lines.append(f"  {v:<12}real {r['teacher'] / scale:.3f} / {r['student'] / scale:.3f}  meta "
                         f"{m['teacher'] / scale:.3f} / {m['student'] / scale:.3f}  max diff {100 * diff:.2f}%  "
                         f"[{passes}]")
    else:
        passes = results["tpa"]["passes"]
        lines.append("tpa's passes: " + " ".join(f"{p['model'][0]}:{p['kind']}{'+grad' if p['grad'] else ''}"
                                                  for p in passes))
    return lines


def worker(args) -> None:
    root = Path(args.out) / args.shape
    Path(args.result).write_text(json.dumps(count_real_step(args.worker, root, args.shape, args.ds_config)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3_cpu.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out).resolve()
    real = [s for s in SHAPES if s in args.shapes and s != "paper_widths"]
    if "paper_widths" in args.shapes and "paper" not in real:
        real.append("paper")  # its passes are what paper_widths replays
    lines, counted = [], {}
    for shape in real:
        prepare(shape, out)
        results = {}
        for variant in COUNTED:
            result = out / shape / f"flops_{variant}.json"
            env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(29500 + random.randrange(1000))}
            cmd = [sys.executable, __file__, "--worker", variant, "--shape", shape, "--out", str(out),
                   "--ds-config", args.ds_config, "--result", str(result)]
            print(f"[flops] {shape}: {variant} (one real step, then its passes on meta models)", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            results[variant] = json.loads(result.read_text())
        counted[shape] = results
    if "paper_widths" in args.shapes:
        counted["paper_widths"] = count_paper_widths(counted["paper"])
    for shape in args.shapes:
        (out / shape).mkdir(parents=True, exist_ok=True)
        (out / shape / "flops.json").write_text(json.dumps(counted[shape], indent=2))
        lines += report(shape, counted[shape])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
