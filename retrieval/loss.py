"""Sampled softmax with in-batch and uniform negatives and logQ (sampling-bias) correction.

For training row i (a query q_i after some history position, whose next item
y_i is the positive) and negative columns j with item ids c_j::

    s(q, v)    = cos(q, v) / tau                             (both towers L2-normalized)
    pos_i      = s(q_i, v_{y_i}) - log Q(y_i)
    neg_ij     = s(q_i, v_{c_j}) - log Q(c_j),   -inf where c_j == y_i
    loss       = sum_i w_i * (logsumexp_j [pos_i, neg_i1, ..., neg_iC] - pos_i) / sum_i w_i

The positive and its duplicates among the negatives (another row's positive
that is the same item, or a uniform draw of it) are never pushed down.

Q(j) corrects for how the columns were drawn (Yi et al., "Sampling-Bias-Corrected
Neural Modeling for Large Corpus Item Recommendations", RecSys 2019; mixed
negatives: Yang et al., WWW 2020). The samplers: the M positives of the batch
are M draws from the training-target distribution, p_j = exp(logq_j) with the
reader's logq (item j's share of all retrieval-train targets, `candidate_dense[:, 0]`),
and K uniform draws from the N catalog items, probability 1/N each::

    one column per draw   (dedupe=False):  Q(j) = M p_j + K / N                  expected number of draws
    one column per item   (dedupe=True):   Q(j) = 1 - (1 - p_j)^M (1 - 1/N)^K    inclusion probability

Either way sum_j exp(s_j) / Q(j) over the columns is an unbiased estimate of
the full softmax's partition sum sum_{all items} exp(s), which is what the
correction is for. mode="full" makes every catalog item a column exactly once:
Q = 1, no correction, the exact softmax (the limit of sampling, affordable for
catalogs of thousands of items).

A shared pool of uniform negatives alone (in_batch=False, M = 0): every column
has the same Q = K / N, so subtracting it from the positive as well would shift
every logit by one constant and change nothing (a plain sampled softmax, whose
partition sum is K / N times too small). The positive is not drawn by the
pool's sampler: it is in its row's set with certainty, Q(y) = 1, and only the
pool's columns are corrected::

    loss_i = log( exp(s_iy) + sum_j exp(s_ij) / Q(c_j) ) - s_iy,   Q(c) = K / N  (or 1 - (1 - 1/N)^K, dedupe)

whose partition term estimates exp(s_iy) + sum_{i != y} exp(s_i) without bias
(draws of y itself are masked). With in-batch negatives the positive's column
is one the in-batch sampler drew, so it keeps its Q(y) (Yi et al.). A pool of
K >= N is the whole catalog once (Q = 1): the exact softmax again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class CandidateSet:
    """The item side of one training step: which items to embed and how rows and columns use them.

    items: candidates-style KJT of the K items to embed (item_id + attributes).
    positive_item: (M,) row of `items` holding each training row's positive.
    positive_ids: (M,) item id of each row's positive.
    positive_log_q: (M,) log Q of each positive (0 without correction).
    negative_item: (C,) row of `items` of each negative column.
    negative_ids: (C,) item id of each negative column.
    negative_log_q: (C,) log Q of each negative column.
    unique_negatives: every item occurs in at most one negative column (the
        positive's duplicates can then be masked by position).
    """

    items: KeyedJaggedTensor
    positive_item: torch.Tensor
    positive_ids: torch.Tensor
    positive_log_q: torch.Tensor
    negative_item: torch.Tensor
    negative_ids: torch.Tensor
    negative_log_q: torch.Tensor
    unique_negatives: bool


def log_q(logq_draw: torch.Tensor, in_batch_draws: int, uniform_draws: int, num_items: int, dedupe: bool) -> torch.Tensor:
    """log Q(j) of the module docstring for items with per-draw in-batch log-probabilities `logq_draw`.

    logq_draw: (C,) log p_j; in_batch_draws: M; uniform_draws: K; num_items: N.
    """
    if num_items <= 0:
        raise ValueError(f"log_q: num_items must be positive, got {num_items}")
    lp = logq_draw.to(torch.float64)
    if dedupe:
        # log(1 - (1 - p)^M (1 - 1/N)^K) = log(-expm1(M log1p(-p) + K log1p(-1/N)))
        uniform = torch.log1p(torch.tensor(-1.0 / num_items, dtype=torch.float64))
        a = in_batch_draws * torch.log1p(-lp.exp()) + uniform_draws * uniform
        out = torch.log(-torch.expm1(a))
    else:
        out = torch.log(in_batch_draws * lp.exp() + uniform_draws / num_items)
    return out.to(torch.float32)


def sampled_softmax_loss(
    queries: torch.Tensor, item_vecs: torch.Tensor, cands: CandidateSet, temperature: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of the module docstring.

    queries: (M, D) L2-normalized; item_vecs: (K, D) L2-normalized vectors of `cands.items`;
    temperature: scalar tensor; weights: (M,) or None (all ones). Returns a float32 scalar: the
    logits and the loss are computed in fp32 with autocast off, whatever dtype the towers ran in
    (cos / tau logits of +-20 in bf16 keep only ~3 significant digits).

    When every row's positive is itself one of the (unique) negative columns — same
    embedded row, same correction, as in-batch and full-catalog sets are built —
    masking that column and prepending the positive is the same as a plain
    cross-entropy over the columns with the positive's column as the target,
    which is what runs then (no (M, C) mask, no concatenation).
    """
    with torch.autocast(queries.device.type, enabled=False):  # logits and loss in fp32, whatever the towers ran in
        return _sampled_softmax_loss(queries.float(), item_vecs.float(), cands, temperature.float(), weights)


def _sampled_softmax_loss(
    queries: torch.Tensor, item_vecs: torch.Tensor, cands: CandidateSet, temperature: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    m = queries.shape[0]
    q = queries / temperature  # (M, D): the temperature folded into the queries, not the (M, C) logits
    neg_vec = item_vecs[cands.negative_item]  # (C, D)
    neg = _corrected_logits(q, neg_vec, cands.negative_log_q)  # (M, C) float32
    if cands.unique_negatives:
        col = _column_of(cands.positive_ids, cands.negative_ids)  # (M,), -1 when absent
        if bool((col >= 0).all()) and torch.equal(cands.negative_item[col], cands.positive_item) \
                and torch.equal(cands.negative_log_q[col], cands.positive_log_q):
            per_row = F.cross_entropy(neg, col, reduction="none")  # (M,)
            return _weighted_mean(per_row, weights)
        hit = col >= 0
        neg = neg.index_put((torch.arange(m, device=neg.device)[hit], col[hit]), torch.tensor(float("-inf")))
    else:
        neg = neg.masked_fill(cands.positive_ids[:, None] == cands.negative_ids[None, :], float("-inf"))
    pos_vec = item_vecs[cands.positive_item]  # (M, D)
    pos = (q.float() * pos_vec.float()).sum(-1) - cands.positive_log_q  # (M,)
    per_row = torch.logaddexp(pos, torch.logsumexp(neg, dim=1)) - pos  # (M,): no (M, C + 1) concatenation
    return _weighted_mean(per_row, weights)


def _corrected_logits(q: torch.Tensor, vecs: torch.Tensor, log_q_cols: torch.Tensor) -> torch.Tensor:
    """q @ vecs.T - log_q_cols as one matmul: [q, -1] @ [vecs, log_q]^T (no extra (M, C) pass)."""
    if not bool(log_q_cols.any()):
        return (q @ vecs.T).float()
    q1 = torch.cat([q, q.new_full((q.shape[0], 1), -1.0)], dim=1)  # (M, D+1)
    v1 = torch.cat([vecs, log_q_cols.to(vecs.dtype)[:, None]], dim=1)  # (C, D+1)
    return (q1 @ v1.T).float()


def _weighted_mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp(min=1e-12)


def _column_of(ids: torch.Tensor, unique_ids: torch.Tensor) -> torch.Tensor:
    """Index of each of `ids` in `unique_ids` (no duplicates), -1 when absent."""
    if unique_ids.numel() == 0:
        return torch.full_like(ids, -1)
    order = torch.argsort(unique_ids)
    sorted_ids = unique_ids[order]
    pos = torch.searchsorted(sorted_ids, ids).clamp(max=sorted_ids.numel() - 1)
    return torch.where(sorted_ids[pos] == ids, order[pos], torch.full_like(ids, -1))
