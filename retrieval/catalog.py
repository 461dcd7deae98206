"""The item catalog the retriever ranks against, and row operations on candidates-style KJTs.

A `Catalog` is every item that can be retrieved: sorted canonical ids, their
features as one candidates-style `KeyedJaggedTensor` (item_id + attribute keys,
the layout of `Batch.candidates`), and each item's training-target log
probability (logq, for the sampling-bias correction of uniform negatives).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.batch import ITEM_ID
from features.jagged import segment_rows


def select_rows(kjt: KeyedJaggedTensor, rows: torch.Tensor, keys: Sequence[str] | None = None) -> KeyedJaggedTensor:
    """The rows `rows` (any order, repeats allowed) of every key in `keys` (default: all)."""
    keys = list(kjt.keys()) if keys is None else list(keys)
    rows = rows.to(torch.int64)
    values, lengths = [], []
    for key in keys:
        jt = kjt[key]
        ln = jt.lengths().to(torch.int64)[rows]
        start = jt.offsets().to(torch.int64)[rows]
        values.append(jt.values()[segment_rows(start, ln)])
        lengths.append(ln)
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64),
                             lengths=torch.cat(lengths) if lengths else torch.empty(0, dtype=torch.int64),
                             stride=int(rows.numel()))


@dataclass(frozen=True)
class Catalog:
    """item_ids (N,) sorted unique; features: stride-N KJT in that order; logq (N,) float32."""

    item_ids: np.ndarray
    features: KeyedJaggedTensor
    logq: torch.Tensor

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def ids(self) -> torch.Tensor:
        return torch.from_numpy(self.item_ids)

    def rows_of(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Catalog row of each id; raises ValueError naming an unknown id."""
        a = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, np.int64)
        pos = np.searchsorted(self.item_ids, a).clip(max=max(len(self) - 1, 0))
        bad = self.item_ids[pos] != a if len(self) else np.ones(a.shape, bool)
        if bad.any():
            raise ValueError(f"item {int(a[np.flatnonzero(bad)[0]])} is not in the catalog ({len(self)} items)")
        return torch.from_numpy(pos.astype(np.int64))

    def select(self, rows: torch.Tensor, keys: Sequence[str] | None = None) -> KeyedJaggedTensor:
        return select_rows(self.features, rows, keys)

    def keys(self) -> list[str]:
        return list(self.features.keys())


def validate_catalog(c: Catalog) -> Catalog:
    """Checks the catalog's invariants; raises ValueError naming what is wrong."""
    n = len(c)
    if c.item_ids.dtype != np.int64 or c.item_ids.ndim != 1:
        raise ValueError(f"catalog.item_ids must be 1-D int64, got {c.item_ids.dtype} {c.item_ids.shape}")
    if n > 1 and not (np.diff(c.item_ids) > 0).all():
        raise ValueError("catalog.item_ids must be sorted and unique")
    if ITEM_ID not in c.features.keys():
        raise ValueError(f"catalog.features lacks {ITEM_ID!r} (keys {c.features.keys()})")
    if c.features.stride() != n:
        raise ValueError(f"catalog.features has stride {c.features.stride()}, expected {n} items")
    if not np.array_equal(c.features[ITEM_ID].values().numpy(), c.item_ids):
        raise ValueError("catalog.features item_id values are not the catalog's ids in order")
    if tuple(c.logq.shape) != (n,) or not bool(torch.isfinite(c.logq).all()) or bool((c.logq > 0).any()):
        raise ValueError(f"catalog.logq must be ({n},) finite log-probabilities (<= 0)")
    return c
