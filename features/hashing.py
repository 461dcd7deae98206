"""The versioned, stable id hash (spec v1), shared by Spark, Triton and serving.

Train/serve skew from mismatched hashing is the classic two-stage bug, so the
spec is exactly one that Spark evaluates natively (no Python UDF) and that is
cheap in a GPU kernel: XXH64 (https://github.com/Cyan4973/xxHash, the 64-bit
variant), as Spark's built-in `xxhash64` computes it.

Spec v1
-------
* ``hash_raw_id(s)``: a raw string id -> int64 = XXH64(utf8(s), seed=42),
  read as a signed two's-complement int64. Spark: ``xxhash64(col)`` on a
  string column.
* ``feature_seed(f)``: the per-feature seed = ``hash_raw_id(f)``, so every
  feature (table) gets an independent hash of the same ids.
* ``hash_ids(ids, f)``: int64 ids -> int64 = XXH64(little-endian 8 bytes of
  id, seed=feature_seed(f)). Spark: ``xxhash64(lit(f), col)`` on a long column
  (Spark chains the seed through its arguments, starting from 42).
* ``hash_strings(values, f)``: strings -> int64 = XXH64(utf8(v), seed=feature_seed(f)).
  Spark: ``xxhash64(lit(f), col)`` on a string column.
* ``bucketize(ids, f, num_buckets)``: ``pmod(hash_ids(ids, f), num_buckets)``,
  a non-negative row index into an embedding table of ``num_buckets`` rows.
  Spark: ``pmod(xxhash64(lit(f), col), lit(num_buckets))``.

For an 8-byte input XXH64 reduces to (all arithmetic mod 2**64)::

    h = seed + P5 + 8
    h ^= rotl(x * P2, 31) * P1
    h = rotl(h, 27) * P1 + P4
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32

`GOLDEN_VECTORS` pins values of every function; tests check them here, in
Spark, in the Triton kernel and in serving. Changing anything here requires a
new `HASH_SPEC_VERSION` (and rebuilding every table hashed with the old one).
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

import numpy as np
import xxhash

HASH_SPEC_VERSION = 1
SPARK_SEED = 42

P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
P3 = 0x165667B19E3779F9
P4 = 0x85EBCA77C2B2AE63
P5 = 0x27D4EB2F165667C5
_MASK = (1 << 64) - 1


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


def _unsigned(s: int) -> int:
    return s & _MASK


def hash_raw_id(raw: str | bytes) -> int:
    """A raw (string) id -> its canonical int64 id. Spark: ``xxhash64(col)``."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    return _signed(xxhash.xxh64_intdigest(data, SPARK_SEED))


@functools.lru_cache(maxsize=4096)
def feature_seed(feature: str) -> int:
    """The XXH64 seed for a feature name (signed int64). Spark: ``xxhash64(lit(feature))``."""
    return hash_raw_id(feature)


def hash_int64_scalar(x: int, seed: int) -> int:
    """XXH64 of one int64 (little-endian bytes) with a signed int64 seed; pure Python."""
    h = (_unsigned(seed) + P5 + 8) & _MASK
    k = (_unsigned(x) * P2) & _MASK
    k = ((k << 31) | (k >> 33)) & _MASK
    h ^= (k * P1) & _MASK
    h = ((((h << 27) | (h >> 37)) & _MASK) * P1 + P4) & _MASK
    h ^= h >> 33
    h = (h * P2) & _MASK
    h ^= h >> 29
    h = (h * P3) & _MASK
    h ^= h >> 32
    return _signed(h)


_U = np.uint64
_P1, _P2, _P3, _P4 = _U(P1), _U(P2), _U(P3), _U(P4)
_S = {r: _U(r) for r in (27, 29, 31, 32, 33, 37)}


