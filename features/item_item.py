"""An item-item model over whole histories (EASE), for the second stage to read beside the retriever.

The retriever reads a user's last behaviors through causal attention; the context counts read
the last few. `ItemItem` is a different view: EASE (Steck, "Embarrassingly Shallow Autoencoders
for Sparse Data", WWW 2019), a ridge regression of every item's column of the binary user x item
matrix X on every other item's, solved in closed form:

    P = (X'X + lambda I)^-1,    B = I - P diag(1 / diag P)      (so diag B = 0)

and a request's score of candidate c is sum over the distinct items j of its history of B[j, c].

Only each candidate's `k` largest-magnitude weights are kept (`neighbors`, `weights`: (I, k)), so
the artifact is I x k rather than I x I and a request costs N x k lookups; `k = I - 1` keeps B
whole. Fit it on exactly what the lists' retriever trained on (point in time, like the counts):
the item set and X then carry no event the lists' targets could leak through.

    model = ItemItem.fit(offsets, item_ids, visible_len, lam=500.0, k=256)
    scores = model.scores(recent, candidates)        # (R, N) float32; recent (R, H), -1 = padding
    feats = model.list_features(recent, lists)       # (R * N, 2) the second stage's columns

The second stage reads it per candidate of a retrieved list (`ITEM_ITEM_FEATURE_NAMES`, float32):

    item_item_score    the candidate's score from the request's last behaviors
    item_item_gap      that score minus the best score in the candidate's list (<= 0)

The scores alone rank the retriever's lists poorly; what they add is a second opinion,
built differently, on the candidates the retriever already put close together.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.jagged import segment_indices

ITEM_ITEM_FEATURE_NAMES: tuple[str, ...] = ("item_item_score", "item_item_gap")
# the longest window of behaviors the features read: the server keeps up to `features.sequence.SequenceConfig.long_cap`
# (10,000 by default), and a request allocates for the window
MAX_HISTORY = 10_000
MAX_DENSE_ITEMS = 40_000  # X'X is I x I float64: 12.8 GB at this size; refuse larger catalogs


@dataclass(frozen=True)
class ItemItem:
    item_ids: np.ndarray  # (I,) int64 sorted unique: the catalog the model was fitted on
    neighbors: np.ndarray  # (I, k) int32: for candidate index c, the history item indices j it reads
    weights: np.ndarray  # (I, k) float32: B[j, c] for those j
    lam: float

    @classmethod
    def fit(cls, offsets: np.ndarray, item_ids: np.ndarray, visible_len: np.ndarray, lam: float = 500.0,
            k: int = 256) -> "ItemItem":
        """EASE over timeline rows: row u's behaviors are item_ids[offsets[u]:offsets[u] + visible_len[u]];
        `k` weights kept per candidate (k <= 0: all I - 1)."""
        if lam <= 0:
            raise ValueError(f"ItemItem.fit: lam must be positive, got {lam}")
        offsets, visible_len = np.asarray(offsets, np.int64), np.asarray(visible_len, np.int64)
        if offsets.shape != visible_len.shape or (visible_len < 0).any():
            raise ValueError(f"ItemItem.fit: offsets {offsets.shape} and visible_len {visible_len.shape} must match "
                             "and be non-negative")
        row_of = np.repeat(np.arange(len(offsets)), visible_len)
        seen = np.asarray(item_ids, np.int64)[segment_indices(offsets, visible_len)]
        catalog, col_of = np.unique(seen, return_inverse=True)
        if len(catalog) < 2:
            raise ValueError(f"ItemItem.fit: {len(catalog)} distinct items in the visible behaviors; need at least 2")
        if len(catalog) > MAX_DENSE_ITEMS:
            raise ValueError(f"ItemItem.fit: {len(catalog):,} items; the closed form needs an I x I matrix, so at most "
                             f"{MAX_DENSE_ITEMS:,} (fit over the most frequent items)")
        x = np.zeros((len(offsets), len(catalog)), np.float32)
        x[row_of, col_of] = 1.0
        g = (x.T @ x).astype(np.float64)
        g[np.diag_indices_from(g)] += lam
        p = np.linalg.inv(g)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        k = len(catalog) - 1 if k <= 0 else min(int(k), len(catalog) - 1)
        # per candidate column c the k weights of largest magnitude; the diagonal (0) sorts last, never kept
        mag = np.abs(b)
        np.fill_diagonal(mag, -1.0)
        top = np.argpartition(-mag, k - 1, axis=0)[:k].T  # (I, k): history indices j for candidate c
        w = np.take_along_axis(b.T, top, 1)
        return cls(catalog, top.astype(np.int32), w.astype(np.float32), float(lam))

    @property
    def k(self) -> int:
        return int(self.neighbors.shape[1])

    def index(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Catalog indices of `items` (any shape) and whether each is in the catalog."""
        items = np.asarray(items, np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, items), len(self.item_ids) - 1)
        return pos, self.item_ids[pos] == items

    def scores(self, recent: np.ndarray, candidates: np.ndarray, chunk: int = 256) -> np.ndarray:
        """(R, N) float32: for every candidate, the sum of B[j, c] over the distinct catalog items j of its row of
        `recent` (R, H) (-1 and unknown ids are ignored). A candidate outside the catalog scores 0."""
        recent, candidates = np.asarray(recent, np.int64), np.asarray(candidates, np.int64)
        if candidates.ndim != 2 or recent.ndim != 2 or recent.shape[0] != candidates.shape[0]:
            raise ValueError(f"ItemItem.scores: recent {recent.shape} and candidates {candidates.shape} must be "
                             "(R, H) and (R, N)")
        out = np.zeros(candidates.shape, np.float32)
        n_items = len(self.item_ids)
        for s in range(0, len(candidates), chunk):
            rec, cand = recent[s:s + chunk], candidates[s:s + chunk]
            rows = np.arange(len(cand))
            h_idx, h_ok = self.index(rec)
            h_ok &= rec >= 0
            seen = np.zeros((len(cand), n_items), bool)  # the distinct catalog items of each request's history
            seen[np.broadcast_to(rows[:, None], rec.shape)[h_ok], h_idx[h_ok]] = True
            c_idx, c_ok = self.index(cand)
            hit = seen[rows[:, None, None], self.neighbors[c_idx]]  # (r, N, k)
            out[s:s + chunk] = np.where(c_ok, (self.weights[c_idx] * hit).sum(-1, dtype=np.float32), 0.0)
        return out

    def list_features(self, recent: np.ndarray, lists: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """(R * N, 2) float32 `ITEM_ITEM_FEATURE_NAMES` of the (R, N) `lists` (best first) for the requests' last
        behaviors `recent` (R, H), row-major (request, candidate); with `columns` (R, W) only those list positions
        (the gap still reads the whole list)."""
        score = self.scores(recent, lists)
        gap = score - (score.max(1, keepdims=True) if score.shape[1] else score)
        if columns is not None:
            score, gap = np.take_along_axis(score, columns, 1), np.take_along_axis(gap, columns, 1)
        return np.stack([score, gap], -1).reshape(-1, len(ITEM_ITEM_FEATURE_NAMES)).astype(np.float32, copy=False)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, item_ids=self.item_ids, neighbors=self.neighbors, weights=self.weights,
                 lam=np.array([self.lam]))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ItemItem":
        """Load and check a saved model: a bad file raises ValueError naming what is wrong, never a later crash."""
        try:  # whatever the bytes are (a zip that lies, a plain .npy, a pickle), reading ends in ValueError
            z = np.load(Path(path), allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError(f"an .npy array of shape {getattr(z, 'shape', '?')}, not an .npz archive")
            with z:
                ids, nb, w, lam = (np.asarray(z[name]) for name in ("item_ids", "neighbors", "weights", "lam"))
        except Exception as e:  # noqa: BLE001 - every way a file can fail to parse is the same error to the caller
            raise ValueError(f"{path}: not an item-item model ({type(e).__name__}: {e})") from e
        if ids.dtype != np.int64 or ids.ndim != 1 or len(ids) < 2 or (np.diff(ids) <= 0).any():
            raise ValueError(f"{path}: item_ids must be sorted unique int64 of at least 2 items")
        if nb.dtype != np.int32 or w.dtype != np.float32 or nb.ndim != 2 or nb.shape != w.shape \
                or nb.shape[0] != len(ids) or nb.shape[1] < 1:
            raise ValueError(f"{path}: neighbors {nb.dtype}{nb.shape} and weights {w.dtype}{w.shape} must be "
                             f"int32 / float32 of shape ({len(ids)}, k)")
        if nb.size and (nb.min() < 0 or nb.max() >= len(ids)):
            raise ValueError(f"{path}: neighbor indices outside [0, {len(ids)})")
        if not np.isfinite(w).all() or lam.shape != (1,) or lam.dtype.kind != "f" or not np.isfinite(lam).all() \
                or float(lam[0]) <= 0:
            raise ValueError(f"{path}: weights and lam must be finite (lam > 0)")
        return cls(ids, nb, w, float(lam[0]))
