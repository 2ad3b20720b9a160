"""What the training loop minimises, per micro-batch: supervised fine-tuning, or Align-TI distillation.

The loop in ``recipes/train.py`` talks to an objective through three calls, the same for both:

* ``plan(micro, step)``: the step's global normalisers (response tokens, IVA samples, TPA positions, counted
  over every micro-batch of every rank) and each micro-batch's random draws, decided before any forward;
* ``with loss(mb, draws, counts) as out: student.backward(out.loss)``: the forwards of one micro-batch and
  its loss, scaled so that the sum over micro-batches and ranks is each term's global-batch mean; backward
  runs inside the block because attention captures must stay active while activation checkpointing
  recomputes the forward;
* ``summarise(totals, counts)``: the step's logged terms from the loss sums reduced over ranks.

:class:`DistillObjective` composes ``λ_sft·L_sft + λ_kd·L_kd + λ_iva·L_iva + λ_tpa·L_tpa`` from the pure loss
functions of ``aligntI.losses``; the method as implemented is described in docs/method.md and the attention
capture and TPA candidate pass in docs/engineering.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from aligntI import engine
from aligntI.config import ConfigError, IVAConfig, RecipeConfig
from aligntI.data.dataset import model_inputs
from aligntI.data.loader import build_sequential_loader
from aligntI.hooks import attention as capture
from aligntI.hooks.modules import project_rows, relative_depth_layer
from aligntI.hooks.transitions import CandidateBatch, JointPass, PrefixCache
from aligntI.irs import calibrate_iva_layer, saved_layer
from aligntI.losses.iva import (
    attention_kl_sum,
    budget_weights,
    focus_queries,
    instruction_to_vision_focus,
    iva_weights,
)
from aligntI.losses.kd import top1_agreement, weighted_divergence_sum
from aligntI.losses.sft import rows_ce_sum
from aligntI.losses.tpa import (
    BigramTable,
    candidate_weights,
    draw_candidates,
    scored_rows,
    select_rows,
)
from aligntI.models.loading import part_sizes
from aligntI.training.accounting import micro_loss_scale


@dataclass(frozen=True)
class TPADraws:
    """One micro-batch's TPA draws: the scored positions ``rows [B, L]`` and the seed of its candidates."""

    rows: torch.Tensor
    seed: int


@dataclass(frozen=True)
class MicroDraws:
    """What one micro-batch draws: TPA's positions and candidates, and IVA's vision rows under a row budget."""

    tpa: TPADraws | None = None
    iva_seed: int | None = None


@dataclass
class StepPlan:
    counts: dict[str, float]  # global normalisers of the step's terms, also logged
    draws: list[MicroDraws]  # per micro-batch


def draw_seeds(seed: int, step: int, micro_index: int, rank: int) -> tuple[int, int, int]:
    """Seeds of the step's three random streams (TPA positions, TPA candidates, IVA rows), fixed by (recipe
    seed, step, micro-batch, rank): a resumed run draws the same. Independent seeds, not one: on the CPU two
    generators with one seed would replay the same numbers."""
    streams = np.random.SeedSequence([seed, step, micro_index, rank]).spawn(3)
    return tuple(int(s.generate_state(1, np.uint64)[0] >> 1) for s in streams)


@dataclass
class Passes:
    """What one micro-batch's forwards hand the losses."""

    t_logits: torch.Tensor  # [rows kept, V]: the ground-truth rows of each model, at ``keep``
    s_logits: torch.Tensor
    keep: torch.Tensor  # [B, L]: the rows of t_logits and s_logits
    t_cap: capture.AttentionCapture | None  # the teacher's IVA-layer capture, when IVA needs it
    iva_weights: torch.Tensor | None = None  # [B, L]: weighted_kl's weight per position (0 off its vision rows)
    t_next: torch.Tensor | None = None  # [N·d, V]: TPA's candidate rows, in candidates.flatten() order
    s_next: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # [N, d]


