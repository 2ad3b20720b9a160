"""Align-TI's two mechanisms measured on held-out data, on plain HF models (one process, no DeepSpeed).

* **IVA's capture** (:func:`teacher_focus`): the teacher's IRS per layer on the held-out questions, and at the IVA
  layer the share of the IVA weights (the teacher's focus from the ``iva.queries`` rows to the image, as
  ``iva_weights`` builds them in training) on the vision tokens of the question's relevant cells, against those
  cells' share of the vision tokens (what uniform weights give them). On a task whose relevant region is known, a
  capture that works puts well above the token share there, if the teacher looks there from those rows.
* **TPA's target** (:func:`divergences`): the transition KL, KL(p_T ‖ p_S) of the next token after an off-path
  token drawn from the student at each response position (``d`` candidates without replacement, the ground
  truth excluded: what TPA minimises), through the same candidate pass as training (the ground-truth pass
  records keys/values in a ``PrefixCache``, the candidates attend to them); and the next-token KL on the
  ground-truth path (what vanilla KD minimises). Both per response position, forward KL at temperature 1.

Each is given overall and per category, so a breakdown by answer length or region follows from the task's
categories. Records need ``cells`` (relevant cell indices, row-major) as GridRead writes them.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from aligntI.config import DataConfig, DataSource
from aligntI.data.dataset import model_inputs
from aligntI.data.loader import build_sequential_loader
from aligntI.hooks.attention import AttentionCapture, decoder_layers, install
from aligntI.hooks.transitions import CandidateBatch, PrefixCache
from aligntI.irs import irs_scores, pair_mask
from aligntI.losses.iva import focus_queries, instruction_to_vision_focus, iva_weights
from aligntI.losses.tpa import draw_candidates
from aligntI.tasks.gridread import cell_token_mask


def held_out_loader(processor, data: str, samples: int, batch_size: int, chat_template: str | None = None):
    """The first ``samples`` records of ``data`` in order, batched as training batches them (exact masks)."""
    cfg = DataConfig(train=[DataSource(data, max_samples=samples)], chat_template=chat_template,
                     max_length=10**9, num_workers=0)
    return build_sequential_loader(processor, cfg, batch_size=batch_size)


@torch.no_grad()
def teacher_focus(teacher, loader, records: dict[str, dict], grid: int, iva_layer: int,
                  correct: set[str] | None = None, queries: str = "instruction") -> dict:
    """IRS per layer (``any`` pairs) and, at ``iva_layer``, the IVA weight on the relevant cells' tokens
    against their token share: overall, per category, per region size (``cells:``) and, with ``correct``
    (ids the teacher answers right), on those only (``right:`` keys). ``queries``: the focus's query rows, as
    ``iva.queries`` names them."""
    install()
    layers = len(decoder_layers(teacher))
    focus, ids = [], []
    for batch in tqdm(loader, desc="teacher focus", leave=False, dynamic_ncols=True):
        masks = [focus_queries(batch["instruction_mask"], batch["labels"], queries), batch["vision_mask"],
                 batch["attention_mask"]]
        with AttentionCapture(teacher, list(range(layers)), *masks) as cap:
            teacher(**model_inputs(batch), logits_to_keep=1, use_cache=False)
        focus.append(torch.stack([instruction_to_vision_focus(cap[i], cap.inst_valid, cap.vis_valid)
                                  for i in range(layers)]))
        ids += batch["sample_ids"]
    focus = torch.cat(focus, dim=1)  # [layers, N, V]
    irs = irs_scores(focus, pair_mask(ids, "any")).tolist()
    n_vis = focus.shape[-1]
    patch_grid = math.isqrt(n_vis)
    relevant = torch.stack([torch.from_numpy(cell_token_mask(records[i]["cells"], grid, patch_grid)) for i in ids])
    weights = iva_weights(focus[iva_layer], torch.ones_like(relevant), "teacher_attention")
    share = (weights * relevant).sum(-1)
    token_share = relevant.float().mean(-1)
    groups = defaultdict(list)
    for n, i in enumerate(ids):
        keys = ["all", records[i]["category"], f"cells:{len(records[i]['cells'])}"]
        if correct is not None and i in correct:
            keys += [f"right:{k}" for k in keys]
        for key in keys:
            groups[key].append(n)
    by = {k: {"weight_share": float(share[v].mean()), "token_share": float(token_share[v].mean()), "n": len(v)}
          for k, v in sorted(groups.items())}
    return {"irs": irs, "iva_layer": iva_layer, "queries": queries, "vision_tokens": n_vis, "relevant": by}


def _row_kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax t ‖ softmax s) per row, fp32."""
    t = F.log_softmax(t_logits.float(), -1)
    return (t.exp() * (t - F.log_softmax(s_logits.float(), -1))).sum(-1)


@torch.no_grad()
def divergences(teacher, student, loader, records: dict[str, dict], *, candidates: int = 4, never: tuple = (),
                seed: int = 0) -> dict:
    """Next-token KL on the ground-truth path and transition KL after ``candidates`` student-drawn off-path
    tokens, mean per response position (the transition KL: over the candidates too), overall and per category.
    ``never``: ids never drawn (the image placeholder)."""
    install()
    size = min(teacher.config.get_text_config().vocab_size, student.config.get_text_config().vocab_size)
    sums = defaultdict(lambda: [0.0, 0.0, 0])  # key -> [gt KL sum, transition KL sum, positions]
    generator = torch.Generator().manual_seed(seed)
    for batch in tqdm(loader, desc="transition KL", leave=False, dynamic_ncols=True):
        inputs = model_inputs(batch)
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # logits at t predict label t+1
        keep = targets != -100
        t_prefix, s_prefix = PrefixCache(teacher), PrefixCache(student)
        t_gt = teacher(**inputs, logits_to_keep=keep, use_cache=False, prefix_cache=t_prefix).logits[:, :size]
        s_gt = student(**inputs, logits_to_keep=keep, use_cache=False, prefix_cache=s_prefix).logits[:, :size]
        drawn = draw_candidates(s_gt, targets[keep], candidates, exclude_gt=True, generator=generator, never=never)
        layout = CandidateBatch(keep, drawn, inputs["attention_mask"], inputs["position_ids"])
        t_next = layout.in_candidate_order(teacher(**layout.model_inputs(t_prefix)).logits[:, :size])
        s_next = layout.in_candidate_order(student(**layout.model_inputs(s_prefix)).logits[:, :size])
        gt = _row_kl(t_gt, s_gt)
        transition = _row_kl(t_next, s_next).view(-1, candidates).mean(-1)
        sample = keep.nonzero()[:, 0]  # the batch row of each kept position, row-major like the logits
        for row, sid in enumerate(batch["sample_ids"]):
            at = sample == row
            for key in ("all", records[sid]["category"]):
                acc = sums[key]
                acc[0] += float(gt[at].sum())
                acc[1] += float(transition[at].sum())
                acc[2] += int(at.sum())
    return {k: {"gt_kl": g / n, "transition_kl": t / n, "positions": n} for k, (g, t, n) in sorted(sums.items())}
