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

A ranker may also read the vectors behind the logit (`ranking.config.ListsConfig.retriever_vectors`):

    retrieval_products(user_vectors, item_vectors)  ->  (N, D) float32 per candidate:
        u_d * v_d          the D per-dimension terms of the logit (they sum to it), with u the request's
                           user vector times the logit scale and v the candidate's item vector

so the correction can reweight the retriever's own dimensions on the hard candidates of its lists,
and the basis-free similarities (`ranking.config.ListsConfig.retriever_similarity` = K):

    retrieval_similarities(cand_vectors, recent_vectors, recent_ok)  ->  (N, 3) float32 per candidate:
        sim_last           cosine in the retriever's item space to the request's last behavior
        sim_max, sim_mean  its max and mean over the request's last K behaviors

(0 for a request without behaviors).
Lists carry their requests' scaled user vectors and a lookup of their retriever's item vectors
(`CandidateLists.user_vectors` / `item_vectors`, attached by `retrieval.lists`); the server
passes its user vector and its bundle's item table.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

LIST_FEATURE_NAMES: tuple[str, ...] = ("retrieval_logit", "retrieval_log1p_rank", "retrieval_logit_gap")
RESIDUAL_COLUMN = 0  # list_features column holding the first stage's logit
SIMILARITY_NAMES: tuple[str, ...] = ("retrieval_sim_last", "retrieval_sim_max", "retrieval_sim_mean")


def list_features(logits: np.ndarray) -> np.ndarray:
    """(R, N) logits of R lists, best first -> (R * N, 3) float32 features, row-major (request, position)."""
    lg = np.asarray(logits, dtype=np.float32)
    if lg.ndim != 2:
        raise ValueError(f"list_features: logits must be (lists, candidates), got shape {lg.shape}")
    r, n = lg.shape
    rank = np.broadcast_to(np.log1p(np.arange(n, dtype=np.float32)), (r, n))
    gap = lg - (lg[:, :1] if n else lg)
    return np.stack([lg, rank, gap], axis=-1).reshape(r * n, len(LIST_FEATURE_NAMES))


