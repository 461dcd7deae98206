"""The sampled softmax of retrieval/loss.py against hand-computed logits: logQ correction, masking, modes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from features.batch import ITEM_ID, build_batch
from retrieval.catalog import Catalog
from retrieval.config import LossConfig
from retrieval.loss import CandidateSet, log_q, sampled_softmax_loss
from retrieval.task import CandidateSampler


def _unit(x: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(x, dtype=torch.float32), dim=1)


Q = _unit([[1.0, 0.0], [0.6, 0.8]])  # two training rows
V = _unit([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])  # four embedded items
TAU = torch.tensor(0.5)


def _manual(q, v, pos_item, neg_items, pos_lq, neg_lq, masked):
    """-log softmax of [pos, negatives] written out term by term."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = float(q[i] @ v[pos_item[i]]) / 0.5 - pos_lq[i]
        terms = [math.exp(pos)]
        for j, item in enumerate(neg_items):
            if (i, j) in masked:
                continue
            terms.append(math.exp(float(q[i] @ v[item]) / 0.5 - neg_lq[j]))
        total += math.log(sum(terms)) - pos
    return total / q.shape[0]


def test_log_q_is_subtracted_from_every_column_and_the_positive():
    # row 0's positive is item 0, row 1's is item 2; negatives: columns of items 1, 3 (uniform draws)
    pos_lq = [-1.0, -2.0]
    neg_lq = [-0.5, -3.0]
    c = CandidateSet(
        items=None, positive_item=torch.tensor([0, 2]), positive_ids=torch.tensor([10, 12]),
        positive_log_q=torch.tensor(pos_lq), negative_item=torch.tensor([1, 3]), negative_ids=torch.tensor([11, 13]),
        negative_log_q=torch.tensor(neg_lq), unique_negatives=True,
    )
    got = sampled_softmax_loss(Q, V, c, TAU)
    want = _manual(Q, V, [0, 2], [1, 3], pos_lq, neg_lq, masked=set())
    assert got.item() == pytest.approx(want, rel=1e-5)
    no_correction = CandidateSet(c.items, c.positive_item, c.positive_ids, torch.zeros(2), c.negative_item,
                                 c.negative_ids, torch.zeros(2), True)
    assert sampled_softmax_loss(Q, V, no_correction, TAU).item() == pytest.approx(
        _manual(Q, V, [0, 2], [1, 3], [0, 0], [0, 0], set()), rel=1e-5)
    assert got.item() != pytest.approx(sampled_softmax_loss(Q, V, no_correction, TAU).item(), rel=1e-3)


