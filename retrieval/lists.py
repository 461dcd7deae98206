"""The retriever's candidate lists for given requests: what the second stage trains and is selected on.

    lists = retrieve_lists(load_retriever("artifacts/retriever"), FeatureStore("data/features"),
                           user_ids, hist_len, top_n=200)

For each request (user, ``timeline[:hist_len]``) the user tower encodes the
history (its last `max_len` behaviors, as served), every catalog item is scored
exactly (the ANN index's reference), every item the request has seen is masked
— the whole history, not a capped tail — and the top `top_n` are kept with
their logits (score x `logit_scale`, the retriever's training-time softmax
logit: 1 / temperature for cosine scores). The target is ``timeline[hist_len]``
when the timeline has it.

Which retriever produces the lists decides whether they are honest: the second
stage must see lists for targets the retriever was not trained on (see the
README's two-stage section).
"""
from __future__ import annotations

from typing import Any

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
    scale = logit_scale if logit_scale is not None else getattr(retriever, "logit_scale", None)
    if scale is None or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"retrieve_lists: the retriever export records no usable logit scale ({scale!r}); "
                         f"pass logit_scale (1 / the training temperature)")
    scale = float(scale)
    vecs = torch.from_numpy(np.ascontiguousarray(retriever.item_vectors, dtype=np.float32))  # (I, D)
    items = np.empty((len(user_ids), top_n), np.int64)
    logits = np.empty((len(user_ids), top_n), np.float32)
    for s in range(0, len(user_ids), chunk):
        u, h = user_ids[s:s + chunk], hist_len[s:s + chunk]
        scores = retriever.user_embedding(_history_batch(retriever, store, u, h)).float() @ vecs.T  # (c, I)
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
    return CandidateLists(user_ids, hist_len, items, logits, target).validate("retrieve_lists")
