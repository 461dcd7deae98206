"""The serving-side ANN index: the retriever's index plus the items added since it was exported.

The retriever's own index (faiss, exported with the model) is immutable; items
arriving on the `items` topic go to a small exact delta index (inner product
over L2-normalized vectors, the same similarity). A search asks both and merges
the two top-k lists. Adding items builds a new delta and swaps one reference,
so searches never see a half-built index and never take a lock.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Searchable(Protocol):
    item_ids: np.ndarray  # (N,) the items the base index holds

    def search(self, user_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) float32 -> (ids (B, k) int64, scores (B, k) float32), best first; missing = id -1."""
        ...


@dataclass(frozen=True)
class _Delta:
    ids: np.ndarray  # (M,) int64
    vecs: np.ndarray  # (M, D) float32


class ItemIndex:
    def __init__(self, base: Searchable, dim: int) -> None:
        self.base = base
        self.dim = dim
        self._delta = _Delta(np.empty(0, np.int64), np.empty((0, dim), np.float32))

    def __len__(self) -> int:
        return int(len(self.base.item_ids) + len(self._delta.ids))

    @property
    def added_ids(self) -> np.ndarray:
        return self._delta.ids

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, self.base.item_ids) | np.isin(ids, self._delta.ids)

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Adds (or replaces) items: ids (M,), vecs (M, D) L2-normalized."""
        ids = np.asarray(ids, np.int64)
        vecs = np.asarray(vecs, np.float32)
        if vecs.shape != (len(ids), self.dim):
            raise ValueError(f"index add: vecs has shape {vecs.shape}, expected ({len(ids)}, {self.dim})")
        if not np.isfinite(vecs).all():
            raise ValueError("index add: vectors contain NaN/inf")
        d = self._delta
        keep = ~np.isin(d.ids, ids)
        self._delta = _Delta(np.concatenate([d.ids[keep], ids]), np.concatenate([d.vecs[keep], vecs]))

    def search(self, user_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) -> (ids (B, k'), scores (B, k')), k' <= k, best first."""
        q = np.ascontiguousarray(user_vecs, np.float32)
        ids, scores = self.base.search(q, k)
        d = self._delta
        if len(d.ids) == 0:
            return ids, scores
        ds = q @ d.vecs.T  # (B, M)
        # a delta item replaces a base item with the same id
        base_ok = ~np.isin(ids, d.ids) & (ids >= 0)
        scores = np.where(base_ok, scores, -np.inf)
        all_ids = np.concatenate([ids, np.broadcast_to(d.ids, (q.shape[0], len(d.ids)))], axis=1)
        all_sc = np.concatenate([scores, ds], axis=1)
        kk = min(k, all_ids.shape[1])
        top = np.argsort(-all_sc, axis=1, kind="stable")[:, :kk]
        out_ids = np.take_along_axis(all_ids, top, 1)
        out_sc = np.take_along_axis(all_sc, top, 1)
        out_ids = np.where(np.isfinite(out_sc), out_ids, -1)
        return out_ids, out_sc.astype(np.float32)