def test_duplicates_of_the_positive_among_negatives_are_masked():
    # one column per draw: columns 0 and 1 are the rows' own positives, column 2 a uniform draw of item 10
    # (row 0's positive again) and column 3 of item 13
    c = CandidateSet(
        items=None, positive_item=torch.tensor([0, 2]), positive_ids=torch.tensor([10, 12]),
        positive_log_q=torch.tensor([-1.0, -2.0]), negative_item=torch.tensor([0, 2, 0, 3]),
        negative_ids=torch.tensor([10, 12, 10, 13]), negative_log_q=torch.tensor([-1.0, -2.0, -1.0, -4.0]),
        unique_negatives=False,
    )
    got = sampled_softmax_loss(Q, V, c, TAU)
    # row 0: its own column and the duplicate draw are masked; row 1: its own column
    want = _manual(Q, V, [0, 2], [0, 2, 0, 3], [-1.0, -2.0], [-1.0, -2.0, -1.0, -4.0], masked={(0, 0), (0, 2), (1, 1)})
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_cross_entropy_fast_path_equals_the_masked_formula():
    # unique columns holding every positive (full catalog): the plain cross-entropy path must agree
    lq = torch.tensor([-1.0, -0.5, -2.0, -3.0])
    c = CandidateSet(None, torch.tensor([0, 2]), torch.tensor([10, 12]), lq[[0, 2]], torch.arange(4),
                     torch.tensor([10, 11, 12, 13]), lq, True)
    got = sampled_softmax_loss(Q, V, c, TAU)
    want = _manual(Q, V, [0, 2], [0, 1, 2, 3], lq[[0, 2]].tolist(), lq.tolist(), masked={(0, 0), (1, 2)})
    assert got.item() == pytest.approx(want, rel=1e-5)
    weighted = sampled_softmax_loss(Q, V, c, TAU, weights=torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(
        2 * _manual(Q[:1], V, [0], [0, 1, 2, 3], [-1.0], lq.tolist(), masked={(0, 0)}) / 2, rel=1e-5)


def test_log_q_formulas():
    p = torch.tensor([0.1, 0.01])
    m, k, n = 50, 20, 1000
    per_draw = log_q(p.log(), m, k, n, dedupe=False)
    assert torch.allclose(per_draw, torch.log(m * p + k / n))
    inclusion = log_q(p.log(), m, k, n, dedupe=True)
    assert torch.allclose(inclusion, torch.log(1 - (1 - p) ** m * (1 - 1 / n) ** k), atol=1e-6)
    # the inclusion probability tends to 1 for a certain item and to M p + K / N for a rare one
    assert log_q(torch.tensor([math.log(0.5)]), 200, 0, 10, True).exp().item() == pytest.approx(1.0)
    rare = torch.tensor([math.log(1e-7)])
    assert log_q(rare, 10, 0, 10**9, True).exp().item() == pytest.approx(1e-6, rel=1e-3)


def _catalog(n: int) -> Catalog:
    ids = np.arange(100, 100 + n, dtype=np.int64)
    from features.batch import make_kjt
    feats = make_kjt({ITEM_ID: (ids, np.ones(n, np.int64))})
    return Catalog(ids, feats, torch.full((n,), math.log(1.0 / n)))


def _train_batch(pos: list[int], logq: list[float]):
    m = len(pos)
    e = np.zeros(m, np.int64)
    return build_batch(user={}, history={"hist_item_id": e}, history_lengths=[m], candidates={ITEM_ID: (pos, [1] * m)},
                       num_candidates=[m], request_ts=[0], candidate_dense=np.asarray(logq, np.float32)[:, None])


def test_sampler_dedupes_in_batch_and_applies_inclusion_log_q():
    cat = _catalog(10)
    batch = _train_batch([101, 103, 101], [math.log(0.2), math.log(0.05), math.log(0.2)])
    s = CandidateSampler(LossConfig(mode="sampled", uniform_negatives=4, dedupe=True), cat, [ITEM_ID])(batch, step=3)
    ids = s.negative_ids.tolist()
    assert len(ids) == len(set(ids)) and {101, 103} <= set(ids)
    assert s.positive_ids.tolist() == [101, 103, 101]
    assert s.negative_ids[s.positive_item].tolist() == [101, 103, 101]  # unique columns hold the positives
    want_101 = math.log(1 - (1 - 0.2) ** 3 * (1 - 1 / 10) ** 4)
    assert s.positive_log_q[0].item() == pytest.approx(want_101, rel=1e-5)
    uniform_only = [j for j, i in enumerate(ids) if i not in (101, 103)]
    for j in uniform_only:  # catalog logq 1/N for items not in the batch
        want = math.log(1 - (1 - 0.1) ** 3 * (1 - 1 / 10) ** 4)
        assert s.negative_log_q[j].item() == pytest.approx(want, rel=1e-5)


def test_sampler_full_mode_is_the_exact_softmax():
    cat = _catalog(6)
    batch = _train_batch([102, 105], [math.log(0.5), math.log(0.5)])
    s = CandidateSampler(LossConfig(mode="full"), cat, [ITEM_ID])(batch)
    assert s.negative_ids.tolist() == list(range(100, 106))
    assert not s.negative_log_q.any() and not s.positive_log_q.any()
    v = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    q = F.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    exact = F.cross_entropy(q @ v.T / 0.1, torch.tensor([2, 5]))
    assert sampled_softmax_loss(q, v, s, torch.tensor(0.1)).item() == pytest.approx(exact.item(), rel=1e-5)


def test_sampler_draws_are_reproducible_per_step():
    cat = _catalog(1000)
    batch = _train_batch([101], [math.log(0.5)])
    cfg = LossConfig(mode="sampled", uniform_negatives=16, in_batch=False, dedupe=False)
    a = CandidateSampler(cfg, cat, [ITEM_ID], seed=1)(batch, step=5, rank=1)
    b = CandidateSampler(cfg, cat, [ITEM_ID], seed=1)(batch, step=5, rank=1)
    c = CandidateSampler(cfg, cat, [ITEM_ID], seed=1)(batch, step=6, rank=1)
    assert torch.equal(a.negative_ids, b.negative_ids) and not torch.equal(a.negative_ids, c.negative_ids)
    assert torch.allclose(a.negative_log_q, torch.full((16,), math.log(16 / 1000)))  # uniform only: K / N


def test_catalog_rejects_unknown_items():
    with pytest.raises(ValueError, match="item 5 is not in the catalog"):
        _catalog(3).rows_of(torch.tensor([100, 5]))
