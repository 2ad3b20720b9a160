"""TPA candidate sampling, weighting, row selection and the bigram source, against exact and Counter oracles."""

import io
import itertools
import math
from collections import Counter

import pytest
import torch

from aligntI.losses.tpa import (
    UNSEEN_SCORE,
    WEIGHTINGS,
    BigramTable,
    candidate_weights,
    draw_candidates,
    select_rows,
)

N, V = 9, 17


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scores(seed: int, n: int = N, v: int = V, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, v, generator=gen(seed)) * scale


def gt_ids(seed: int, n: int = N, v: int = V) -> torch.Tensor:
    return torch.randint(v, (n,), generator=gen(seed))


def assert_distinct(cand: torch.Tensor) -> None:
    assert all(len(set(row)) == len(row) for row in cand.tolist())


# --- draw_candidates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 4, V - 1])
def test_draw_candidates_distinct_in_vocab_and_never_the_excluded_ground_truth(d):
    s, gt = scores(0), gt_ids(1)
    cand = draw_candidates(s, gt, d, exclude_gt=True, generator=gen(2))
    assert cand.shape == (N, d) and cand.dtype == torch.long
    assert ((cand >= 0) & (cand < V)).all()
    assert_distinct(cand)
    assert not (cand == gt[:, None]).any()


def test_draw_candidates_with_d_equal_drawable_count_is_a_permutation():
    s, gt = scores(3), gt_ids(4)
    cand = draw_candidates(s, gt, V - 1, exclude_gt=True, generator=gen(5))
    for row, g in zip(cand.tolist(), gt.tolist()):
        assert sorted(row) == [t for t in range(V) if t != g]


def test_draw_candidates_may_draw_the_ground_truth_when_not_excluded():
    s, gt = scores(6), gt_ids(7)
    s[torch.arange(N), gt] = 50.0  # overwhelming: any other token first has probability < e^-40
    cand = draw_candidates(s, gt, 3, exclude_gt=False, generator=gen(8))
    assert torch.equal(cand[:, 0], gt)
    cand = draw_candidates(s, gt, 3, exclude_gt=True, generator=gen(8))
    assert not (cand == gt[:, None]).any()


def test_draw_candidates_never_draw_neg_inf_tokens_even_below_very_negative_ones():
    s = scores(9)
    banned = torch.rand(N, V, generator=gen(10)) < 0.5
    banned[:, :4] = False  # at least four drawable per row
    s[banned] = -math.inf
    s[:, 0] = -1e30  # very negative but finite: still drawable, ahead of every -inf
    d = 4
    cand = draw_candidates(s, gt_ids(11), d, exclude_gt=False, generator=gen(12))
    assert not banned.gather(1, cand).any()
    assert_distinct(cand)
    only = torch.full((2, 6), -math.inf)
    only[:, [1, 4]] = torch.tensor([-1e30, 3.0])
    cand = draw_candidates(only, torch.tensor([0, 0]), 2, exclude_gt=True, generator=gen(13))
    assert cand.tolist() == [[4, 1], [4, 1]]


def test_draw_candidates_never_draw_the_listed_tokens():
    s = scores(14)
    s[:, 3] = 50.0  # the most likely token by far, but listed as never drawable
    cand = draw_candidates(s, gt_ids(15), 4, exclude_gt=True, generator=gen(16), never=(3, 5))
    assert not ((cand == 3) | (cand == 5)).any()
    assert (draw_candidates(s, gt_ids(15), 4, exclude_gt=False, generator=gen(16))[:, 0] == 3).all()


def test_draw_candidates_reproducible_with_the_same_seed_and_not_with_another():
    s, gt = scores(14, n=64, v=50), gt_ids(15, n=64, v=50)
    a = draw_candidates(s, gt, 5, exclude_gt=True, generator=gen(16))
    b = draw_candidates(s, gt, 5, exclude_gt=True, generator=gen(16))
    c = draw_candidates(s, gt, 5, exclude_gt=True, generator=gen(17))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("chunk_size", [1, 3, N, N + 5])
