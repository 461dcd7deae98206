"""SDIM aggregation by signature collision, and its precomputed (BSE) form for serving.

Cao et al. 2022, "Sampling Is All You Need on Modeling Long-Term User Behaviors
for CTR Prediction" (SDIM). Behaviors and candidates are SimHash-ed
(`kernels.simhash`) into m codes of tau bits. Candidate n of user u gathers,
per hash function j, the sum of u's behavior representations whose code equals
its own, L2-normalizes it and averages over the m hash functions:

    S[n, j] = sum_{l in rows(u), codes[l, j] == cand_codes[n, j]} values[l]
    out[n]  = (1/m) * sum_j S[n, j] / ||S[n, j]||          (an empty/zero S[n, j] counts as 0)

There is no softmax attention: the collision probability of SimHash already
weights behaviors by their angular similarity to the candidate.

Serving splits this in two (SDIM's "behavior sequence encoding" module):
`sdim_bucket_sums` runs when events arrive (per user, m x 2**tau sums of D
floats, kept as one value), and at request time only `gather_buckets` runs
(plus the candidates' `simhash`); ``gather_buckets(sdim_bucket_sums(...)) ==
collision_gather(...)``.
"""
from __future__ import annotations

import torch

from kernels import _dispatch as d
from kernels.reference import collision_gather as ref
from kernels.simhash import MAX_BITS

__all__ = ["collision_gather", "gather_buckets", "sdim_bucket_sums"]


def _code_range(op: str, **codes: torch.Tensor) -> int:
    """Checks that all codes are >= 0; returns max code + 1 (one host sync)."""
    stats = [s for c in codes.values() if c.numel() for s in (c.min(), c.max())]
    values = torch.stack(stats).tolist() if stats else []
    for i, name in enumerate(name for name, c in codes.items() if c.numel()):
        if values[2 * i] < 0:
            raise ValueError(f"{op}: {name} must be non-negative SimHash codes, got a minimum of {values[2 * i]}")
    return 1 + max(values[1::2], default=0)


def collision_gather(
    values: torch.Tensor,
    codes: torch.Tensor,
    offsets: torch.Tensor,
    cand_codes: torch.Tensor,
    cand_user: torch.Tensor,
    max_len: int,
    *,
    backend: d.Backend = "auto",
) -> torch.Tensor:
    """SDIM collision aggregation of each candidate over its user's jagged behaviors.

    Args:
        values: (L, D) float behavior representations of B users, user b in rows offsets[b]:offsets[b+1].
        codes: (L, m) int64 behavior SimHash codes (precomputed, e.g. unpacked from ``hist_sdim_sig``).
        offsets: (B+1,) int64.
        cand_codes: (N, m) int64 candidate SimHash codes.
        cand_user: (N,) int64 user index of each candidate (need not be sorted).
        max_len: the longest user's row count may not exceed this.
        backend: "auto" | "torch" | "triton".

    Returns:
        (N, D) in values.dtype (fp32 accumulation). Differentiable w.r.t. values.

    Example:
        >>> from kernels import make_hyperplanes, simhash
        >>> planes = make_hyperplanes(8, num_hashes=4, num_bits=2)
        >>> v = torch.randn(5, 8); c = torch.randn(2, 8)
        >>> collision_gather(v, simhash(v, planes, 2), torch.tensor([0, 5]), simhash(c, planes, 2),
        ...                  torch.tensor([0, 0]), max_len=5).shape
        torch.Size([2, 8])
    """
    op = "collision_gather"
    d.check_tensor(op, "values", values, 2, floating=True)
    num_rows = values.shape[0]
    codes = d.check_codes(op, "codes", codes, num_rows, None)
    m = codes.shape[1]
    if m == 0:
        raise ValueError(f"{op}: codes must have m >= 1 hash functions, got shape {tuple(codes.shape)}")
    cand_codes = d.check_codes(op, "cand_codes", cand_codes, None, m)
    device = d.check_same_device(op, values=values, codes=codes, offsets=offsets, cand_codes=cand_codes,
                                 cand_user=cand_user)
    offsets, cand_user = d.check_jagged(op, offsets, num_rows, "values", max_len, cand_user, cand_codes.shape[0])
    num_codes = _code_range(op, codes=codes, cand_codes=cand_codes)
    if (offsets.numel() - 1) * m * num_codes >= 1 << 62:
        raise ValueError(f"{op}: codes up to {num_codes - 1} with {offsets.numel() - 1} users x {m} hash functions "
                         "overflow the int64 bucket keys; SimHash codes have at most 2**tau values")
    if d.resolve_backend(op, backend, device) == "triton":
        return d.triton_module(op, "collision_gather").collision_gather(values, codes, offsets, cand_codes, cand_user)
    return ref.collision_gather(values, codes, offsets, cand_codes, cand_user, num_codes)


