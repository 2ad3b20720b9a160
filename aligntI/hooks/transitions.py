"""TPA's candidate pass: candidate tokens scored against the ground-truth pass's own keys and values.

The paper runs one expanded sequence per model with a dense "ribbon" mask, after an extra student pass to
sample the candidates. Here the ground-truth pass (the one that already gives the SFT/KD logits) records every
decoder layer's keys and values into a :class:`PrefixCache`; after sampling, a second forward over just the
candidates (``d·|R|`` tokens per sample, no image) attends to that record: candidate ``v`` standing at position
``t`` sees the real keys before ``t`` and itself, nothing else. That is exactly the expanded pass's candidate
row, at a cost of ``d·|R|`` extra tokens, and the ground-truth logits are the plain pass's by construction.

Both objects travel as keyword arguments of the model forward (transformers hands unknown keywords down to
the attention function), so an activation-checkpoint recompute sees the same ones and nothing is stored on the
model. transformers also hands them to the vision tower's attention; a record knows its model's text decoder
modules and every other module ignores it. Records are references to tensors autograd keeps anyway (no copy);
gradients flow into the prefix through them. Flash-attention cannot take the candidate mask, so the candidate
pass of a flash model runs SDPA (or the model's eager kernel when it softcaps attention logits, which SDPA
cannot).

Why it equals the paper's expanded pass, and what it costs: docs/engineering.md, section 3.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from aligntI.hooks.modules import text_attention_layers


class PrefixCache:
    """Keys and values ``[B, H_kv, L, D]`` of each text decoder layer of ``model``, recorded during one forward.

    Only ``model``'s own text decoder records (and, in the candidate pass, reads): every other attention module
    the keyword reaches, e.g. a CLIP or SigLIP vision tower's, runs as if it were not there.
    """

    def __init__(self, model):
        self._layer_of = text_attention_layers(model)
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer_of(self, module) -> int | None:
        """The decoder layer index of ``module``, or None if it is not an attention module of this model's text
        decoder."""
        return self._layer_of.get(id(module))

    def record(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        # An activation-checkpoint recompute replays the layer: keep the tensors of the forward itself.
        self.layers.setdefault(layer, (key, value))


class CandidateBatch:
    """Candidates laid out ``[B·d, R]``: row ``b·d + j`` holds candidate j of every scored position of sample b.

    ``rows [B, L]`` marks the scored positions t (logits at t predict token t+1); ``candidates [N, d]`` holds
    d tokens for each True row in row-major order. Each candidate stands at index t+1 of the ground-truth
    sequence with that token's position id. One candidate index per batch row keeps the candidate×candidate
    block of the attention (computed, then masked: only the diagonal is allowed) at R² per row instead of
    (d·R)² per sample; the price is the prefix keys/values repeated d times, which GQA keeps small.
    ``in_candidate_order`` maps logits read with ``logits_to_keep=self.valid`` to ``candidates.flatten()``
    order. A batch with no row gets one masked dummy slot per row, so every rank runs the same modules.
    """

    def __init__(self, rows: torch.Tensor, candidates: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor):
        device = candidates.device
        batch, d = rows.shape[0], candidates.shape[1]
        # Indices come from ``rows`` where it lives (the CPU batch in training: no device-to-host syncs).
        per_sample = rows.sum(-1)
        width = max(int(per_sample.max()), 1) if rows.numel() else 1
        b, t = rows.nonzero(as_tuple=True)
        rank = torch.arange(b.numel(), device=rows.device) - (per_sample.cumsum(0) - per_sample)[b]
        b, t, rank = b.to(device), t.to(device), rank.to(device)
        line = b[:, None] * d + torch.arange(d, device=device)  # [N, d]: the batch row of each candidate
        slot = rank[:, None].expand_as(line)
        shape = (batch * d, width)
        self.d = d
        self.input_ids = torch.zeros(shape, dtype=torch.long, device=device)
        self.input_ids[line, slot] = candidates
        self.index = torch.zeros(shape, dtype=torch.long, device=device)  # where it stands in the sequence
        self.index[line, slot] = (t + 1)[:, None]
        self.position_ids = position_ids.to(device).repeat_interleave(d, dim=0).gather(1, self.index)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=device)
        self.valid[line, slot] = True
        flat = torch.zeros(shape, dtype=torch.long, device=device)
        flat[line, slot] = torch.arange(candidates.numel(), device=device).view(-1, d)
        self.order = torch.argsort(flat[self.valid])  # kept rows -> candidates.flatten() order
        self.key_valid = attention_mask.to(device).bool().repeat_interleave(d, dim=0)
        self._masks: dict[tuple, torch.Tensor] = {}  # one per (sliding window, dtype): layers share it

    def in_candidate_order(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N·d, V]`` logits of the kept slots, reordered to ``candidates.flatten()``."""
        return logits[self.order]

    def model_inputs(self, prefix: PrefixCache) -> dict:
        """Keyword arguments of one model's candidate forward over the prefix that model recorded (no image)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "logits_to_keep": self.valid,
                "use_cache": False, "prefix_cache": prefix, "candidates": self}

    def mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``[B·d, 1, R, L + R]`` mask: real keys before the candidate's index, then itself only.

        Float, not bool: eager kernels add the mask, so a bool one would be silently wrong.
        """
        if (sliding_window, dtype) not in self._masks:
            self._masks[sliding_window, dtype] = self._build_mask(sliding_window, dtype)
        return self._masks[sliding_window, dtype]

    def _build_mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        length = self.key_valid.shape[1]
        keys = torch.arange(length, device=self.index.device)
        seen = (keys < self.index[..., None]) & self.key_valid[:, None, :]
        if sliding_window is not None:  # same window as the ground-truth token at that index
            seen &= self.index[..., None] - keys < sliding_window
        width = self.index.shape[1]
        itself = torch.eye(width, dtype=torch.bool, device=seen.device).expand(seen.shape[0], width, width)
        allowed = torch.cat([seen, itself], dim=-1)[:, None]
        return torch.zeros(allowed.shape, dtype=dtype, device=seen.device).masked_fill(~allowed,
                                                                                       torch.finfo(dtype).min)

    def attend(self, kernel, prefix: PrefixCache, layer: int, module, query, key, value, **kwargs):
        """The candidate rows' attention over [recorded prefix ; own key] at decoder ``layer``; ``kernel`` is
        sdpa or eager."""
        if layer not in prefix.layers:
            raise RuntimeError(f"TPA candidate pass: layer {layer} has no recorded prefix; run the "
                               "ground-truth forward with prefix_cache= first")
        past_key, past_value = prefix.layers[layer]
        return self.attend_to(kernel, past_key, past_value, module, query, key, value, **kwargs)

    def attend_to(self, kernel, past_key, past_value, module, query, key, value, **kwargs):
        """Candidate queries ``[B·d, H, R, D]`` over the ground truth's keys/values ``[B, H_kv, L, D]`` and their own."""
        if past_key.shape[2] != self.key_valid.shape[1]:
            raise RuntimeError(f"TPA candidate pass: recorded prefix has {past_key.shape[2]} keys, the attention "
                               f"mask {self.key_valid.shape[1]}")
        key = torch.cat([past_key.repeat_interleave(self.d, dim=0).to(key.dtype), key], dim=2)
        value = torch.cat([past_value.repeat_interleave(self.d, dim=0).to(value.dtype), value], dim=2)
        mask = self.mask(kwargs.pop("sliding_window", None), query.dtype)
        return kernel(module, query, key, value, mask, **kwargs)


