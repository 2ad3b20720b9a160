"""Response cross-entropy, global-batch token normalisation, and the LR schedule, against plain references."""

import math

import pytest
import torch
import torch.nn.functional as F

from aligntI.losses.sft import rows_ce_sum
from aligntI.training.accounting import micro_loss_scale
from aligntI.training.schedule import cosine_with_warmup, warmup_steps_for


def test_rows_ce_sum_on_response_rows_matches_shifted_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.full((3, 7), -100)
    labels[0, 3:5] = torch.tensor([1, 2])
    labels[2, 6] = 9
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # the objectives' alignment: logits at t predict t+1
    keep = targets != -100
    total = rows_ce_sum(logits[keep], targets[keep], chunk_size=2)
    # Reference: HF's own shift-and-mean, times the count.
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert int(keep.sum()) == 3
    torch.testing.assert_close(total, ref * 3)


def test_rows_ce_sum_with_no_labels_is_zero_but_connected():
    logits = torch.randn(2, 5, requires_grad=True)
    total = rows_ce_sum(logits, torch.full((2,), -100))
    assert total.item() == 0.0
    total.backward()  # every rank must be able to run backward
    assert logits.grad is not None and (logits.grad == 0).all()


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 3), (4, 2)])
def test_micro_loss_scale_gives_global_token_mean(world, accum):
    """Simulate DeepSpeed: grads averaged over ranks, backward divided by accumulation steps."""
    torch.manual_seed(world * 10 + accum)
    w = torch.randn(5, requires_grad=True)
    micro = [[(torch.randn(n, 5), n) for n in torch.randint(0, 6, (accum,)).tolist()] for _ in range(world)]
    global_tokens = sum(n for rank in micro for _, n in rank)
    scale = micro_loss_scale(global_tokens, world, accum)
    grads = []
    for rank in micro:
        w.grad = None
        for x, _ in rank:
            ((x @ w).sum() * scale / accum).backward()  # DeepSpeed's backward scales by 1/accum
        grads.append(w.grad.clone())
    ds_grad = torch.stack(grads).mean(0)  # DeepSpeed averages gradients over ranks
    w.grad = None
    reference = sum((x @ w).sum() for rank in micro for x, _ in rank) / global_tokens
    reference.backward()
    torch.testing.assert_close(ds_grad, w.grad)


def test_cosine_with_warmup():
    total, warm = 100, warmup_steps_for(100, 0.03)
    f = cosine_with_warmup(total, warm, min_lr_ratio=0.1)
    assert warm == 3
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(3) == pytest.approx(1.0)
    mid = warm + (total - warm) / 2
    assert f(int(mid)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 3) / 97)))
    assert f(total) == pytest.approx(0.1) and f(total + 50) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(warm, total))


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_rows_ce_sum_matches_cross_entropy_and_its_gradient(chunk_size):
    from aligntI.losses.sft import rows_ce_sum

    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 10, -100, 5, 5])
    got = rows_ce_sum(logits, targets, chunk_size=chunk_size)
    ref = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got, ref)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_got, g_ref)
    empty = rows_ce_sum(logits, torch.full((7,), -100), chunk_size)
    assert empty.item() == 0 and torch.autograd.grad(empty, logits)[0].abs().sum() == 0
