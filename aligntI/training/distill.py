"""Align-TI distillation: ``λ_sft·L_sft + λ_kd·L_kd + λ_iva·L_iva + λ_tpa·L_tpa`` on top of the SFT loop.

Per micro-batch: the frozen teacher engine runs (every rank, every step; under ``no_grad``), capturing its
IVA layer's instruction→vision attention when the IVA weights need it; then the student runs and both
models' logits are computed only at the rows the losses score (response positions, plus vision positions
for IVA) through ``logits_to_keep``. With TPA both ground-truth passes also record their keys/values; d
candidates per scored response row are drawn, and one short candidate pass per model scores them against
that record (hooks/transitions.py): ``L + d·|R|`` tokens per model instead of the paper's extra student pass
plus two expanded passes. Normalisers (response tokens, IVA samples, TPA positions) are global-batch counts,
so every term is a mean over the whole global batch whatever the micro-batching and world size.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from aligntI import engine as ds
from aligntI.config import ConfigError, RecipeConfig
from aligntI.data.dataset import model_inputs
from aligntI.data.loader import build_sequential_loader
from aligntI.hooks import attention as capture
from aligntI.hooks.transitions import CandidateBatch, PrefixCache
from aligntI.irs import calibrate_iva_layer
from aligntI.losses.iva import attention_kl_sum, instruction_to_vision_focus, iva_weights
from aligntI.losses.kd import top1_agreement, weighted_divergence_sum
from aligntI.losses.sft import rows_ce_sum
from aligntI.losses.tpa import BigramTable, candidate_weights, draw_candidates, select_rows
from aligntI.models.compat import check_compatible
from aligntI.models.loading import load_model, load_processor
from aligntI.training.accounting import micro_loss_scale
from aligntI.training.sft import SFTRecipe


def relative_depth_layer(teacher_layer: int, teacher_layers: int, student_layers: int) -> int:
    """The student layer at the same relative depth (layer centres) as ``teacher_layer``."""
    return min(student_layers - 1, int((teacher_layer + 0.5) / teacher_layers * student_layers))


def scored_rows(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the positions whose logits predict a response token (the shifted label mask)."""
    rows = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


def tpa_seeds(seed: int, step: int, micro_index: int, rank: int) -> tuple[int, int]:
    """Seeds of TPA's two random streams, (scored positions, candidates), fixed by (recipe seed, step,
    micro-batch, rank): a resumed run draws the same. Two independent seeds, not one: on the CPU both
    generators would otherwise replay the same numbers."""
    positions, candidates = np.random.SeedSequence([seed, step, micro_index, rank]).spawn(2)
    return tuple(int(s.generate_state(1, np.uint64)[0] >> 1) for s in (positions, candidates))


def count_response_bigrams(processor, cfg: RecipeConfig, dist) -> BigramTable:
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