def test_draw_candidates_chunking_does_not_change_the_draw_on_cpu(chunk_size):
    s, gt = scores(18), gt_ids(19)
    ref = draw_candidates(s, gt, 5, exclude_gt=True, generator=gen(20), chunk_size=10**6)
    out = draw_candidates(s, gt, 5, exclude_gt=True, generator=gen(20), chunk_size=chunk_size)
    assert torch.equal(out, ref)


def test_draw_candidates_bf16_scores_equal_their_fp32_upcast_and_take_no_grad():
    s, gt = scores(21).bfloat16().requires_grad_(), gt_ids(22)
    out = draw_candidates(s, gt, 4, exclude_gt=True, generator=gen(23))
    assert not out.requires_grad
    assert torch.equal(out, draw_candidates(s.detach().float(), gt, 4, exclude_gt=True, generator=gen(23)))


@pytest.mark.parametrize("u", [0.0, 1.0])
def test_draw_candidates_keep_keys_finite_at_extreme_uniform_draws(monkeypatch, u):
    """u = 0 would make every key -inf (and u = 1 +inf): the draw would ignore the scores and the -inf mask."""
    s = scores(40)
    s[:, 0] = -math.inf
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: rand(*a, **k).fill_(u))
    cand = draw_candidates(s, gt_ids(41), 3, exclude_gt=False, generator=gen(42))
    # Constant noise: the draw is the top-3 of the scores.
    assert torch.equal(cand, s.topk(3, dim=-1).indices)


def test_draw_candidates_raise_naming_the_row_without_enough_drawable_tokens():
    s = scores(24)
    s[5, 3:] = -math.inf  # row 5: tokens 0, 1, 2 drawable
    gt = torch.zeros(N, dtype=torch.long)
    draw_candidates(s, gt, 3, exclude_gt=False, generator=gen(25))
    with pytest.raises(ValueError, match="row 5 "):
        draw_candidates(s, gt, 3, exclude_gt=True, generator=gen(25), chunk_size=2)
    with pytest.raises(ValueError, match="row 0 "):
        draw_candidates(scores(26), gt, V + 1, exclude_gt=False, generator=gen(25))


def test_draw_candidates_empty_input_and_bad_d():
    out = draw_candidates(torch.empty(0, V), torch.empty(0, dtype=torch.long), 3, exclude_gt=True,
                          generator=gen(0))
    assert out.shape == (0, 3) and out.dtype == torch.long
    with pytest.raises(ValueError, match="d must be"):
        draw_candidates(scores(0), gt_ids(1), 0, exclude_gt=True, generator=gen(0))


def pair_probs(p: list[float]) -> dict[frozenset, float]:
    """Exact P({a, b}) of two sequential draws without replacement: p_a p_b/(1-p_a) + p_b p_a/(1-p_b)."""
    return {frozenset((a, b)): p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b])
            for a, b in itertools.combinations(range(len(p)), 2)}


@pytest.mark.parametrize("exclude_gt", [False, True])
def test_draw_frequencies_match_sequential_sampling_without_replacement(exclude_gt):
    probs = [0.4, 0.25, 0.2, 0.1, 0.05]
    n, gt = 20000, 1
    s = torch.tensor(probs).log().expand(n, -1) + 3.0  # an offset: only softmax(scores) may matter
    cand = draw_candidates(s, torch.full((n,), gt), 2, exclude_gt=exclude_gt, generator=gen(27))
    p = [0.0 if exclude_gt and t == gt else q for t, q in enumerate(probs)]
    p = [q / sum(p) for q in p]
    first = torch.bincount(cand[:, 0], minlength=5).double() / n
    torch.testing.assert_close(first, torch.tensor(p, dtype=torch.float64), atol=0.015, rtol=0)
    seen = Counter(frozenset(row) for row in cand.tolist())
    for pair, expected in pair_probs(p).items():
        assert abs(seen[pair] / n - expected) < 0.015, (pair, seen[pair] / n, expected)


