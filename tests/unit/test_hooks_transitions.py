"""TPA's candidate pass against its oracle: a separate forward of prefix + candidate for every candidate."""

import pytest
import torch
from test_hooks_attention import batch_for, write_mixed

from aligntI.config import AttentionConfig
from aligntI.data.dataset import model_inputs
from aligntI.hooks import attention as capture
from aligntI.hooks.transitions import CandidateBatch, JointPass, PrefixCache
from aligntI.losses.tpa import scored_rows
from aligntI.models.loading import load_model


def separate_candidate_logits(model, batch, rows, candidates):
    """The oracle: for each scored row (b, t) and candidate v, a forward of sample b's tokens before t+1 then v."""
    has_image = batch["vision_mask"].any(-1)
    image_of = (has_image.cumsum(0) - 1).tolist()  # pixel_values holds the images of the samples that have one
    out = []
    for (b, t), row_candidates in zip(rows.nonzero().tolist(), candidates.tolist()):
        for v in row_candidates:
            ids = batch["input_ids"][b:b + 1, : t + 2].clone()
            ids[0, t + 1] = v
            pixels = batch["pixel_values"][image_of[b]][None] if has_image[b] else None
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"][b:b + 1, : t + 2],
                           position_ids=batch["position_ids"][b:b + 1, : t + 2],
                           pixel_values=pixels, use_cache=False).logits
            out.append(logits[0, -1])
    return torch.stack(out)


def rows_and_candidates(batch, d, vocab, seed=0):
    rows = scored_rows(batch["labels"])
    rows[1] = False  # a sample with nothing to score keeps its dummy slot masked
    generator = torch.Generator().manual_seed(seed)
    return rows, torch.randint(0, vocab, (int(rows.sum()), d), generator=generator)


def candidate_pass(model, batch, rows, candidates):
    prefix = PrefixCache(model)
    ground_truth = model(**model_inputs(batch), use_cache=False, prefix_cache=prefix).logits
    layout = CandidateBatch(rows, candidates, batch["attention_mask"], batch["position_ids"])
    return ground_truth, layout.in_candidate_order(model(**layout.model_inputs(prefix)).logits)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_candidate_logits_equal_separate_forwards(tmp_path, digitgrid, tiny_model, backend, padding_side):
    capture.install()
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid), padding_side)
    assert (batch["attention_mask"] == 0).any()
    model = load_model(tiny_model, AttentionConfig(backend, "sdpa")).eval()
    rows, candidates = rows_and_candidates(batch, 3, model.config.text_config.vocab_size)
    with torch.no_grad():
        plain = model(**model_inputs(batch), use_cache=False).logits
        ground_truth, per_candidate = candidate_pass(model, batch, rows, candidates)
        oracle = separate_candidate_logits(model, batch, rows, candidates)
    torch.testing.assert_close(ground_truth, plain, atol=0, rtol=0)  # recording changes nothing
    assert per_candidate.shape == (candidates.numel(), plain.shape[-1])
    torch.testing.assert_close(per_candidate, oracle, atol=2e-5, rtol=0)


def test_candidate_gradients_equal_separate_forwards(tmp_path, digitgrid, tiny_model):
    """Under activation checkpointing, gradients reach the prefix through the recorded keys/values."""
    capture.install()
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid, with_text_only=False), "left")
    grads = []
    for use_pass in (True, False):
        model = load_model(tiny_model, AttentionConfig("sdpa", "sdpa")).train()
        model.activation_checkpointing_enable()
        rows, candidates = rows_and_candidates(batch, 2, model.config.text_config.vocab_size)
        if use_pass:
            _, logits = candidate_pass(model, batch, rows, candidates)
        else:
            logits = separate_candidate_logits(model, batch, rows, candidates)
        weights = torch.linspace(0.1, 1.0, logits.shape[0])[:, None]
        (torch.log_softmax(logits.float(), -1)[:, :7] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("layers.0.self_attn.k_proj" in n for n in grads[0])  # the prefix's keys got gradient
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def joint_pass(model, batch, rows, candidates, keep):
    inputs = model_inputs(batch)
    layout = CandidateBatch(rows, candidates, batch["attention_mask"], batch["position_ids"])
    joint = JointPass(model, layout, inputs, keep)
    return joint.split(model(**joint.inputs).logits)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_joint_pass_equals_plain_forward_and_separate_forwards(tmp_path, digitgrid, tiny_model, backend,
                                                               padding_side):
    """One forward carrying ground truth and candidates: the plain pass's rows, the oracle's candidates."""
    capture.install()
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid), padding_side)
    model = load_model(tiny_model, AttentionConfig(backend, "sdpa")).eval()
    rows, candidates = rows_and_candidates(batch, 3, model.config.text_config.vocab_size)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**model_inputs(batch), use_cache=False).logits[keep]
        ground_truth, per_candidate = joint_pass(model, batch, rows, candidates, keep)
        oracle = separate_candidate_logits(model, batch, rows, candidates)
    torch.testing.assert_close(ground_truth, plain, atol=2e-5, rtol=0)
    torch.testing.assert_close(per_candidate, oracle, atol=2e-5, rtol=0)