class JointPass:
    """One forward of a model over its ground-truth sequence and the candidates of a :class:`CandidateBatch`.

    The candidates ride behind the sequence (``[B, L + d·R]``, candidate j of sample b's scored positions in
    block j). In each text decoder layer the ground-truth rows run the model's own kernel on the first L
    positions, exactly as a plain forward (an attention capture there records as usual), and the candidate
    rows attend to that same layer's ground-truth keys/values plus themselves, as in the candidate pass.
    Every other module treats the candidates as more tokens. So the model's parameters are used (under
    ZeRO-3: gathered) once for both, where a ground-truth pass then a candidate pass use them twice.
    """

    def __init__(self, model, layout: CandidateBatch, inputs: dict, keep: torch.Tensor):
        self._layer_of = text_attention_layers(model)
        self.layout = layout
        batch, self.length = inputs["input_ids"].shape
        self.behind = behind = layout.valid.reshape(batch, -1)
        self.kept = kept = torch.cat([keep, behind], dim=1)
        self.is_candidate = torch.cat([torch.zeros_like(keep), behind], dim=1)[kept]  # over the kept rows
        self.inputs = {
            **inputs,
            "input_ids": torch.cat([inputs["input_ids"], layout.input_ids.reshape(batch, -1)], dim=1),
            "position_ids": torch.cat([inputs["position_ids"], layout.position_ids.reshape(batch, -1)], dim=1),
            "attention_mask": torch.cat([inputs["attention_mask"], behind.to(inputs["attention_mask"].dtype)], 1),
            "logits_to_keep": kept, "use_cache": False, "joint": self,
        }

    def layer_of(self, module) -> int | None:
        return self._layer_of.get(id(module))

    def kept_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """Bool over the pass's kept rows: those of the ground-truth rows ``keep [B, L]`` (a subset of the pass's),
        and every candidate."""
        return torch.cat([keep, self.behind], dim=1)[self.kept]

    def split(self, logits: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept rows' logits as (ground-truth rows in row-major order, candidates in ``candidates.flatten()``
        order). ``keep``: the ground-truth rows the logits hold, when fewer than the pass kept."""
        is_candidate = self.is_candidate if keep is None else self.is_candidate[self.kept_rows(keep)]
        return logits[~is_candidate], self.layout.in_candidate_order(logits[is_candidate])

    def attend(self, ground_truth, kernel, module, query, key, value, attention_mask, **kwargs):
        """``ground_truth``: the wrapped backend's path for the first L rows; ``kernel``: one that takes the
        candidate mask (see :func:`candidate_kernel`). Returns ``[B, L + d·R, H, D]``."""
        length, d = self.length, self.layout.d
        gt_kwargs = dict(kwargs)
        if "position_ids" in gt_kwargs:  # flash-attention reads them (packed-sequence detection)
            gt_kwargs["position_ids"] = gt_kwargs["position_ids"][:, :length]
        if attention_mask is not None:  # a 4-D mask for sdpa/eager, the 2-D padding mask for flash
            attention_mask = attention_mask[..., :length, :length] if attention_mask.dim() == 4 \
                else attention_mask[:, :length]
        gt_key, gt_value = key[:, :, :length], value[:, :, :length]
        out, _ = ground_truth(module, query[:, :, :length], gt_key, gt_value, attention_mask, **gt_kwargs)

        def per_candidate(x):  # [B, H, L + d·R, D] -> [B·d, H, R, D], the CandidateBatch layout
            batch, heads, _, dim = x.shape
            return x[:, :, length:].reshape(batch, heads, d, -1, dim).transpose(1, 2).reshape(batch * d, heads, -1, dim)

        kwargs.pop("position_ids", None)
        cand, _ = self.layout.attend_to(kernel, gt_key, gt_value, module, per_candidate(query), per_candidate(key),
                                        per_candidate(value), **kwargs)
        return torch.cat([out, cand.reshape(out.shape[0], -1, *cand.shape[2:])], dim=1), None


def candidate_kernel(backend: str, original, model_eager, softcap: float | None):
    """The kernel that can take the candidate mask: the backend's own for sdpa/eager; for flash-attention SDPA,
    or the model's eager function when the model softcaps its attention logits (SDPA cannot)."""
    if backend in ("sdpa", "eager"):
        return original
    return sdpa_attention_forward if softcap is None else model_eager()
