"""XXH64 of int64 ids in plain PyTorch: the id hash spec v1 of `features.hashing`.

For an 8-byte input XXH64 reduces to (all arithmetic mod 2**64, x = the id's
little-endian bytes read as a uint64)::

    h = seed + P5 + 8
    h ^= rotl(x * P2, 31) * P1
    h = rotl(h, 27) * P1 + P4
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32

torch has no uint64 shifts on CPU, so the state lives in int64: multiplication
and addition wrap the same way in two's complement, and a logical right shift
is an arithmetic shift with the sign-extended bits masked off.
"""
from __future__ import annotations

import torch

from features.hashing import P1, P2, P3, P4, P5

_MASK64 = (1 << 64) - 1


def as_int64(u: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    u &= _MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


_P1, _P2, _P3, _P4 = (as_int64(p) for p in (P1, P2, P3, P4))


def seed_state(seed: int) -> int:
    """h = seed + P5 + 8 (mod 2**64) as an int64: the part of XXH64 that depends on the seed only."""
    return as_int64(as_int64(seed) + P5 + 8)


def _shr(x: torch.Tensor, r: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of the int64 bits of x, written into `out`."""
    torch.bitwise_right_shift(x, r, out=out)
    return out.bitwise_and_((1 << (64 - r)) - 1)


def hash_ids(ids: torch.Tensor, seed: int, num_buckets: int | None = None) -> torch.Tensor:
    """XXH64(ids, seed) as int64 (same shape); with num_buckets, pmod into [0, num_buckets)."""
    h = ids.to(torch.int64).mul(_P2)  # x * P2, a fresh tensor updated in place below
    t = torch.empty_like(h)
    _shr(h, 33, t)
    h.bitwise_left_shift_(31).bitwise_or_(t)  # rotl(x * P2, 31)
    h.mul_(_P1).bitwise_xor_(seed_state(seed))  # h = (seed + P5 + 8) ^ (rotl(x * P2, 31) * P1)
    _shr(h, 37, t)
    h.bitwise_left_shift_(27).bitwise_or_(t).mul_(_P1).add_(_P4)  # h = rotl(h, 27) * P1 + P4
    h.bitwise_xor_(_shr(h, 33, t)).mul_(_P2)  # avalanche
    h.bitwise_xor_(_shr(h, 29, t)).mul_(_P3)
    h.bitwise_xor_(_shr(h, 32, t))
    if num_buckets is not None:
        h = torch.remainder(h, num_buckets)  # pmod (sign of the divisor), as Spark's pmod
    return h
