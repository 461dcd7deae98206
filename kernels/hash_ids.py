"""Stable id hashing for the GPU feature path: XXH64 exactly as `features.hashing` (spec v1).

Bit-exact with `features.hashing.hash_int64` / ``bucketize`` and with Spark's
``xxhash64``: the golden vectors in `features.hashing.GOLDEN_VECTORS` are
checked against every backend (tests/kernels/test_hash_ids.py).
"""
from __future__ import annotations

import numpy as np
import torch

from features.hashing import HASH_SPEC_VERSION, feature_seed, hash_int64
from kernels import _dispatch as d
from kernels.reference import hash_ids as ref

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

__all__ = ["HASH_SPEC_VERSION", "bucketize", "hash_ids"]


def hash_ids(
    ids: torch.Tensor, seed: int, num_buckets: int | None = None, *, backend: d.Backend = "auto"
) -> torch.Tensor:
    """XXH64 of each int64 id (its little-endian 8 bytes) with a signed int64 seed.

    Same semantics as `features.hashing.hash_int64(ids, seed)`; with `num_buckets`,
    ``pmod(hash, num_buckets)`` in [0, num_buckets) as Spark's ``pmod``.

    Args:
        ids: integer tensor of any shape (values are read as int64).
        seed: signed int64 seed, e.g. ``features.hashing.feature_seed("item_id")``.
        num_buckets: optional positive table size.
        backend: "auto" | "torch" | "triton" (see `kernels._dispatch`); "auto" runs CPU tensors through
            numpy (`features.hashing.hash_int64`), "torch" through the int64 emulation in plain torch ops.

    Returns:
        int64 tensor of the shape of `ids`, on its device.

    Example:
        >>> hash_ids(torch.tensor([0, 1]), feature_seed("item_id"), 1000).tolist()
        [979, 646]
    """
    op = "hash_ids"
    d.check_tensor(op, "ids", ids, None, floating=False)
    d.check_int(op, "seed", seed, _INT64_MIN, _INT64_MAX)
    if num_buckets is not None:
        d.check_int(op, "num_buckets", num_buckets, 1, _INT64_MAX)
    if d.resolve_backend(op, backend, ids.device) == "triton":
        return d.triton_module(op, "hash_ids").hash_ids(ids, seed, num_buckets)
    if backend == "auto" and ids.device.type == "cpu":
        # numpy's uint64 arithmetic is the spec itself (`features.hashing.hash_int64`) in fewer, cheaper ops
        # than the int64 emulation: about half the time per call on the small arrays a request hashes
        h = hash_int64(ids.to(torch.int64).numpy(), seed)
        return torch.from_numpy(h if num_buckets is None else np.mod(h, np.int64(num_buckets)))
    return ref.hash_ids(ids, seed, num_buckets)


def bucketize(ids: torch.Tensor, feature: str, num_buckets: int, *, backend: d.Backend = "auto") -> torch.Tensor:
    """Embedding-table row of each id: ``pmod(xxhash64(feature, id), num_buckets)``.

    Equals `features.hashing.bucketize(ids, feature, num_buckets)` and Spark's
    ``pmod(xxhash64(lit(feature), col), lit(num_buckets))``.
    """
    if not isinstance(feature, str) or not feature:
        raise ValueError(f"bucketize: feature must be a non-empty feature name, got {feature!r}")
    if not isinstance(num_buckets, int) or isinstance(num_buckets, bool) or num_buckets <= 0:
        raise ValueError(f"bucketize: num_buckets must be a positive int, got {num_buckets!r}")
    return hash_ids(ids, feature_seed(feature), num_buckets, backend=backend)
