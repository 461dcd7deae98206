"""The retriever's candidate lists for given requests: what the second stage trains and is selected on.

    lists = retrieve_lists(load_retriever("artifacts/retriever"), FeatureStore("data/features"),
                           user_ids, hist_len, top_n=200)

For each request (user, ``timeline[:hist_len]``) the user tower encodes the
history (its last `max_len` behaviors, as served), every catalog item is scored
exactly (the ANN index's reference), every item the request has seen is masked
— the whole history, not a capped tail — and the top `top_n` are kept with
their logits (score x `logit_scale`, the retriever's training-time softmax
logit: 1 / temperature for cosine scores). The target is ``timeline[hist_len]``
when the timeline has it. The lists carry the vectors behind their logits
(user vectors x logit_scale, the retriever's item lookup); `attach_vectors`
re-attaches them to lists loaded from a cache.

Which retriever produces the lists decides whether they are honest: the second
stage must see lists for targets the retriever was not trained on (see the
README's two-stage section).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch

from features.batch import build_batch, validate_batch
from features.candidate_lists import CandidateLists


def _history_batch(retriever: Any, store: Any, user_ids: np.ndarray, hist_len: np.ndarray) -> Any:
    hist, lens = store.history(user_ids, hist_len, retriever.max_len)
    users = store.user_features(user_ids)
    batch = build_batch(user={k: v for k, v in users.items() if k in retriever.user_keys},
                        history={k: v for k, v in hist.items() if k in retriever.history_keys},
                        history_lengths=lens, candidates={}, num_candidates=np.zeros(len(user_ids), np.int64),
                        request_ts=np.zeros(len(user_ids), np.int64))
    return validate_batch(batch, retriever.batch_spec())


def candidate_vectors(retriever: Any, item_ids: np.ndarray) -> np.ndarray:
    """(..., D) float32 item vectors of the retriever for item ids of any shape (0 for items it does not index)."""
    rows, known = retriever.rows(item_ids)
    vecs = np.asarray(retriever.item_vectors, np.float32)[rows]
    return np.where(known[..., None], vecs, np.float32(0.0))


def item_lookup(retriever: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The lists' item-vector lookup (`CandidateLists.item_vectors`) of a loaded retriever."""
    return functools.partial(candidate_vectors, retriever)


def _scale(retriever: Any, logit_scale: float | None) -> float:
    scale = logit_scale if logit_scale is not None else getattr(retriever, "logit_scale", None)
    if scale is None or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"the retriever export records no usable logit scale ({scale!r}); "
                         f"pass logit_scale (1 / the training temperature)")
    return float(scale)


@torch.inference_mode()
def attach_vectors(lists: CandidateLists, retriever: Any, store: Any, logit_scale: float | None = None,
                   chunk: int = 512) -> CandidateLists:
    """`lists` with the vectors behind their logits (`features.candidate_lists.retrieval_products`): the user
    vectors of their requests times the logit scale (kept when the lists already carry them) and the item
    lookup of `retriever`, which must be the retriever that made them."""
    uv = lists.user_vectors
    if uv is None:
        uv = np.empty((len(lists), retriever.dim), np.float32)
        for s in range(0, len(lists), chunk):
            batch = _history_batch(retriever, store, lists.user_ids[s:s + chunk], lists.hist_len[s:s + chunk])
            uv[s:s + chunk] = retriever.user_embedding(batch).float().numpy()
        uv *= np.float32(_scale(retriever, logit_scale))
    if uv.shape[1] != retriever.dim:
        raise ValueError(f"attach_vectors: the lists' user vectors have {uv.shape[1]} dimensions, the retriever "
                         f"{retriever.dim}: these lists were made by another retriever")
    return lists.with_vectors(uv, item_lookup(retriever))


@torch.inference_mode()
def retrieve_lists(retriever: Any, store: Any, user_ids: np.ndarray, hist_len: np.ndarray, top_n: int,
                   logit_scale: float | None = None, chunk: int = 512, progress: Any = None) -> CandidateLists:
    """Top-`top_n` unseen items of each request, best first (see the module docstring).

    Args:
        retriever: a `retrieval.inference.RetrieverInference` (item_ids, item_vectors, user_embedding).
        store: a `features.reader.FeatureStore` holding the users' timelines.
        user_ids, hist_len: (R,) requests; every request must see at least one behavior.
        logit_scale: multiplies the scores into logits; None takes the export's (1 / temperature).
        progress: an optional callable(done, total).
    """
    user_ids = np.asarray(user_ids, np.int64)
    hist_len = np.asarray(hist_len, np.int64)
    if user_ids.shape != hist_len.shape:
        raise ValueError(f"retrieve_lists: user_ids {user_ids.shape} and hist_len {hist_len.shape} differ")
    if (hist_len < 1).any():
        i = int(np.flatnonzero(hist_len < 1)[0])
        raise ValueError(f"retrieve_lists: request {i} (user {int(user_ids[i])}) sees no behavior; "
                         f"the user tower needs at least one")
    n_items = len(retriever.item_ids)
    if not 0 < top_n <= n_items:
        raise ValueError(f"retrieve_lists: top_n must be in [1, {n_items}], got {top_n}")
    scale = _scale(retriever, logit_scale)
    vecs = torch.from_numpy(np.ascontiguousarray(retriever.item_vectors, dtype=np.float32))  # (I, D)
    items = np.empty((len(user_ids), top_n), np.int64)
    logits = np.empty((len(user_ids), top_n), np.float32)
    uvecs = np.empty((len(user_ids), retriever.dim), np.float32)
    for s in range(0, len(user_ids), chunk):
        u, h = user_ids[s:s + chunk], hist_len[s:s + chunk]
        uvec = retriever.user_embedding(_history_batch(retriever, store, u, h)).float()
        uvecs[s:s + chunk] = uvec.numpy() * np.float32(scale)
        scores = uvec @ vecs.T  # (c, I)
        seen, lens = store.items_before(u, h)  # the whole history, uncapped
        rows, known = retriever.rows(seen)
        owner = np.repeat(np.arange(len(u)), lens)
        scores[torch.from_numpy(owner[known]), torch.from_numpy(rows[known])] = float("-inf")
        top = scores.topk(top_n, dim=1)
        items[s:s + chunk] = retriever.item_ids[top.indices.numpy()]
        logits[s:s + chunk] = top.values.numpy() * scale
        if progress is not None:
            progress(min(s + chunk, len(user_ids)), len(user_ids))
    rows, found = store.timeline_users.rows(user_ids)
    total = np.where(found, store.timeline_offsets[rows + 1] - store.timeline_offsets[rows], 0)
    has = hist_len < total
    target = np.full(len(user_ids), -1, np.int64)
    target[has] = store.timeline_values["item_id"][store.timeline_offsets[rows[has]] + hist_len[has]]
    # a list can run out of unseen items only when the catalog is smaller than history + top_n
    logits = np.where(np.isfinite(logits), logits, np.float32(-1e4))
    return CandidateLists(user_ids, hist_len, items, logits, target, uvecs,
                          item_lookup(retriever)).validate("retrieve_lists")
