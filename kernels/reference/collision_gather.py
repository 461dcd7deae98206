"""SDIM signature-collision aggregation in plain PyTorch (the CPU path).

Cao et al. 2022, "Sampling Is All You Need on Modeling Long-Term User Behaviors
for CTR Prediction" (SDIM): with m hash functions, candidate n of
user u gathers, per hash function j, the behaviors of u whose signature equals
its own, L2-normalizes their sum and averages over j:

    S[n, j] = sum_{l in rows(u), codes[l, j] == cand_codes[n, j]} values[l]      (D,)
    out[n]  = (1/m) * sum_j S[n, j] / ||S[n, j]||                                 (D,)

An empty (or zero) S[n, j] contributes 0 and passes no gradient.

A bucket (u, j, c) is the set of behaviors of u with code c in hash function j.
The sums per bucket do not depend on the candidate, which is SDIM's
"behavior sequence encoding" (BSE): `sdim_bucket_sums` computes them when events
arrive and `gather_buckets` is all that is left at request time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference._jagged import acc_dtype, row_users

# Above this many possible (user, hash function, code) buckets the bucket -> slot map is
# a sorted search instead of a dense lookup table.
_DENSE_TABLE_LIMIT = 1 << 22


def safe_l2_normalize(s: torch.Tensor) -> torch.Tensor:
    """s / ||s|| over the last dim; rows with ||s|| == 0 stay 0 and get no gradient."""
    norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    positive = norm > 0
    inv = torch.where(positive, 1.0 / torch.where(positive, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return s * inv


def sdim_bucket_sums(values: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(L, D), (L, m), (B+1,) -> (B, m, 2**tau, D): each user's behavior sums per bucket (fp32 or fp64)."""
    num_rows, dim = values.shape
    num_users, m, k = offsets.numel() - 1, codes.shape[1], 1 << num_bits
    v = values.to(acc_dtype(values))
    sums = v.new_zeros(num_users * m * k, dim)
    base = row_users(offsets, num_rows) * (m * k)  # (L,)
    for j in range(m):  # m index_adds of the (L, D) values: no (L*m, D) copy
        sums.index_add_(0, base + j * k + codes[:, j], v)
    return sums.view(num_users, m, k, dim)


def gather_buckets(bucket_sums: torch.Tensor, cand_codes: torch.Tensor, cand_user: torch.Tensor) -> torch.Tensor:
    """(B, m, K, D) bucket sums, (N, m) codes, (N,) users -> (N, D): normalize, gather, mean over m."""
    num_users, m, k, dim = bucket_sums.shape
    n = cand_codes.shape[0]
    unit = safe_l2_normalize(bucket_sums.reshape(num_users * m * k, dim).to(acc_dtype(bucket_sums)))
    slots = (cand_user[:, None] * m + torch.arange(m, device=cand_codes.device)) * k + cand_codes  # (N, m)
    bags = torch.arange(0, n * m, m, device=cand_codes.device)
    out = F.embedding_bag(slots.reshape(-1), unit, bags, mode="mean")  # (N, D), no (N, m, D) gather
    return out.to(bucket_sums.dtype)


def collision_gather(
    values: torch.Tensor,
    codes: torch.Tensor,
    offsets: torch.Tensor,
    cand_codes: torch.Tensor,
    cand_user: torch.Tensor,
    num_codes: int | None = None,
) -> torch.Tensor:
    """(L, D), (L, m), (B+1,), (N, m), (N,) -> (N, D) in values.dtype (fp32 accumulation).

    Only the buckets some candidate asks for are summed: candidate keys (u, j, c)
    are made unique into U slots, every behavior (l, j) is mapped to its slot (or
    to a spill slot U), and m index_adds of the values fill the (U+1, D) sums.
    `num_codes` is an upper bound on the codes (max code + 1), computed if None.
    """
    num_rows, dim = values.shape
    n, m = cand_codes.shape
    num_users = offsets.numel() - 1
    device = values.device
    if n == 0:
        return values.new_zeros(0, dim)
    if num_codes is None:
        num_codes = 1 + int(torch.cat([codes.reshape(-1), cand_codes.reshape(-1)]).max())
    j = torch.arange(m, device=device)
    cand_key = (cand_user[:, None] * m + j) * num_codes + cand_codes  # (N, m)
    keys, slot_of_cand = torch.unique(cand_key, return_inverse=True)  # (U,), (N, m)
    num_slots = keys.numel()
    beh_key = (row_users(offsets, num_rows)[:, None] * m + j) * num_codes + codes  # (L, m)
    if num_users * m * num_codes <= _DENSE_TABLE_LIMIT:
        table = torch.full((num_users * m * num_codes,), num_slots, dtype=torch.int64, device=device)
        table[keys] = torch.arange(num_slots, device=device)
        slot_of_beh = table[beh_key]  # (L, m)
    else:
        pos = torch.searchsorted(keys, beh_key).clamp_max_(num_slots - 1)
        slot_of_beh = torch.where(keys[pos] == beh_key, pos, num_slots)
    v = values.to(acc_dtype(values))
    sums = v.new_zeros(num_slots + 1, dim)  # the last row collects behaviors no candidate asks for
    for jj in range(m):  # m index_adds of the (L, D) values: no (L*m, D) copy
        sums.index_add_(0, slot_of_beh[:, jj], v)
    unit = safe_l2_normalize(sums[:num_slots])  # (U, D)
    bags = torch.arange(0, n * m, m, device=device)
    out = F.embedding_bag(slot_of_cand.reshape(-1), unit, bags, mode="mean")  # (N, D)
    return out.to(values.dtype)