def hash_int64(ids: np.ndarray | Sequence[int], seed: int) -> np.ndarray:
    """Vectorized XXH64 of int64 ids with a signed int64 seed -> int64 array (same shape).

    In place on one working array (a request hashes a few arrays of 10^2-10^4 ids, where the ufunc calls and
    temporaries are the cost): h = seed + P5 + 8 ^ rotl(x * P2, 31) * P1, then the round and the avalanche.
    """
    x = np.asarray(ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        k = np.multiply(x, _P2, out=np.empty_like(x))  # the working array (0-d stays an array)
        t = k << _S[31]
        k >>= _S[33]
        k |= t  # rotl(x * P2, 31)
        k *= _P1
        k ^= _U((_unsigned(seed) + P5 + 8) & _MASK)  # h ^= ..., h starting at seed + P5 + 8
        t = k << _S[27]
        k >>= _S[37]
        k |= t  # rotl(h, 27)
        k *= _P1
        k += _P4
        for shift, prime in ((33, _P2), (29, _P3)):
            k ^= k >> _S[shift]
            k *= prime
        k ^= k >> _S[32]
    return k.view(np.int64)


def hash_ids(ids: np.ndarray | Sequence[int], feature: str) -> np.ndarray:
    """int64 ids -> per-feature int64 hashes. Spark: ``xxhash64(lit(feature), col)``."""
    return hash_int64(ids, feature_seed(feature))


def hash_strings(values: Iterable[str], feature: str) -> np.ndarray:
    """Strings -> per-feature int64 hashes. Spark: ``xxhash64(lit(feature), col)``."""
    seed = _unsigned(feature_seed(feature))
    return np.fromiter(
        (_signed(xxhash.xxh64_intdigest(v.encode("utf-8"), seed)) for v in values), dtype=np.int64
    )


def hash_string(value: str, feature: str) -> int:
    return _signed(xxhash.xxh64_intdigest(value.encode("utf-8"), _unsigned(feature_seed(feature))))


def bucketize(ids: np.ndarray | Sequence[int], feature: str, num_buckets: int) -> np.ndarray:
    """Row index in [0, num_buckets) of each id. Spark: ``pmod(xxhash64(lit(f), col), B)``."""
    if num_buckets <= 0:
        raise ValueError(f"num_buckets must be positive, got {num_buckets}")
    return np.mod(hash_ids(ids, feature), np.int64(num_buckets))


# (function, args, expected int64). Computed from the reference XXH64
# implementation (the `xxhash` package) and cross-checked in Spark
# (tests/features/spark/test_hash_parity.py) and in the Triton kernel.
GOLDEN_VECTORS: dict[str, list[tuple[tuple, int]]] = {
    "hash_raw_id": [
        (("",), -7444071767201028348),
        (("a",), -8582455328737087284),
        (("user_1",), -3646315564788601860),
        (("movie:2571",), 1011235636547108690),
        (("\u03a9mega",), -8559835747247258127),
    ],
    "feature_seed": [
        (("item_id",), -892453169267845759),
        (("user_id",), -856871991199510782),
        (("category",), 3015339192848694529),
    ],
    "hash_ids": [
        ((0, "item_id"), -5749763751643041021),
        ((1, "item_id"), -2632584314389342354),
        ((-1, "item_id"), 5833846823308592575),
        ((42, "item_id"), 2878889868401335946),
        ((3952, "item_id"), -4817757351817938770),
        ((2**31, "item_id"), 7016142446897115666),
        ((2**63 - 1, "item_id"), 1548247612028248040),
        ((-(2**63), "item_id"), -9152165504070227039),
        ((123456789012345, "item_id"), -3090320860416582246),
    ],
    "hash_strings": [
        (("Comedy", "category"), -8223798983986174670),
        (("Sci-Fi", "category"), -6029584950780454748),
        (("Film-Noir", "category"), 2589160229005563645),
    ],
    "bucketize": [
        ((0, "item_id", 1000), 979),
        ((0, "item_id", 2**20), 406275),
        ((1, "item_id", 1000), 646),
        ((1, "item_id", 2**20), 972654),
        ((-1, "item_id", 1000), 575),
        ((-1, "item_id", 2**20), 624063),
        ((3952, "item_id", 1000), 230),
        ((3952, "item_id", 2**20), 882862),
        ((2**63 - 1, "item_id", 1000), 40),
        ((2**63 - 1, "item_id", 2**20), 679912),
    ],
}