@dataclass
class MicroLoss:
    loss: torch.Tensor  # what backward takes: this micro-batch's share of the global-batch means
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # detached per-term sums, for the log


@dataclass(frozen=True)
class IVARows:
    """One micro-batch's IVA geometry, and the weights of ``iva.mode: weighted_kl`` once the teacher has run.

    ``vision [B, L]``: the positions weighted_kl reads (vision tokens of IVA samples; None in attention mode or
    without IVA). ``vis_valid [B, V]`` lines up with ``capture.padded_positions`` of the vision mask.
    """

    cfg: IVAConfig | None  # None: no IVA
    layer: int | None  # the teacher's IVA layer, when its attention is read
    vision: torch.Tensor | None
    vis_idx: torch.Tensor | None
    vis_valid: torch.Tensor | None
    seed: int | None  # of the row draws, under a row budget

    @property
    def budget(self) -> bool:
        """Whether only some vision rows are scored (``iva.row_budget``)."""
        return self.vision is not None and self.cfg.row_budget is not None

    def choose(self, t_cap, keep: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(weights per position ``[B, L]``, the rows the student projects): ``keep`` without the vision rows
        the weights leave at 0, so that under ``row_budget`` only the chosen rows get logits."""
        if self.vision is None:
            return None, keep
        focus = None
        if self.cfg.weights == "teacher_attention":
            focus = instruction_to_vision_focus(t_cap[self.layer], t_cap.inst_valid.to(self.vis_valid.device),
                                                self.vis_valid)
        weights = iva_weights(focus, self.vis_valid, self.cfg.weights, self.cfg.top_ratio)  # [B, V], rows sum 1
        if self.cfg.row_budget is not None:
            generator = torch.Generator(device=weights.device).manual_seed(self.seed)
            weights = budget_weights(weights, self.cfg.row_budget, self.cfg.row_choice, generator)
        per_position = torch.zeros(keep.shape, dtype=weights.dtype, device=weights.device)
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(self.vis_idx)
        per_position[rows[self.vis_valid], self.vis_idx[self.vis_valid]] = weights[self.vis_valid]
        if not self.budget:  # every vision row, as the teacher's pass read them
            return per_position, keep
        return per_position, (keep & ~self.vision) | (per_position > 0)


def response_tokens(micro: list[dict]) -> float:
    """Response tokens (label positions a logit predicts) of this rank's micro-batches."""
    return sum(float((mb["labels"][:, 1:] != -100).sum()) for mb in micro)


def to_device(mb: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The model inputs of a CPU batch on ``device``, pixels in the model's dtype."""
    out = {k: v.to(device) for k, v in model_inputs(mb).items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


class SFTObjective:
    """Cross-entropy on response tokens, a mean over the whole global batch."""

    LOSS_TERMS = ("loss",)  # what loss_curve.png plots

    def __init__(self, student, dist: engine.DistInfo, accumulation: int, log: Callable[[str], None]):
        self.student, self.dist, self.accumulation, self.log = student, dist, accumulation, log

    def plan(self, micro: list[dict], step: int) -> StepPlan:
        tokens = engine.all_reduce_sum([response_tokens(micro)], self.dist.device)[0]
        if tokens == 0:
            self.log(f"step {step}: no response tokens in the whole global batch; loss is 0 for this step")
        return StepPlan({"response_tokens": tokens}, [MicroDraws()] * len(micro))

    @contextlib.contextmanager
    def loss(self, mb: dict, draws: MicroDraws, counts: dict[str, float]) -> Iterator[MicroLoss]:
        scale = micro_loss_scale(counts["response_tokens"], self.dist.world_size, self.accumulation)
        targets = F.pad(mb["labels"].to(self.dist.device)[:, 1:], (0, 1), value=-100)  # logits at t predict t+1
        keep = targets != -100  # only the response rows are projected to the vocabulary
        logits = self.student(**to_device(mb, self.dist.device, self.student.module.dtype), logits_to_keep=keep,
                              use_cache=False).logits
        ce_sum = rows_ce_sum(logits, targets[keep])
        yield MicroLoss(ce_sum * scale, {"sft": ce_sum.detach()})

    def summarise(self, totals: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        return {"loss": totals["sft"] / max(counts["response_tokens"], 1.0)}

    def finish(self) -> None:
        pass


def count_response_bigrams(processor, cfg: RecipeConfig, dist: engine.DistInfo) -> BigramTable:
    """(token, next response token) counts over the recipe's training data, sharded over ranks and merged."""
    loader = build_sequential_loader(processor, cfg.data, batch_size=64, rank=dist.rank,
                                     world_size=dist.world_size)
    pairs = [BigramTable.count_pairs(batch["input_ids"], batch["labels"]) for batch in loader]
    table = BigramTable.from_pairs(torch.cat([p for p, _ in pairs]), torch.cat([f for _, f in pairs]),
                                   len(processor.tokenizer))
    if dist.world_size > 1:
        parts = [None] * dist.world_size
        torch.distributed.all_gather_object(parts, table.state_dict())
        table = BigramTable.from_state_dict(parts[0])
        for part in parts[1:]:
            table = table.merge(BigramTable.from_state_dict(part))
    return table


def _rows_kept(logits: torch.Tensor, keep: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The rows of ``logits`` (read at ``keep``) that are also in ``kept``, a subset of ``keep``."""
    return logits if kept is keep else logits[kept[keep]]


def _term(weight: float, fn, *args, **kwargs) -> torch.Tensor:
    """A loss term; one with weight 0 is still computed for the log, but outside the autograd graph."""
    with contextlib.nullcontext() if weight > 0 else torch.no_grad():
        return fn(*args, **kwargs)


class DistillObjective:
    """``λ_sft·L_sft + λ_kd·L_kd + λ_iva·L_iva + λ_tpa·L_tpa`` with a frozen teacher engine.

    Per micro-batch the teacher runs first (under ``no_grad``), capturing its IVA layer's instruction→vision
    attention when the IVA weights need it; then the student. Both models project to the vocabulary only the
    rows a loss reads (``logits_to_keep``: response positions, plus vision positions for IVA's weighted KL;
    under ``iva.row_budget`` the student only the vision rows chosen from the teacher's weights, ``IVARows``).
    With TPA both ground-truth passes also record their keys/values, d candidates per scored response row
    are drawn, and one short candidate pass per model scores them against that record.

    Construction does the start-up work that needs both engines: the IVA layer (``iva.layer: auto`` runs the
    IRS calibration; a resumed run keeps the layer in ``run_dir/irs.json``), the student layer of the
    attention mode, TPA's checks and its ``gt_bigram`` table.
    """

    LOSS_TERMS = ("loss", "sft", "kd", "iva", "tpa")

    def __init__(self, cfg: RecipeConfig, teacher, student, processor, shared, dist: engine.DistInfo,
                 accumulation: int, resumed: bool, log: Callable[[str], None]):
        self.cfg, self.teacher, self.student, self.processor = cfg, teacher, student, processor
        self.shared, self.dist, self.accumulation, self.log = shared, dist, accumulation, log
        self.iva_on = cfg.loss.iva > 0
        self.tpa_on = cfg.loss.tpa > 0
        self.needs_teacher_attention = self.iva_on and cfg.iva.uses_teacher_attention
        self.empty = {"response": 0, "iva": 0}  # micro-batches of this rank with nothing to score, per term
        self.iva_layer = self.student_layer = None
        if self.needs_teacher_attention:
            self.iva_layer = self._resolve_iva_layer(resumed)
            if cfg.iva.mode == "attention":
                self.student_layer = self._resolve_student_layer()
            log(f"IVA: teacher layer {self.iva_layer}, mode {cfg.iva.mode}"
                + (f", student layer {self.student_layer}" if self.student_layer is not None else ""))
        elif self.iva_on:
            log("IVA: uniform weights over vision tokens (no teacher attention needed)")
        self.bigrams = None
        self.student_joint = False
        if self.tpa_on:
            self._check_tpa()

    # ------------------------------------------------------------------ start-up

    def _resolve_iva_layer(self, resumed: bool) -> int:
        cfg = self.cfg
        teacher_layers = len(capture.decoder_layers(self.teacher.module))
        if isinstance(cfg.iva.layer, int):
            if cfg.iva.layer >= teacher_layers:
                raise ConfigError(f"iva.layer: {cfg.iva.layer} is out of range; the teacher has {teacher_layers} "
                                  "decoder layers")
            return cfg.iva.layer
        saved = Path(cfg.run_dir) / "irs.json"
        layer = saved_layer(saved, cfg.teacher.path, cfg.iva.queries) if resumed else None
        if layer is not None:  # a resumed run keeps the layer it chose for this teacher (else: calibrated again)
            self.log(f"IVA layer {layer} from {saved} (resumed run)")
            return layer
        report = calibrate_iva_layer(self.teacher, self.processor, cfg, self.dist)
        self.log(f"IRS on {report['samples']} calibration samples ({report['pairing']} pairs): "
                 + ", ".join(f"L{i} {v:.3f}" for i, v in enumerate(report["irs"]))
                 + f" -> iva.layer {report['chosen_layer']}")
        return report["chosen_layer"]

    def _resolve_student_layer(self) -> int:
        student_layers = len(capture.decoder_layers(self.student.module))
        layer = self.cfg.iva.student_layer
        if layer is None:
            teacher_layers = len(capture.decoder_layers(self.teacher.module))
            layer = relative_depth_layer(self.iva_layer, teacher_layers, student_layers)
        if layer >= student_layers:
            raise ConfigError(f"iva.student_layer: {layer} is out of range; the student has {student_layers} "
                              "decoder layers")
        return layer

    def _check_tpa(self) -> None:
        tpa = self.cfg.tpa
        for key, model in (("teacher", self.teacher.module), ("model", self.student.module)):
            backend = model.config.get_text_config()._attn_implementation
            if backend not in capture.WRAPPED_BACKENDS:  # the candidate pass needs the wrapped kernels
                raise ConfigError(f"{key}.attn_implementation.text: {backend!r} cannot run TPA's candidate "
                                  f"pass; use one of {list(capture.WRAPPED_BACKENDS)}")
        if tpa.source == "gt_bigram":
            self.bigrams = count_response_bigrams(self.processor, self.cfg, self.dist)
            self.log(f"TPA gt_bigram source: {self.bigrams.total} response-token pairs, {len(self.bigrams)} "
                     "distinct, from the training data")
        if tpa.candidates + 2 > self.shared.token_ids:  # the ground truth and the image token are never drawn
            raise ConfigError(f"tpa.candidates: {tpa.candidates} is too many for a shared vocabulary of "
                              f"{self.shared.token_ids} tokens")
        self.student_joint = tpa.student_joint(self.student.ds_config, part_sizes(self.student.module))
        if self.iva_on and self.cfg.iva.row_budget is not None and tpa.source == "student" \
                and not self.student_joint:
            raise ConfigError("iva.row_budget: the rows are chosen from the teacher's weights before the student "
                              "projects them, but with tpa.source: student and separate student passes the "
                              "student's ground-truth pass runs first (it draws the candidates); set "
                              "tpa.student_passes: joint, or iva.row_budget: null")
        teacher = "ground-truth + candidate pass" if tpa.source == "teacher" else "one joint pass"
        student = "sampling pass + joint pass" if self.student_joint else "ground-truth + candidate pass"
        self.log(f"TPA: {tpa.candidates} candidates per response position from the {tpa.source}, "
                 f"exclude_gt {tpa.exclude_gt}, {tpa.weighting} weights, max_positions {tpa.max_positions}; "
                 f"teacher: {teacher}, student: {student} (tpa.student_passes {tpa.student_passes})")

    # ------------------------------------------------------------------ the step

    def iva_samples(self, mb: dict) -> torch.Tensor:
        """``[B]`` bool: the samples IVA scores: with an image, and instruction tokens when teacher attention
        is used."""
        rows = mb["vision_mask"].any(-1)
        if self.cfg.iva.uses_teacher_attention:
            rows &= self._queries(mb).any(-1)
        return rows

    def _queries(self, mb: dict) -> torch.Tensor:
        """``[B, L]``: the query rows of the focus α (``iva.queries``)."""
        return focus_queries(mb["instruction_mask"], mb["labels"], self.cfg.iva.queries)

    def plan(self, micro: list[dict], step: int) -> StepPlan:
        resp = response_tokens(micro)
        iva = sum(float(self.iva_samples(mb).sum()) for mb in micro) if self.iva_on else 0.0
        budget = self.iva_on and self.cfg.iva.row_budget is not None
        tpa, draws = 0.0, []
        for i, mb in enumerate(micro):
            positions_seed, candidates_seed, iva_seed = draw_seeds(self.cfg.seed, step, i, self.dist.rank)
            tpa_draws = None
            if self.tpa_on:
                # Positions are drawn here (CPU, seeded by step) so that their global count is the normaliser.
                rows = select_rows(scored_rows(mb["labels"]), self.cfg.tpa.max_positions,
                                   torch.Generator().manual_seed(positions_seed))
                tpa_draws = TPADraws(rows, candidates_seed)
                tpa += float(rows.sum())
            draws.append(MicroDraws(tpa_draws, iva_seed if budget else None))
        resp, iva, tpa = engine.all_reduce_sum([resp, iva, tpa], self.dist.device)
        if resp == 0:
            self.log(f"step {step}: no response tokens in the whole global batch; sft, kd and tpa are 0 this step")
        if self.iva_on and iva == 0:
            need = "an image and instruction tokens" if self.cfg.iva.uses_teacher_attention else "an image"
            raise RuntimeError(f"step {step}: loss.iva is {self.cfg.loss.iva} but no sample in the whole global "
                               f"batch has {need}; IVA has nothing to align (set loss.iva: 0 for such data)")
        counts = {"response_tokens": resp, **({"iva_samples": iva} if self.iva_on else {}),
                  **({"tpa_positions": tpa} if self.tpa_on else {})}
        return StepPlan(counts, draws)

    def _capture(self, model, layer: int, masks: dict):
        return capture.AttentionCapture(model, [layer], masks["queries"], masks["vision_mask"], masks["attention_mask"])

    @contextlib.contextmanager
    def loss(self, mb: dict, draws: MicroDraws, counts: dict[str, float]) -> Iterator[MicroLoss]:
        cfg, dev, world = self.cfg, self.dist.device, self.dist.world_size
        inputs = to_device(mb, dev, self.student.module.dtype)
        masks = {k: mb[k].to(dev) for k in ("vision_mask", "attention_mask")}
        masks["queries"] = self._queries(mb).to(dev)
        targets_full = F.pad(mb["labels"].to(dev)[:, 1:], (0, 1), value=-100)  # logits at t predict label t+1
        # "Nothing to score" is decided on the CPU batch: no device-to-host sync in the step.
        if not (mb["labels"][:, 1:] != -100).any():
            self._empty("response")
        iva_rows = None
        if self.iva_on:
            iva_rows = self.iva_samples(mb)
            if not iva_rows.any():
                self._empty("iva")
            iva_rows = iva_rows.to(dev)
        rows = self._iva_rows(masks, iva_rows, draws.iva_seed)
        keep = targets_full != -100
        if rows.vision is not None:  # IVA's KL is read at the vision positions
            keep = keep | rows.vision

        student_capture = self._capture(self.student.module, self.student_layer, masks) \
            if self.student_layer is not None else contextlib.nullcontext()
        # joint: the student's no-grad sampling pass, outside the capture, which records the graded pass only
        sampled = self._sampling_pass(draws.tpa, inputs) if self.tpa_on else None
        with student_capture as s_cap:  # the caller's backward runs inside: a checkpoint recompute must see it
            if self.tpa_on:
                passes = self._tpa_passes(draws.tpa, inputs, keep, targets_full[keep], masks, sampled, rows)
            else:
                passes = self._plain_passes(inputs, keep, masks, rows)
            t_logits, s_logits = passes.t_logits, passes.s_logits
            targets = targets_full[passes.keep]
            resp = targets != -100
            kd = cfg.kd
            sums = {
                "sft": _term(cfg.loss.sft, rows_ce_sum, s_logits, targets, kd.chunk_size),
                "kd": _term(cfg.loss.kd, weighted_divergence_sum, t_logits, s_logits, resp.float(),
                            kind=kd.divergence, temperature=kd.temperature, jsd_beta=kd.jsd_beta,
                            skew_alpha=kd.skew_alpha, chunk_size=kd.chunk_size),
            }
            resp_scale = micro_loss_scale(counts["response_tokens"], world, self.accumulation)
            total = resp_scale * (cfg.loss.sft * sums["sft"] + cfg.loss.kd * sums["kd"])
            if self.iva_on:
                sums["iva"] = self._iva_sum(passes, iva_rows, rows, s_cap)
                iva_scale = micro_loss_scale(counts["iva_samples"], world, self.accumulation)
                total = total + iva_scale * cfg.loss.iva * sums["iva"]
            if self.tpa_on:
                sums["tpa"] = weighted_divergence_sum(passes.t_next, passes.s_next, passes.weights.flatten(),
                                                      kind="forward_kl", chunk_size=kd.chunk_size)
                tpa_scale = micro_loss_scale(counts["tpa_positions"], world, self.accumulation)
                total = total + tpa_scale * cfg.loss.tpa * sums["tpa"]
            sums["top1_agree"] = top1_agreement(t_logits[resp], s_logits[resp].detach())
            yield MicroLoss(total, {k: v.detach().float() for k, v in sums.items()})

    def _iva_rows(self, masks: dict, iva_rows: torch.Tensor | None, seed: int | None) -> IVARows:
        if not self.iva_on:
            return IVARows(None, None, None, None, None, None)
        vis_idx, vis_valid = capture.padded_positions(masks["vision_mask"])
        vision = masks["vision_mask"] & iva_rows[:, None] if self.cfg.iva.mode == "weighted_kl" else None
        return IVARows(self.cfg.iva, self.iva_layer, vision, vis_idx, vis_valid & iva_rows[:, None], seed)

    def _teacher_capture(self, masks: dict):
        if not self.needs_teacher_attention:
            return contextlib.nullcontext()
        return self._capture(self.teacher.module, self.iva_layer, masks)

    def _teacher_pass(self, call: Callable[[], torch.Tensor], masks: dict, keep: torch.Tensor, rows: IVARows,
                      joint: JointPass | None = None):
        """The teacher's forward ``call()`` with its IVA capture, and IVA's choice of rows from it.

        Returns (logits, capture, IVA weights per position, the ground-truth rows the student projects). Under a
        row budget the choice is made as the teacher's LM head runs, after its IVA layer, so the teacher too
        projects only the chosen rows: the logits are at the returned rows (plus ``joint``'s candidates).
        """
        chosen = []

        def select() -> torch.Tensor:
            chosen.append(rows.choose(t_cap, keep))
            s_keep = chosen[-1][1]
            return s_keep[keep] if joint is None else joint.kept_rows(s_keep)

        with self._teacher_capture(masks) as t_cap, \
                project_rows(self.teacher.module, select) if rows.budget else contextlib.nullcontext():
            logits = call()
        weights, s_keep = chosen[-1] if chosen else rows.choose(t_cap, keep)
        return logits, t_cap, weights, s_keep

    def _plain_passes(self, inputs, keep, masks, rows: IVARows) -> Passes:
        size = self.shared.size
        t_logits, t_cap, weights, s_keep = self._teacher_pass(
            lambda: self.teacher(**inputs, logits_to_keep=keep, use_cache=False).logits[:, :size], masks, keep, rows)
        s_logits = self.student(**inputs, logits_to_keep=s_keep, use_cache=False).logits[:, :size]
        return Passes(t_logits, s_logits, s_keep, t_cap, weights)

    def _sampling_pass(self, draws: TPADraws, inputs) -> torch.Tensor | None:
        """The student's logits at the TPA positions, without grad, when a joint student pass needs them first."""
        if not (self.student_joint and self.cfg.tpa.source == "student"):
            return None
        with torch.no_grad():
            rows = draws.rows.to(self.dist.device)
            return self.student(**inputs, logits_to_keep=rows, use_cache=False).logits[:, : self.shared.size]

    def _tpa_passes(self, draws: TPADraws, inputs, keep, targets, masks, sampled, rows: IVARows) -> Passes:
        """The forwards of a TPA step, the teacher's in one pass unless it draws the candidates itself.

        Candidates come from the source's ground-truth logits, so that model runs first: the student's
        ground-truth pass (``separate``) or its no-grad sampling pass (``joint``: ``sampled``), or the
        teacher's when it is the source (then it also runs a candidate pass). The others score ground truth
        and candidates in one :class:`JointPass`; ``separate`` gives the student a candidate pass over its
        recorded prefix. A student that does not draw runs after the teacher, on the rows IVA chose.
        """
        size, at = self.shared.size, draws.rows.to(self.dist.device)[keep]
        teacher_draws = self.cfg.tpa.source == "teacher"
        student_draws_first = self.cfg.tpa.source == "student" and not self.student_joint
        t_prefix = s_prefix = None
        scores = sampled
        if teacher_draws:
            t_prefix = PrefixCache(self.teacher.module)
            with self._teacher_capture(masks) as t_cap:
                t_logits = self.teacher(**inputs, logits_to_keep=keep, use_cache=False,
                                        prefix_cache=t_prefix).logits[:, :size]
            scores = t_logits[at]
        if student_draws_first:  # the student's rows cannot wait for the teacher's weights (checked at start-up)
            s_prefix = PrefixCache(self.student.module)
            s_logits = self.student(**inputs, logits_to_keep=keep, use_cache=False,
                                    prefix_cache=s_prefix).logits[:, :size]
            scores = s_logits[at].detach()
        candidates = self.candidates(draws, inputs, targets[at], scores)
        layout = CandidateBatch(draws.rows, candidates, inputs["attention_mask"], inputs["position_ids"])
        if teacher_draws:
            t_next = layout.in_candidate_order(self.teacher(**layout.model_inputs(t_prefix)).logits[:, :size])
            weights, s_keep = rows.choose(t_cap, keep)
            t_logits = _rows_kept(t_logits, keep, s_keep)
        else:
            joint = JointPass(self.teacher.module, layout, inputs, keep)
            logits, t_cap, weights, s_keep = self._teacher_pass(
                lambda: self.teacher(**joint.inputs).logits[:, :size], masks, keep, rows, joint)
            t_logits, t_next = joint.split(logits, s_keep)
        if self.student_joint:
            joint = JointPass(self.student.module, layout, inputs, s_keep)
            s_logits, s_next = joint.split(self.student(**joint.inputs).logits[:, :size])
        else:
            if not student_draws_first:
                s_prefix = PrefixCache(self.student.module)
                s_logits = self.student(**inputs, logits_to_keep=s_keep, use_cache=False,
                                        prefix_cache=s_prefix).logits[:, :size]
            s_next = layout.in_candidate_order(self.student(**layout.model_inputs(s_prefix)).logits[:, :size])
        s_at = draws.rows.to(self.dist.device)[s_keep]
        cand_weights = candidate_weights(s_logits[s_at].detach(), candidates, self.cfg.tpa.weighting)
        return Passes(t_logits, s_logits, s_keep, t_cap, weights, t_next, s_next, cand_weights)

    def _iva_sum(self, passes: Passes, iva_rows, rows: IVARows, s_cap) -> torch.Tensor:
        """Σ over this micro-batch's IVA samples of the per-sample IVA loss."""
        if self.cfg.iva.mode == "attention":
            t_cap = passes.t_cap
            vis_valid = rows.vis_valid
            inst_valid = t_cap.inst_valid.to(vis_valid.device)
            t_focus = instruction_to_vision_focus(t_cap[self.iva_layer], inst_valid, vis_valid)
            s_focus = instruction_to_vision_focus(s_cap[self.student_layer], inst_valid, vis_valid)
            return attention_kl_sum(t_focus, s_focus, iva_rows)
        return weighted_divergence_sum(passes.t_logits, passes.s_logits, passes.iva_weights[passes.keep],
                                       kind="forward_kl",
                                       chunk_size=self.cfg.kd.chunk_size)

    def candidates(self, draws: TPADraws, inputs: dict, gt_next: torch.Tensor,
                   scores: torch.Tensor | None) -> torch.Tensor:
        """Candidates ``[N, d]`` for the micro-batch's TPA positions ``draws.rows`` (N of them, row-major).

        ``gt_next [N]``: the ground-truth next tokens there; ``scores [N, V]``: the source model's logits there
        (None for ``gt_bigram``, whose scores are the table's).
        """
        tpa, dev = self.cfg.tpa, self.dist.device
        if scores is None:
            scores = self.bigrams.scores(inputs["input_ids"][draws.rows.to(dev)], device=dev)[:, : self.shared.size]
        generator = torch.Generator(device=dev).manual_seed(draws.seed)
        # Only ids of both tokenizers: the embedding rows past them are padding, never text. The image
        # placeholder is input-only: never a label (so p_S there is untrained) and, inside a sequence, a slot
        # for image features rather than a token.
        scores = scores[:, : self.shared.token_ids]
        return draw_candidates(scores, gt_next, tpa.candidates, exclude_gt=tpa.exclude_gt, generator=generator,
                               chunk_size=self.cfg.kd.chunk_size, never=(self.processor.image_token_id,))

    def _empty(self, term: str) -> None:
        self.empty[term] += 1
        if self.empty[term] <= 3:
            print(f"[rank {self.dist.rank}] a micro-batch with nothing to score for {term}: its term is 0 "
                  "(the global normaliser is unchanged)", flush=True)

    def summarise(self, totals: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        tokens = max(counts["response_tokens"], 1.0)
        out = {"sft": totals["sft"] / tokens, "kd": totals["kd"] / tokens,
               "top1_agreement": totals["top1_agree"] / tokens}
        loss = self.cfg.loss.sft * out["sft"] + self.cfg.loss.kd * out["kd"]
        if self.iva_on:
            out["iva"] = totals["iva"] / max(counts["iva_samples"], 1.0)
            loss += self.cfg.loss.iva * out["iva"]
        if self.tpa_on:
            out["tpa"] = totals["tpa"] / max(counts["tpa_positions"], 1.0)
            loss += self.cfg.loss.tpa * out["tpa"]
        return {"loss": loss, **out}

    def finish(self) -> None:
        """Report, over all ranks, the micro-batches that had nothing to score (every rank calls)."""
        empty = engine.all_reduce_sum([self.empty["response"], self.empty["iva"]], self.dist.device)
        self.log(f"micro-batches with nothing to score (all ranks): response {int(empty[0])}, iva {int(empty[1])}")
