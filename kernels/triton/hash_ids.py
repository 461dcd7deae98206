"""XXH64 of int64 ids as a Triton kernel (id hash spec v1, `features.hashing`).

One program hashes BLOCK ids; the state is uint64, so multiplication wraps mod
2**64 and ``>>`` is a logical shift, exactly as the spec is written::

    h = seed + P5 + 8
    h ^= rotl(x * P2, 31) * P1
    h = rotl(h, 27) * P1 + P4
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32
    (optionally) pmod(h as int64, num_buckets)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference.hash_ids import seed_state

_BLOCK = 1024


@triton.jit
def _rotl(x, r: tl.constexpr):
    return (x << r) | (x >> (64 - r))


@triton.jit
def _xxh64_int64_kernel(
    ids_ptr, out_ptr, state_ptr, num_buckets, n,
    HAS_BUCKETS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
    h = tl.load(state_ptr).to(tl.uint64, bitcast=True)  # seed + P5 + 8, computed on the host
    h ^= _rotl(x * 0xC2B2AE3D27D4EB4F, 31) * 0x9E3779B185EBCA87  # rotl(x * P2, 31) * P1
    h = _rotl(h, 27) * 0x9E3779B185EBCA87 + 0x85EBCA77C2B2AE63  # rotl(h, 27) * P1 + P4
    h ^= h >> 33
    h *= 0xC2B2AE3D27D4EB4F  # P2
    h ^= h >> 29
    h *= 0x165667B19E3779F9  # P3
    h ^= h >> 32
    out = h.to(tl.int64, bitcast=True)
    if HAS_BUCKETS:
        r = out % num_buckets
        out = tl.where(r < 0, r + num_buckets, r)  # pmod whatever the sign convention of %
    tl.store(out_ptr + offs, out, mask=mask)


def hash_ids(ids: torch.Tensor, seed: int, num_buckets: int | None = None) -> torch.Tensor:
    flat = ids.to(torch.int64).contiguous().view(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        state = torch.tensor([seed_state(seed)], dtype=torch.int64, device=flat.device)
        grid = (triton.cdiv(n, _BLOCK),)
        _xxh64_int64_kernel[grid](
            flat, out, state, int(num_buckets or 1), n,
            HAS_BUCKETS=num_buckets is not None, BLOCK=_BLOCK,
        )
    return out.view(ids.shape)
