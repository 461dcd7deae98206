"""The inference wrapper serving loads: user tower, item tower and ANN search over the exported items.

    r = retrieval.export.load_retriever("artifacts/retriever")      # -> RetrieverInference
    u = r.user_embedding(batch)           # (B, D) from the Batch built out of online state (Redis)
    ids, scores = r.search(u.numpy(), 500)                           # ANN over the exported catalog
    v = r.item_embedding(candidates_kjt)  # (N, D) for new items (attributes + hashed id)

The server builds `batch` with `features.batch.build_batch` from the same fields
the offline reader uses (history keys hist_item_id / hist_category /
hist_action / hist_ts, user keys user_id + the attribute features listed in
`RetrieverInference.user_keys`); the model truncates the history to its last
`max_len` behaviors itself. These method names are a stable interface
(`serving.models.ServableRetriever`).
"""
from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, ITEM_ID, Batch, BatchSpec, kjt_columns
from retrieval.evaluate import empty_batch, last_queries
from retrieval.index import search as index_search
from retrieval.model import TwoTowerRetriever


class CompactEmbeddingCollection(nn.Module):
    """Drop-in for the trained `EmbeddingCollection` at inference, holding only the rows in use.

    The item-id table has 2^20 rows of which the catalog touches a few
    thousand; the export keeps those rows (sorted row ids + vectors per table)
    and any other row reads as zeros, so an item the model never saw gets its
    vector from its attributes alone.
    """

    def __init__(self, tables: dict[str, tuple[torch.Tensor, torch.Tensor]], feature_to_table: dict[str, str]) -> None:
        super().__init__()
        self.feature_to_table = dict(feature_to_table)
        self.rows = nn.ParameterDict()
        self.weights = nn.ParameterDict()
        for name, (rows, weight) in tables.items():
            self.rows[name] = nn.Parameter(rows.to(torch.int64), requires_grad=False)
            self.weights[name] = nn.Parameter(weight.to(torch.float32), requires_grad=False)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        out = {}
        for key, (v, lengths) in kjt_columns(features).items():
            table = self.feature_to_table[key]
            rows, weight = self.rows[table], self.weights[table]
            if rows.numel() == 0:
                emb = weight.new_zeros(v.numel(), weight.shape[1])
            else:
                pos = torch.searchsorted(rows, v).clamp(max=rows.numel() - 1)
                hit = (rows[pos] == v).unsqueeze(1)
                emb = torch.where(hit, weight[pos], weight.new_zeros(()))
            out[key] = JaggedTensor(values=emb, lengths=lengths)
        return out


class RetrieverInference:
    """User tower + item tower + the exported faiss index (see the module docstring).

    Attributes:
        item_ids: (N,) int64 ids of the indexed items (row i of the index is item_ids[i]).
        item_vectors: (N, D) float32 exported item vectors.
        dim: D.
        logit_scale: score x logit_scale is the logit the model trained with (None: not recorded).
        max_len: behaviors the user tower reads (the last max_len).
        history_keys / user_keys / item_keys: the batch keys the towers read.
    """

    def __init__(self, model: TwoTowerRetriever, item_ids: np.ndarray, item_vectors: np.ndarray,
                 index: faiss.Index, exact: faiss.Index, meta: dict[str, Any]) -> None:
        self.model = model.eval()
        self.item_ids = item_ids
        self.item_vectors = item_vectors
        self.index = index
        self.exact = exact
        self.meta = meta
        self.dim = int(model.cfg.dim)
        self.max_len = int(model.cfg.user.max_len)
        self.history_keys = tuple(meta["history_keys"])
        self.user_keys = tuple(meta["user_keys"])
        self.item_keys = tuple(meta["item_keys"])
        self._id_order = np.argsort(item_ids, kind="stable")  # item id -> row lookups (`rows`)
        self._sorted_ids = item_ids[self._id_order]
        scale = meta.get("logit_scale")
        # the training softmax's logit per unit of score (1 / temperature); None: the export records none
        self.logit_scale: float | None = float(scale) if scale else None

    def batch_spec(self) -> BatchSpec:
        """What a `user_embedding` batch must hold: check a batch against it (`features.batch.validate_batch`)
        where it is built. `user_embedding` does not validate: the reader and the server validate the batches
        they build, once, and a model entry point that checked again would repeat that on every call."""
        return BatchSpec(user_keys=self.user_keys, history_keys=self.history_keys, candidate_keys=(),
                         history_before_request=False)

    @torch.inference_mode()
    def user_embedding(self, batch: Batch) -> torch.Tensor:
        """(B, D) L2-normalized user vectors after each user's last behavior (>= 1 behavior per user); `batch`
        is validated where it was built (`batch_spec`)."""
        return last_queries(self.model, batch)

    @torch.inference_mode()
    def item_embedding(self, candidates: KeyedJaggedTensor) -> torch.Tensor:
        """(N, D) L2-normalized vectors of the items of a candidates KJT (keys `item_keys`)."""
        missing = [k for k in self.item_keys if k not in candidates.keys()]
        if missing:
            raise ValueError(f"item_embedding: candidates lack keys {missing} (have {candidates.keys()})")
        return self.model(empty_batch(), candidates).items

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows into item_ids / item_vectors, known mask) of the given ids; unknown ids get row 0."""
        ids = np.asarray(item_ids, np.int64)
        if len(self._sorted_ids) == 0:
            return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
        pos = np.searchsorted(self._sorted_ids, ids).clip(max=len(self._sorted_ids) - 1)
        known = self._sorted_ids[pos] == ids
        return np.where(known, self._id_order[pos], 0), known

    def search(self, user_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ANN top-k: (B, D) -> (ids (B, k) int64, -1 where missing; scores (B, k) float32), best first."""
        return self._ids(*index_search(self.index, np.asarray(user_vecs), k))

    def exact_search(self, user_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k over the same vectors (the ANN index's reference)."""
        return self._ids(*index_search(self.exact, np.asarray(user_vecs), k))

    def _ids(self, rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.where(rows >= 0, self.item_ids[np.maximum(rows, 0)], -1)
        return ids, scores


HISTORY_KEYS = (HIST_ITEM_ID, HIST_CATEGORY, HIST_ACTION)
__all__ = ["CompactEmbeddingCollection", "RetrieverInference", "HISTORY_KEYS", "ITEM_ID"]
