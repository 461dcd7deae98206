"""DARE top-K target attention with decoupled embeddings, in PyTorch.

Feng et al. 2024, "Long-Sequence Recommendation Models Need Decoupled
Embeddings" (DARE): each item has a small *attention* embedding, used only to
score (search) the behaviors, and a separate *representation* embedding, used
only in the aggregation. For candidate n of user u:

    s[n, l]  = scale * q_att[n] . k_att[l]                      l in rows(u)
    T[n]     = the top_k behaviors of u by s[n, .] (all of them if u has fewer)
    out[n]   = sum_{l in T[n]} softmax_{l in T[n]}(s[n, l]) v_rep[l]          (0 if u has no rows)

Gradients reach q_att and k_att only through the kept scores, and v_rep only
through the aggregation. Ties at the k-th score are broken by `torch.topk`
(unspecified order); the Triton kernel prefers the lower row on ties.

CPU path: the scores of one user are one matmul (many users: a padded
(B, C_max, L_max) bmm), a block-pruned `torch.topk` selects (`topk_rows`), and
the weighted sum of the kept representation rows is an ``embedding_bag`` with
per-sample weights, which never materializes the (N, K, Dv) gathered rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.reference._jagged import acc_dtype, candidate_slots, pad_rows, padded_rows


def topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row (values, columns), unsorted; same set as ``scores.topk(k)``.

    `torch.topk` costs several ns per element on CPU, several times the (N, L)
    scoring matmul, so long rows are pruned first. Split the first nb*b columns
    into nb strided blocks (block j = columns j, j+nb, j+2nb, ...), take each
    block's max (one cheap pass), keep the k blocks with the largest maxima and
    run the final topk on their k*b entries plus the < nb leftover columns.
    Exact: an entry x of the true top-k lies in a kept block, for otherwise k
    kept blocks would each hold a maximum >= x's block maximum >= x, i.e. k
    entries at least as large as x (ties at the k-th value may resolve
    differently, as with topk itself).
    """
    rows, width = scores.shape
    num_blocks = min(width // 2, max(k, 2 * math.isqrt(k * width)))
    if width < 2048 or num_blocks < k:
        return scores.topk(k, dim=1, sorted=False)
    per_block = width // num_blocks
    main = scores[:, : num_blocks * per_block].unflatten(1, (per_block, num_blocks))  # (R, b, nb)
    blocks = main.amax(1).topk(k, dim=1, sorted=False).indices  # (R, k)
    values = main.gather(2, blocks[:, None, :].expand(rows, per_block, k)).reshape(rows, per_block * k)
    columns = (torch.arange(per_block, device=scores.device)[None, :, None] * num_blocks
               + blocks[:, None, :]).reshape(rows, per_block * k)
    if num_blocks * per_block < width:  # leftover columns are always candidates
        values = torch.cat([values, scores[:, num_blocks * per_block:]], 1)
        rest = torch.arange(num_blocks * per_block, width, device=scores.device)
        columns = torch.cat([columns, rest.expand(rows, rest.numel())], 1)
    kept, idx = values.topk(k, dim=1, sorted=False)
    return kept, columns.gather(1, idx)


def topk_scores(
    q_att: torch.Tensor, k_att: torch.Tensor, offsets: torch.Tensor, cand_user: torch.Tensor, top_k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept scores (N, K'), their rows in k_att (N, K') and a validity mask (N, K'), K' = min(top_k, L_max).

    Invalid entries (the user has fewer than K' rows) have row 0 and score -inf.
    """
    num_users = offsets.numel() - 1
    lengths = offsets.diff()
    if num_users == 1:  # serving: one (N, L) matmul, every row valid
        scores = (q_att * scale) @ k_att.T  # (N, L)
        kept, pos = topk_rows(scores, min(top_k, scores.shape[1]))
        return kept, pos, torch.ones_like(pos, dtype=torch.bool)
    width = int(lengths.max())
    slot, c_max = candidate_slots(cand_user, num_users)
    qp = pad_rows(q_att * scale, cand_user, slot, num_users, c_max)  # (B, C_max, Da)
    kp = padded_rows(k_att, offsets, width)  # (B, L_max, Da)
    scores = torch.bmm(qp, kp.transpose(1, 2)).view(num_users * c_max, width)[cand_user * c_max + slot]  # (N, L_max)
    n_len = lengths[cand_user]  # (N,)
    scores = scores.masked_fill(torch.arange(width, device=scores.device)[None, :] >= n_len[:, None], float("-inf"))
    kept, pos = topk_rows(scores, min(top_k, width))  # (N, K')
    valid = pos < n_len[:, None]
    rows = torch.where(valid, offsets[:-1][cand_user][:, None] + pos, torch.zeros_like(pos))
    return kept, rows, valid


def dare_topk_attention(
    q_att: torch.Tensor,
    k_att: torch.Tensor,
    v_rep: torch.Tensor,
    offsets: torch.Tensor,
    cand_user: torch.Tensor,
    top_k: int,
    scale: float,
) -> torch.Tensor:
    """(N, Da), (L, Da), (L, Dv), (B+1,), (N,) -> (N, Dv) in q_att.dtype."""
    n, dv = q_att.shape[0], v_rep.shape[1]
    out_dtype, dtype = q_att.dtype, acc_dtype(q_att)
    q_att, k_att, v_rep = q_att.to(dtype), k_att.to(dtype), v_rep.to(dtype)
    if n == 0 or k_att.shape[0] == 0:
        return (q_att.new_zeros(n, dv) + 0 * q_att.sum()).to(out_dtype)  # q_att still gets a (zero) gradient
    kept, rows, valid = topk_scores(q_att, k_att, offsets, cand_user, top_k, scale)
    kept = kept.masked_fill(~valid, float("-inf"))
    top = kept.amax(1, keepdim=True)
    e = torch.exp(kept - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))  # invalid -> 0
    # Softmax over the kept scores. A row with a valid entry sums to >= 1 (its max gives exp(0)),
    # so clamping the denominator at 1 only turns rows without any valid entry into zeros.
    weights = e / e.sum(1, keepdim=True).clamp_min(1.0)  # (N, K')
    bags = torch.arange(0, rows.numel(), rows.shape[1], device=rows.device)
    out = F.embedding_bag(rows.reshape(-1), v_rep, bags, mode="sum", per_sample_weights=weights.reshape(-1))
    return out.to(out_dtype)