def sdim_bucket_sums(values: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, num_bits: int) -> torch.Tensor:
    """SDIM's behavior sequence encoding: each user's behavior sums per (hash function, code).

    ``sums[b, j, c] = sum_{l in rows(b), codes[l, j] == c} values[l]``. Computed when
    events arrive (and rebuilt when the representation embeddings change); adding
    one event is ``sums[b, j, codes[j]] += value`` for every j.

    Args:
        values: (L, D) float; codes: (L, m) int64 in [0, 2**num_bits); offsets: (B+1,) int64.
        num_bits: tau.

    Returns:
        (B, m, 2**num_bits, D) float32 (float64 for float64 values), on the device of values (torch ops,
        any device).
    """
    op = "sdim_bucket_sums"
    d.check_tensor(op, "values", values, 2, floating=True)
    codes = d.check_codes(op, "codes", codes, values.shape[0], None)
    d.check_int(op, "num_bits", num_bits, 1, MAX_BITS)
    if num_bits > 24:
        raise ValueError(f"{op}: num_bits={num_bits} would allocate 2**{num_bits} buckets per hash function; "
                         "SDIM uses small tau (<= 24)")
    d.check_same_device(op, values=values, codes=codes, offsets=offsets)
    offsets, _ = d.check_jagged(op, offsets, values.shape[0], "values", max_len=values.shape[0])
    hi = _code_range(op, codes=codes)
    if hi > 1 << num_bits:
        raise ValueError(f"{op}: codes must be < 2**num_bits = {1 << num_bits}, got a maximum of {hi - 1}")
    return ref.sdim_bucket_sums(values, codes, offsets, num_bits)


def gather_buckets(bucket_sums: torch.Tensor, cand_codes: torch.Tensor, cand_user: torch.Tensor) -> torch.Tensor:
    """The SDIM request-time path: out[n] = (1/m) sum_j normalize(bucket_sums[cand_user[n], j, cand_codes[n, j]]).

    Equals `collision_gather` on the behaviors the bucket sums were built from.

    Args:
        bucket_sums: (B, m, K, D) float from `sdim_bucket_sums` (K = 2**tau).
        cand_codes: (N, m) int64 in [0, K); cand_user: (N,) int64 in [0, B).

    Returns:
        (N, D) in bucket_sums.dtype.
    """
    op = "gather_buckets"
    d.check_tensor(op, "bucket_sums", bucket_sums, 4, floating=True)
    num_users, m, k, _ = bucket_sums.shape
    cand_codes = d.check_codes(op, "cand_codes", cand_codes, None, m)
    d.check_tensor(op, "cand_user", cand_user, 1, floating=False)
    d.check_dim(op, "cand_user", cand_user, 0, cand_codes.shape[0], "cand_codes.shape[0]")
    d.check_same_device(op, bucket_sums=bucket_sums, cand_codes=cand_codes, cand_user=cand_user)
    cand_user = cand_user.to(torch.int64)
    if cand_codes.numel():
        lo, hi, ulo, uhi = torch.stack([cand_codes.min(), cand_codes.max(), cand_user.min(), cand_user.max()]).tolist()
        if lo < 0 or hi >= k:
            raise ValueError(f"{op}: cand_codes must be in [0, {k}) (bucket_sums.shape[2]), got values in [{lo}, {hi}]")
        if ulo < 0 or uhi >= num_users:
            raise ValueError(f"{op}: cand_user must be in [0, {num_users}) (bucket_sums.shape[0]), "
                             f"got values in [{ulo}, {uhi}]")
    return ref.gather_buckets(bucket_sums, cand_codes, cand_user)
