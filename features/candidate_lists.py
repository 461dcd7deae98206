"""The first stage's candidate lists, and the features the second stage reads off them.

A *candidate list* is what the retriever answers for one request: the user, how
much of the user's timeline the request sees (``timeline[:hist_len]``), the
top-N unseen items best first with the retriever's logits, and (offline) the
item the user actually went on to (``target``; -1 when unknown). The retriever
writes them (`retrieval.lists`), the ranker trains and is selected on them
(`ranking.lists`), and the server builds the same features from its ANN answer,
through the one function here:

    list_features(logits)  ->  (N, 3) float32 per candidate:
        logit              the retriever's logit (score / temperature)
        log1p(rank)        0-based position in the retrieved list
        logit - top logit  the gap to the list's best candidate (<= 0)

Column 0 is the ranker's residual base (`ranking.config.ModelConfig.residual_column`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIST_FEATURE_NAMES: tuple[str, ...] = ("retrieval_logit", "retrieval_log1p_rank", "retrieval_logit_gap")
RESIDUAL_COLUMN = 0  # list_features column holding the first stage's logit


def list_features(logits: np.ndarray) -> np.ndarray:
    """(R, N) logits of R lists, best first -> (R * N, 3) float32 features, row-major (request, position)."""
    lg = np.asarray(logits, dtype=np.float32)
    if lg.ndim != 2:
        raise ValueError(f"list_features: logits must be (lists, candidates), got shape {lg.shape}")
    r, n = lg.shape
    rank = np.broadcast_to(np.log1p(np.arange(n, dtype=np.float32)), (r, n))
    gap = lg - (lg[:, :1] if n else lg)
    return np.stack([lg, rank, gap], axis=-1).reshape(r * n, len(LIST_FEATURE_NAMES))


@dataclass(frozen=True)
class CandidateLists:
    """R requests' retrieved lists (see the module docstring). Arrays, row r = request r."""

    user_ids: np.ndarray  # (R,) int64
    hist_len: np.ndarray  # (R,) int64: the request sees timeline[:hist_len]
    items: np.ndarray  # (R, N) int64, best first
    logits: np.ndarray  # (R, N) float32
    target: np.ndarray  # (R,) int64, -1 = unknown

    def __len__(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.items.shape[1])

    def labels(self) -> np.ndarray:
        """(R, N) float32: 1 where the list holds the request's target."""
        return (self.items == self.target[:, None]).astype(np.float32)

    def hit(self) -> np.ndarray:
        """(R,) bool: the retriever retrieved the target."""
        return (self.items == self.target[:, None]).any(axis=1)

    def take(self, rows: np.ndarray) -> "CandidateLists":
        return CandidateLists(self.user_ids[rows], self.hist_len[rows], self.items[rows], self.logits[rows],
                              self.target[rows])

    def validate(self, where: str) -> "CandidateLists":
        r = self.user_ids.shape
        if self.items.ndim != 2 or self.logits.shape != self.items.shape:
            raise ValueError(f"{where}: items {self.items.shape} and logits {self.logits.shape} must be equal (R, N)")
        for name in ("hist_len", "target"):
            if getattr(self, name).shape != r:
                raise ValueError(f"{where}: {name} has shape {getattr(self, name).shape}, user_ids {r}")
        if self.items.shape[0] != r[0]:
            raise ValueError(f"{where}: {self.items.shape[0]} lists for {r[0]} users")
        if (self.hist_len < 0).any():
            raise ValueError(f"{where}: negative hist_len at request {int(np.flatnonzero(self.hist_len < 0)[0])}")
        if not np.isfinite(self.logits).all():
            raise ValueError(f"{where}: non-finite logits at request {int(np.flatnonzero(~np.isfinite(self.logits).all(1))[0])}")
        return self

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, user_ids=self.user_ids, hist_len=self.hist_len, items=self.items, logits=self.logits,
                 target=self.target)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CandidateLists":
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(z["user_ids"].astype(np.int64), z["hist_len"].astype(np.int64), z["items"].astype(np.int64),
                       z["logits"].astype(np.float32), z["target"].astype(np.int64)).validate(str(path))