# --- candidate_weights -----------------------------------------------------------------------------------------


def test_candidate_weights_uniform_rows_are_one_over_d():
    cand = draw_candidates(scores(30), gt_ids(31), 6, exclude_gt=True, generator=gen(32))
    w = candidate_weights(scores(33), cand, "uniform")
    assert w.dtype == torch.float32 and w.shape == (N, 6)
    torch.testing.assert_close(w, torch.full((N, 6), 1 / 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidate_weights_student_prob_is_renormalised_softmax(dtype):
    logits = scores(34, scale=6.0).to(dtype)
    cand = draw_candidates(scores(35), gt_ids(36), 5, exclude_gt=True, generator=gen(37))
    w = candidate_weights(logits, cand, "student_prob")
    p = torch.softmax(logits.double(), -1).gather(1, cand)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), p / p.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.sum(-1), torch.ones(N))


@pytest.mark.parametrize("scheme", WEIGHTINGS)
def test_candidate_weights_take_no_grad(scheme):
    logits = scores(38).requires_grad_()
    w = candidate_weights(logits, torch.tensor([[0, 1]]).repeat(N, 1), scheme)
    assert not w.requires_grad


def test_candidate_weights_unknown_scheme_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'prob'.*uniform.*student_prob"):
        candidate_weights(scores(0), torch.zeros(N, 2, dtype=torch.long), "prob")


# --- select_rows -----------------------------------------------------------------------------------------------


def mask(seed: int, b: int = 6, length: int = 12) -> torch.Tensor:
    return torch.rand(b, length, generator=gen(seed)) < 0.5


@pytest.mark.parametrize("max_per_sample", [1, 2, 5, 12, 100, None])
def test_select_rows_keeps_a_subset_of_min_count_max_per_sample(max_per_sample):
    rows = mask(40)
    rows[0] = False
    out = select_rows(rows, max_per_sample, gen(41))
    assert out.dtype == torch.bool and out.shape == rows.shape
    assert not (out & ~rows).any()
    limit = rows.shape[1] if max_per_sample is None else max_per_sample
    assert out.sum(-1).tolist() == rows.sum(-1).clamp(max=limit).tolist()
    if max_per_sample is None:
        assert torch.equal(out, rows)


def test_select_rows_picks_uniformly():
    rows = torch.tensor([[True, False, True, True, False, True, False, True]])
    seeds = 3000
    picked = torch.zeros(8)
    pairs = Counter()
    for seed in range(seeds):
        out = select_rows(rows, 2, gen(seed))[0]
        picked += out
        pairs[tuple(out.nonzero().squeeze(-1).tolist())] += 1
    torch.testing.assert_close(picked / seeds, rows[0].float() * 0.4, atol=0.03, rtol=0)
    assert len(pairs) == 10 and all(abs(c / seeds - 0.1) < 0.025 for c in pairs.values())


def test_select_rows_rejects_max_below_one():
    with pytest.raises(ValueError, match="max_per_sample"):
        select_rows(mask(0), 0, gen(0))


# --- BigramTable -----------------------------------------------------------------------------------------------


def test_count_pairs_takes_the_token_before_each_response_token():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0],
                              [1, 2, 3, 4, 2, 3, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, -100, -100],   # prompt 5 6, response 7 8 9, then padding
                           [-100, 2, -100, -100, 2, 3, -100]])  # two response spans
    prev, nxt = BigramTable.count_pairs(input_ids, labels)
    assert list(zip(prev.tolist(), nxt.tolist())) == [(6, 7), (7, 8), (8, 9), (1, 2), (4, 2), (2, 3)]