def retrieval_products(user_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
    """(R, D) scaled user vectors and (R, N, D) their lists' item vectors -> (R * N, D) float32 u_d * v_d, row-major
    (request, candidate): the per-dimension terms of each candidate's logit."""
    u = np.asarray(user_vectors, np.float32)
    v = np.asarray(item_vectors, np.float32)
    if u.ndim != 2 or v.ndim != 3 or v.shape[0] != u.shape[0] or v.shape[2] != u.shape[1]:
        raise ValueError(f"retrieval_products: user vectors (R, D) {u.shape} and item vectors (R, N, D) {v.shape} "
                         f"do not match")
    return (u[:, None, :] * v).reshape(-1, u.shape[1])


def retrieval_similarities(cand_vectors: np.ndarray, recent_vectors: np.ndarray, recent_ok: np.ndarray) -> np.ndarray:
    """(R, N, D) the candidates' unit item vectors, (R, K, D) the requests' last K behaviors' (right-aligned, as
    `features.list_context.recent_items` lays them out) and (R, K) bool which of those exist -> (R * N, 3) float32
    `SIMILARITY_NAMES`, row-major (request, candidate)."""
    c = np.asarray(cand_vectors, np.float32)
    h = np.asarray(recent_vectors, np.float32)
    ok = np.asarray(recent_ok, bool)
    if c.ndim != 3 or h.ndim != 3 or h.shape[:2] != ok.shape or h.shape[0] != c.shape[0] or h.shape[2] != c.shape[2]:
        raise ValueError(f"retrieval_similarities: candidates (R, N, D) {c.shape}, recent (R, K, D) {h.shape} and "
                         f"recent_ok (R, K) {ok.shape} do not match")
    sim = np.einsum("rnd,rkd->rnk", c, h)
    okb = np.broadcast_to(ok[:, None, :], sim.shape)
    count = okb.sum(-1)
    last = np.where(okb[..., -1], sim[..., -1], 0.0)
    top = np.where(count > 0, np.where(okb, sim, -np.inf).max(-1), 0.0)
    mean = np.where(okb, sim, 0.0).sum(-1) / np.maximum(count, 1)
    return np.stack([last, top, mean], -1).reshape(-1, len(SIMILARITY_NAMES)).astype(np.float32)


@dataclass(frozen=True)
class CandidateLists:
    """R requests' retrieved lists (see the module docstring). Arrays, row r = request r."""

    user_ids: np.ndarray  # (R,) int64
    hist_len: np.ndarray  # (R,) int64: the request sees timeline[:hist_len]
    items: np.ndarray  # (R, N) int64, best first
    logits: np.ndarray  # (R, N) float32
    target: np.ndarray  # (R,) int64, -1 = unknown
    # the vectors behind the logits (`retrieval_products`), when attached: (R, D) float32 user vectors times the
    # logit scale (saved with the lists), and the lists' retriever's item lookup, ids (...) -> (..., D) float32
    # (not saved: `with_vectors` attaches it from the retriever export that made the lists)
    user_vectors: np.ndarray | None = None
    item_vectors: Callable[[np.ndarray], np.ndarray] | None = None
    # the item-item model fitted on what the lists' retriever trained on (`features.item_item.ItemItem`, the
    # second stage's `lists.item_item` features), when attached (`with_item_item`); not saved with the lists
    item_item: Any = None

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
        return replace(self, user_ids=self.user_ids[rows], hist_len=self.hist_len[rows], items=self.items[rows],
                       logits=self.logits[rows], target=self.target[rows],
                       user_vectors=None if self.user_vectors is None else self.user_vectors[rows])

    def with_vectors(self, user_vectors: np.ndarray | None,
                     item_vectors: Callable[[np.ndarray], np.ndarray] | None) -> "CandidateLists":
        return replace(self, user_vectors=user_vectors, item_vectors=item_vectors).validate("with_vectors")

    def with_item_item(self, model: Any) -> "CandidateLists":
        """These lists reading `model` (a `features.item_item.ItemItem`) for their item-item features."""
        return replace(self, item_item=model)

    def products(self, columns: np.ndarray | None = None) -> np.ndarray:
        """`retrieval_products` of the lists (or of their (R, W) positions `columns`): (R * N, D) float32."""
        if self.user_vectors is None or self.item_vectors is None:
            raise ValueError("these lists carry no retriever vectors (user vectors and the item lookup): attach "
                             "them with retrieval.lists.attach_vectors")
        return retrieval_products(self.user_vectors, self.item_vectors(self._kept(columns)))

    def similarities(self, recent: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """`retrieval_similarities` of the lists (or of their positions `columns`) to `recent` (R, K) item ids of each
        request's last K behaviors, right-aligned, -1 before a short history's first: (R * N, 3) float32."""
        if self.item_vectors is None:
            raise ValueError("these lists carry no retriever vectors (the item lookup): attach them with "
                             "retrieval.lists.attach_vectors")
        recent = np.asarray(recent, np.int64)
        return retrieval_similarities(self.item_vectors(self._kept(columns)), self.item_vectors(np.maximum(recent, 0)),
                                      recent >= 0)

    def _kept(self, columns: np.ndarray | None) -> np.ndarray:
        return self.items if columns is None else np.take_along_axis(self.items, columns, 1)

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
        if self.user_vectors is not None and (self.user_vectors.ndim != 2 or self.user_vectors.shape[0] != r[0]
                                              or not np.isfinite(self.user_vectors).all()):
            raise ValueError(f"{where}: user_vectors must be finite (R, D) for {r[0]} requests, got shape "
                             f"{self.user_vectors.shape}")
        if not np.isfinite(self.logits).all():
            raise ValueError(f"{where}: non-finite logits at request {int(np.flatnonzero(~np.isfinite(self.logits).all(1))[0])}")
        return self

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        vectors = {} if self.user_vectors is None else {"user_vectors": self.user_vectors}
        np.savez(tmp, user_ids=self.user_ids, hist_len=self.hist_len, items=self.items, logits=self.logits,
                 target=self.target, **vectors)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CandidateLists":
        with np.load(Path(path), allow_pickle=False) as z:
            uv = z["user_vectors"].astype(np.float32) if "user_vectors" in z.files else None
            return cls(z["user_ids"].astype(np.int64), z["hist_len"].astype(np.int64), z["items"].astype(np.int64),
                       z["logits"].astype(np.float32), z["target"].astype(np.int64), uv).validate(str(path))