class DistillRecipe(SFTRecipe):
    LOSS_TERMS = ("loss", "sft", "kd", "iva", "tpa")

    def __init__(self, cfg: RecipeConfig, overrides: list[str] | None = None):
        super().__init__(cfg, overrides)
        self.iva_on = cfg.loss.iva > 0
        self.tpa_on = cfg.loss.tpa > 0
        self.needs_teacher_attention = self.iva_on and cfg.iva.uses_teacher_attention
        self.empty = {"response": 0, "iva": 0}  # micro-batches of this rank with nothing to score, per term

    def setup(self) -> None:
        cfg = self.cfg
        capture.install()  # before any model is loaded: the backends are looked up at load time
        # Start-up checks read configs and processors only: a mismatched pair fails before any weight loads.
        self.shared = check_compatible(
            load_processor(cfg.teacher.path), load_processor(cfg.model.path),
            AutoConfig.from_pretrained(cfg.teacher.path), AutoConfig.from_pretrained(cfg.model.path),
            cfg.teacher.path, cfg.model.path, cfg.data.chat_template,
        )
        super().setup()
        self.log(f"teacher/student vocabulary: {self.shared.note}")
        teacher_cfg = ds.teacher_ds_config(self.ds_config, cfg.teacher.offload_params)
        dtype = torch.bfloat16 if teacher_cfg["bf16"]["enabled"] else torch.float32
        with ds.sharded_loading(teacher_cfg):
            model = load_model(cfg.teacher.path, cfg.teacher.attn_implementation, dtype)
        self.teacher = ds.TeacherEngine(model, teacher_cfg)
        self.log(f"teacher {cfg.teacher.path}: ZeRO stage {teacher_cfg['zero_optimization']['stage']}, "
                 f"offload_params {cfg.teacher.offload_params}, no optimizer, eval mode")
        self.iva_layer = self.student_layer = None
        if self.needs_teacher_attention:
            self.iva_layer = self._resolve_iva_layer()
            if cfg.iva.mode == "attention":
                student_layers = len(capture.decoder_layers(self.student.module))
                self.student_layer = cfg.iva.student_layer
                if self.student_layer is None:
                    teacher_layers = len(capture.decoder_layers(self.teacher.module))
                    self.student_layer = relative_depth_layer(self.iva_layer, teacher_layers, student_layers)
                if self.student_layer >= student_layers:
                    raise ConfigError(f"iva.student_layer: {self.student_layer} is out of range; the student has "
                                      f"{student_layers} decoder layers")
            self.log(f"IVA: teacher layer {self.iva_layer}, mode {cfg.iva.mode}"
                     + (f", student layer {self.student_layer}" if self.student_layer is not None else ""))
        elif self.iva_on:
            self.log("IVA: uniform weights over vision tokens (no teacher attention needed)")
        self.bigrams = None
        if self.tpa_on:
            tpa = cfg.tpa
            for key, model in (("teacher", self.teacher.module), ("model", self.student.module)):
                backend = model.config.get_text_config()._attn_implementation
                if backend not in capture.WRAPPED_BACKENDS:  # the candidate pass needs the wrapped kernels
                    raise ConfigError(f"{key}.attn_implementation.text: {backend!r} cannot run TPA's candidate "
                                      f"pass; use one of {list(capture.WRAPPED_BACKENDS)}")
            if tpa.source == "gt_bigram":
                self.bigrams = count_response_bigrams(self.processor, cfg, self.dist)
                self.log(f"TPA gt_bigram source: {self.bigrams.total} response-token pairs, {len(self.bigrams)} "
                         "distinct, from the training data")
            if tpa.candidates + 2 > self.shared.token_ids:  # the ground truth and the image token are never drawn
                raise ConfigError(f"tpa.candidates: {tpa.candidates} is too many for a shared vocabulary of "
                                  f"{self.shared.token_ids} tokens")
            self.log(f"TPA: {tpa.candidates} candidates per response position from the {tpa.source}, "
                     f"exclude_gt {tpa.exclude_gt}, {tpa.weighting} weights, max_positions {tpa.max_positions}")

    def _resolve_iva_layer(self) -> int:
        cfg = self.cfg
        teacher_layers = len(capture.decoder_layers(self.teacher.module))
        if isinstance(cfg.iva.layer, int):
            if cfg.iva.layer >= teacher_layers:
                raise ConfigError(f"iva.layer: {cfg.iva.layer} is out of range; the teacher has {teacher_layers} "
                                  "decoder layers")
            return cfg.iva.layer
        saved = self.run_dir / "irs.json"
        if self.start_step > 0 and saved.is_file():  # a resumed run keeps the layer it started with
            layer = json.loads(saved.read_text())["chosen_layer"]
            self.log(f"IVA layer {layer} from {saved} (resumed run)")
            return layer
        report = calibrate_iva_layer(self.teacher, self.processor, cfg, self.dist)
        self.log(f"IRS on {report['samples']} calibration samples ({report['pairing']} pairs): "
                 + ", ".join(f"L{i} {v:.3f}" for i, v in enumerate(report["irs"]))
                 + f" -> iva.layer {report['chosen_layer']}")
        return report["chosen_layer"]

    # ------------------------------------------------------------------ the step

    def global_counts(self, micro: list[dict], step: int) -> dict[str, float]:
        resp = sum(float((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        iva = sum(float(self._iva_rows(mb).sum()) for mb in micro) if self.iva_on else 0.0
        tpa = 0.0
        if self.tpa_on:  # positions drawn here (CPU, seeded by step) so their global count is the normaliser
            for i, mb in enumerate(micro):
                positions_seed, mb["tpa_seed"] = tpa_seeds(self.cfg.seed, step, i, self.dist.rank)
                generator = torch.Generator().manual_seed(positions_seed)
                mb["tpa_rows"] = select_rows(scored_rows(mb["labels"]), self.cfg.tpa.max_positions, generator)
                tpa += float(mb["tpa_rows"].sum())
        resp, iva, tpa = ds.all_reduce_sum([resp, iva, tpa], self.dist.device)
        if resp == 0:
            self.log(f"step {step}: no response tokens in the whole global batch; sft, kd and tpa are 0 this step")
        if self.iva_on and iva == 0:
            need = "an image and instruction tokens" if self.cfg.iva.uses_teacher_attention else "an image"
            raise RuntimeError(f"step {step}: loss.iva is {self.cfg.loss.iva} but no sample in the whole global "
                               f"batch has {need}; IVA has nothing to align (set loss.iva: 0 for such data)")
        return {"response_tokens": resp, **({"iva_samples": iva} if self.iva_on else {}),
                **({"tpa_positions": tpa} if self.tpa_on else {})}

    def _iva_rows(self, mb: dict) -> torch.Tensor:
        """Samples the IVA term scores: with an image, and instruction tokens when teacher attention is used."""
        rows = mb["vision_mask"].any(-1)
        if self.cfg.iva.uses_teacher_attention:
            rows &= mb["instruction_mask"].any(-1)
        return rows

    def micro_step(self, mb: dict, counts: dict[str, float]) -> dict[str, torch.Tensor]:
        cfg, dev = self.cfg, self.dist.device
        accum, world = self.batching.gradient_accumulation_steps, self.dist.world_size
        inputs = self._to_device(model_inputs(mb))
        masks = {k: mb[k].to(dev) for k in ("vision_mask", "instruction_mask", "attention_mask")}
        labels = mb["labels"].to(dev)
        targets_full = F.pad(labels[:, 1:], (0, 1), value=-100)  # logits at t predict label t+1
        # "Nothing to score" is decided on the CPU batch: no device-to-host sync in the step.
        if not (mb["labels"][:, 1:] != -100).any():
            self._empty("response")
        iva_rows = None
        if self.iva_on:
            iva_rows = self._iva_rows(mb)
            if not iva_rows.any():
                self._empty("iva")
            iva_rows = iva_rows.to(dev)
        keep = targets_full != -100
        if self.iva_on and cfg.iva.mode == "weighted_kl":  # IVA's KL is read at the vision positions
            keep |= masks["vision_mask"] & iva_rows[:, None]

        # TPA: the ground-truth passes record their keys/values for the candidate passes.
        t_prefix = PrefixCache(self.teacher.module) if self.tpa_on else None
        s_prefix = PrefixCache(self.student.module) if self.tpa_on else None
        teacher_capture = self._capture(self.teacher.module, self.iva_layer, masks) \
            if self.needs_teacher_attention else contextlib.nullcontext()
        with teacher_capture as t_cap:
            t_logits = self.teacher(**inputs, logits_to_keep=keep, use_cache=False, prefix_cache=t_prefix).logits
        t_logits = t_logits[:, : self.shared.size]

        student_capture = self._capture(self.student.module, self.student_layer, masks) \
            if self.student_layer is not None else contextlib.nullcontext()
        with student_capture as s_cap:  # backward inside: an activation-checkpoint recompute must see it
            s_logits = self.student(**inputs, logits_to_keep=keep, use_cache=False,
                                    prefix_cache=s_prefix).logits[:, : self.shared.size]
            targets = targets_full[keep]
            resp = targets != -100
            kd = cfg.kd
            sums = {
                "sft": self._term(cfg.loss.sft, rows_ce_sum, s_logits, targets, kd.chunk_size),
                "kd": self._term(cfg.loss.kd, weighted_divergence_sum, t_logits, s_logits, resp.float(),
                                 kind=kd.divergence, temperature=kd.temperature, jsd_beta=kd.jsd_beta,
                                 skew_alpha=kd.skew_alpha, chunk_size=kd.chunk_size),
            }
            resp_scale = micro_loss_scale(counts["response_tokens"], world, accum)
            total = resp_scale * (cfg.loss.sft * sums["sft"] + cfg.loss.kd * sums["kd"])
            if self.iva_on:
                sums["iva"] = self._iva_sum(t_logits, s_logits, keep, masks, iva_rows, t_cap, s_cap)
                total = total + micro_loss_scale(counts["iva_samples"], world, accum) * cfg.loss.iva * sums["iva"]
            if self.tpa_on:
                sums["tpa"] = self._tpa_sum(mb, inputs, keep, targets, t_logits, s_logits, t_prefix, s_prefix)
                total = total + micro_loss_scale(counts["tpa_positions"], world, accum) * cfg.loss.tpa * sums["tpa"]
            self.student.backward(total)
        self.student.step()
        sums["top1_agree"] = top1_agreement(t_logits[resp], s_logits[resp].detach())
        return {k: v.detach().float() for k, v in sums.items()}

    @staticmethod
    def _term(weight: float, fn, *args, **kwargs) -> torch.Tensor:
        """A loss term; one with weight 0 is still computed for the log, but outside the autograd graph."""
        with contextlib.nullcontext() if weight > 0 else torch.no_grad():
            return fn(*args, **kwargs)

    def _capture(self, model, layer: int, masks: dict):
        return capture.AttentionCapture(model, [layer], masks["instruction_mask"], masks["vision_mask"],
                                        masks["attention_mask"])

    def _iva_sum(self, t_logits, s_logits, keep, masks, iva_rows, t_cap, s_cap) -> torch.Tensor:
        """Σ over this micro-batch's IVA samples of the per-sample IVA loss."""
        cfg = self.cfg.iva
        vis_idx, vis_valid = capture.padded_positions(masks["vision_mask"])
        vis_valid = vis_valid & iva_rows[:, None]
        if cfg.mode == "attention":
            inst_valid = t_cap.inst_valid.to(vis_valid.device)
            t_focus = instruction_to_vision_focus(t_cap[self.iva_layer], inst_valid, vis_valid)
            s_focus = instruction_to_vision_focus(s_cap[self.student_layer], inst_valid, vis_valid)
            return attention_kl_sum(t_focus, s_focus, iva_rows)
        focus = None
        if cfg.weights == "teacher_attention":
            focus = instruction_to_vision_focus(t_cap[self.iva_layer], t_cap.inst_valid.to(vis_valid.device),
                                                vis_valid)
        weights = iva_weights(focus, vis_valid, cfg.weights, cfg.top_ratio)  # [B, V], rows sum to 1
        per_position = torch.zeros(keep.shape, dtype=weights.dtype, device=weights.device)
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(vis_idx)
        per_position[rows[vis_valid], vis_idx[vis_valid]] = weights[vis_valid]
        return weighted_divergence_sum(t_logits, s_logits, per_position[keep], kind="forward_kl",
                                       chunk_size=self.cfg.kd.chunk_size)

    def candidates(self, mb, inputs, keep, targets, t_logits, s_logits):
        """Candidates ``[N, d]`` and weights ``[N, d]`` for the micro-batch's TPA positions ``mb["tpa_rows"]``.

        ``t_logits``/``s_logits``/``targets`` are the ground-truth passes' rows at ``keep`` (row-major order).
        """
        tpa, dev = self.cfg.tpa, self.dist.device
        rows = mb["tpa_rows"].to(dev)
        at = rows[keep]  # the TPA positions among the kept logit rows (same row-major order)
        s_rows = s_logits[at].detach()
        if tpa.source == "student":
            scores = s_rows
        elif tpa.source == "teacher":
            scores = t_logits[at]
        else:
            scores = self.bigrams.scores(inputs["input_ids"][rows], device=dev)[:, : self.shared.size]
        generator = torch.Generator(device=dev).manual_seed(mb["tpa_seed"])
        # Only ids of both tokenizers: the embedding rows past them are padding, never text. The image
        # placeholder is input-only: never a label (so p_S there is untrained) and, inside a sequence, a slot
        # for image features rather than a token.
        scores = scores[:, : self.shared.token_ids]
        candidates = draw_candidates(scores, targets[at], tpa.candidates, exclude_gt=tpa.exclude_gt,
                                     generator=generator, chunk_size=self.cfg.kd.chunk_size,
                                     never=(self.processor.image_token_id,))
        return candidates, candidate_weights(s_rows, candidates, tpa.weighting)

    def _tpa_sum(self, mb, inputs, keep, targets, t_logits, s_logits, t_prefix, s_prefix) -> torch.Tensor:
        """Σ over this micro-batch's TPA positions of Σ_v w_v·KL(p_T(·|c_t, v) ‖ p_S(·|c_t, v))."""
        candidates, weights = self.candidates(mb, inputs, keep, targets, t_logits, s_logits)
        layout = CandidateBatch(mb["tpa_rows"], candidates, inputs["attention_mask"], inputs["position_ids"])
        size = self.shared.size
        t_next = layout.in_candidate_order(self.teacher(**layout.model_inputs(t_prefix)).logits[:, :size])
        s_next = layout.in_candidate_order(self.student(**layout.model_inputs(s_prefix)).logits[:, :size])
        return weighted_divergence_sum(t_next, s_next, weights.flatten(), kind="forward_kl",
                                       chunk_size=self.cfg.kd.chunk_size)

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

    def finish(self) -> dict | None:
        empty = ds.all_reduce_sum([self.empty["response"], self.empty["iva"]], self.dist.device)
        self.log(f"micro-batches with nothing to score (all ranks): response {int(empty[0])}, iva {int(empty[1])}")
        return super().finish()