def random_pairs(seed: int, n: int = 300, v: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randint(v, (n,), generator=g), torch.randint(v, (n,), generator=g)


def as_counter(table: BigramTable) -> Counter:
    v = table.vocab_size
    return Counter({(k // v, k % v): c for k, c in zip(table.keys.tolist(), table.counts.tolist())})


def test_from_pairs_counts_match_a_counter():
    prev, nxt = random_pairs(50)
    table = BigramTable.from_pairs(prev, nxt, 7)
    oracle = Counter(zip(prev.tolist(), nxt.tolist()))
    assert as_counter(table) == oracle
    assert len(table) == len(oracle) and table.total == 300
    assert table.keys.tolist() == sorted(table.keys.tolist())


@pytest.mark.parametrize("bad", [-1, 7])
def test_from_pairs_rejects_ids_outside_the_vocab(bad):
    prev, nxt = random_pairs(51)
    nxt[3] = bad
    with pytest.raises(ValueError, match="following"):
        BigramTable.from_pairs(prev, nxt, 7)


def test_merge_equals_from_pairs_of_the_concatenation():
    (p1, n1), (p2, n2) = random_pairs(52), random_pairs(53, n=40)
    merged = BigramTable.from_pairs(p1, n1, 7).merge(BigramTable.from_pairs(p2, n2, 7))
    ref = BigramTable.from_pairs(torch.cat([p1, p2]), torch.cat([n1, n2]), 7)
    assert torch.equal(merged.keys, ref.keys) and torch.equal(merged.counts, ref.counts)
    with pytest.raises(ValueError, match="vocab"):
        merged.merge(BigramTable.from_pairs(p2, n2, 8))


def test_state_dict_round_trips_through_torch_save():
    table = BigramTable.from_pairs(*random_pairs(54), 7)
    buf = io.BytesIO()
    torch.save(table.state_dict(), buf)
    buf.seek(0)
    back = BigramTable.from_state_dict(torch.load(buf, weights_only=True))
    assert back.vocab_size == 7 and torch.equal(back.keys, table.keys) and torch.equal(back.counts, table.counts)


def test_scores_are_log_counts_for_seen_pairs_and_unseen_score_elsewhere():
    prev, nxt = random_pairs(55, n=40, v=9)
    nxt[prev == 4] = 0  # token 4 has a single follower; token 8 may have none at all
    prev[prev == 8] = 4
    table = BigramTable.from_pairs(prev, nxt, 9)
    oracle = Counter(zip(prev.tolist(), nxt.tolist()))
    query = torch.tensor([0, 4, 8, 3, 0, 8])
    out = table.scores(query)
    assert out.shape == (6, 9) and out.dtype == torch.float32
    expected = torch.tensor([[math.log(oracle[(q, t)]) if oracle[(q, t)] else UNSEEN_SCORE for t in range(9)]
                             for q in query.tolist()])
    torch.testing.assert_close(out, expected)
    assert table.scores(torch.empty(0, dtype=torch.long)).shape == (0, 9)


def test_bigram_draws_take_every_seen_follower_first_proportionally_then_distinct_unseen():
    v, n = 12, 4000
    table = BigramTable.from_pairs(torch.tensor([3] * 6 + [5]), torch.tensor([1] * 5 + [4] + [3]), v)
    gt = torch.tensor([1, 0]).repeat(n // 2)  # even rows: gt is a seen follower; odd rows: it is not
    cand = draw_candidates(table.scores(torch.full((n,), 3)), gt, 4, exclude_gt=True, generator=gen(56))
    assert_distinct(cand)
    assert not (cand == gt[:, None]).any()
    even, odd = cand[0::2], cand[1::2]
    assert (even[:, 0] == 4).all() and not torch.isin(even[:, 1:], torch.tensor([1, 4])).any()
    assert (odd[:, :2].sort(-1).values == torch.tensor([1, 4])).all()
    assert not torch.isin(odd[:, 2:], torch.tensor([1, 4])).any()
    assert abs((odd[:, 0] == 1).double().mean().item() - 5 / 6) < 0.03  # ∝ counts 5 : 1
    # Unseen fillers spread over all the remaining tokens rather than a fixed tie order.
    assert set(odd[:, 2:].unique().tolist()) == set(range(v)) - {0, 1, 4}