def test_joint_pass_gradients_and_capture_equal_two_passes(tmp_path, digitgrid, tiny_model):
    """Same gradients as ground-truth pass + candidate pass, and the capture rides on the joint pass."""
    capture.install()
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid, with_text_only=False), "left")
    keep = batch["attention_mask"].bool()
    masks = (batch["instruction_mask"], batch["vision_mask"], batch["attention_mask"])
    grads, probs = [], []
    for joint in (True, False):
        model = load_model(tiny_model, AttentionConfig("sdpa", "sdpa")).train()
        model.activation_checkpointing_enable()
        rows, candidates = rows_and_candidates(batch, 2, model.config.text_config.vocab_size)
        with capture.AttentionCapture(model, [1], *masks) as cap:
            if joint:
                gt, cand = joint_pass(model, batch, rows, candidates, keep)
            else:
                gt, cand = candidate_pass(model, batch, rows, candidates)
                gt = gt[keep]
            weights = torch.linspace(0.1, 1.0, cand.shape[0])[:, None]
            loss = (torch.log_softmax(cand.float(), -1)[:, :7] * weights).sum() + gt.float().logsumexp(-1).sum() \
                + cap[1].sum()
            loss.backward()
        probs.append(cap[1].detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(probs[0], probs[1], atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_candidate_pass_without_prefix_is_an_error(tmp_path, digitgrid, tiny_model):
    capture.install()
    batch = batch_for(tiny_model, write_mixed(tmp_path, digitgrid), "right")
    model = load_model(tiny_model, AttentionConfig()).eval()
    rows, candidates = rows_and_candidates(batch, 2, model.config.text_config.vocab_size)
    layout = CandidateBatch(rows, candidates, batch["attention_mask"], batch["position_ids"])
    with pytest.raises(RuntimeError, match="layer 0 has no recorded prefix"), torch.no_grad():
        model(**layout.model_inputs(PrefixCache(model)))


def test_candidate_layout():
    rows = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    candidates = torch.tensor([[5, 6], [7, 8], [9, 10]])
    position_ids = torch.arange(5).expand(3, 5) + 10
    layout = CandidateBatch(rows, candidates, torch.ones(3, 5), position_ids)
    # batch row b·d + j: candidate j of each scored position of sample b
    assert layout.input_ids.tolist() == [[5, 7], [6, 8], [0, 0], [0, 0], [9, 0], [10, 0]]
    assert layout.index.tolist() == [[2, 4], [2, 4], [0, 0], [0, 0], [1, 0], [1, 0]]
    assert layout.position_ids.tolist() == [[12, 14], [12, 14], [10, 10], [10, 10], [11, 10], [11, 10]]
    assert layout.valid.sum() == candidates.numel() and not layout.valid[2:4].any()
    kept = layout.input_ids[layout.valid]  # what logits_to_keep returns, in slot order
    assert layout.in_candidate_order(kept).tolist() == candidates.flatten().tolist()
    allowed = layout.mask(None, torch.float32)[:, 0] == 0
    # candidate 7 (index 4) sees keys 0..3 and itself: not candidate 5 beside it, not its own ground truth
    assert allowed[0, 1].tolist() == [True, True, True, True, False, False, True]
    assert allowed[0, 0].tolist() == [True, True, False, False, False, True, False]
    # window 2: like the ground-truth token it replaces, it sees the previous key and itself
    assert layout.mask(2, torch.float32)[0, 0, 1].eq(0).tolist() == [False, False, False, True, False, False, True]
    empty = CandidateBatch(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(0, 4, dtype=torch.long),
                           torch.ones(2, 3), torch.arange(3).expand(2, 3))
    assert empty.input_ids.shape == (8, 1) and not empty.valid.any()
