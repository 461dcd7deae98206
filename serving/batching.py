"""Online state -> the project's one `Batch` type (the serving side of `features/reader.py`).

The request path builds a B = 1 batch from what one Redis round trip returned:
the user's sequence as of the request time (behaviors strictly before it, the
point-in-time rule of the offline samples), the user's counters turned into
dense features by `features.transforms.DenseLayout` (the same transform the
reader uses), the candidates' attributes from the in-memory catalog and their
counters from the second round trip. Nothing here re-implements a feature.

A request's batch is built, and validated, in two pieces: `user_batch` (the
user and history parts, which the user tower reads) and `with_candidates`
(what the ranker adds); `build_request_batch` makes both calls at once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from features.batch import (
    HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_SDIM_SIG, HIST_TS, ITEM_ID, USER_ID, Batch, BatchSpec,
    build_batch, validate_batch,
)
from features.sequence import SequenceState
from features.transforms import DenseLayout
from serving.catalog import ItemCatalog
from serving.state.base import ItemStats
from serving.state.codec import BucketSums, CounterLog, UserRecord
from serving.state.stats import window_counters


@dataclass(frozen=True)
class UserView:
    """A user's state as of a time: what the user tower and the ranker see of it."""

    user_id: int
    seq: SequenceState  # behaviors with ts < as_of
    sigs: np.ndarray | None  # parallel packed SDIM signatures, when present
    user_dense: np.ndarray  # (1, Du) float32
    attrs: dict[str, tuple[int, ...]]

    @property
    def history_length(self) -> int:
        return len(self.seq)


def user_view(user_id: int, rec: UserRecord | None, as_of_ms: int, layout: DenseLayout) -> UserView:
    """The user's record (None = no state) as of `as_of_ms`."""
    rec = rec if rec is not None else UserRecord.empty()
    seq = rec.seq
    cut = int(np.searchsorted(seq.ts_ms, as_of_ms, side="left"))  # behaviors strictly before as_of
    sigs = rec.sigs
    if cut < len(seq):
        seq = SequenceState(seq.item_ids[:cut], seq.ts_ms[:cut], seq.actions[:cut], seq.categories[:cut])
        sigs = None if sigs is None else sigs[:cut]
    log: CounterLog = rec.log
    counters = window_counters("user", layout.stats, as_of_ms, log.ts_ms, log.pos, np.zeros(len(log), np.int64),
                               np.array([log.total_cnt]), np.array([log.total_pos]))
    return UserView(user_id, seq, sigs, layout.user_dense(counters), dict(rec.attrs.sparse))


def candidate_dense(catalog: ItemCatalog, item_ids: np.ndarray, stats: ItemStats | None, as_of_ms: int,
                    layout: DenseLayout) -> np.ndarray:
    """(N, Dc) dense features of the candidates; `stats` None = no counters (zeros, the cold answer)."""
    n = len(item_ids)
    if stats is None:
        z = np.zeros(0, np.int64)
        stats = ItemStats(z, np.zeros(0, np.uint8), z, np.zeros(n, np.int64), np.zeros(n, np.int64))
    counters = window_counters("item", layout.stats, as_of_ms, stats.ts_ms, stats.pos, stats.owner,
                               stats.total_cnt, stats.total_pos)
    numeric = catalog.numeric_of(catalog.rows(item_ids), layout.item_numeric_keys)
    return layout.candidate_dense(counters, numeric)


def user_batch(view: UserView, as_of_ms: int, with_sigs: np.ndarray | None = None,
               user_keys: tuple[str, ...] = (), validate: bool = True, max_len: int = 0) -> Batch:
    """A B = 1 batch of the user view and no candidates: what the user tower reads, and what
    `with_candidates` extends into the ranker's batch.

    `with_sigs`: the history's packed SDIM signatures to include as ``hist_sdim_sig`` (None: left out).
    `user_keys`: user features the models read; one the user lacks is sent with no values.
    `validate`: check the user and history parts (`features.batch.validate_batch`) here, where they are built.
    `max_len`: send only the latest `max_len` behaviors (0: all) — the most any model of the request reads
    (`Runtime._history_needed`): the models truncate to their own lengths anyway, and a 10k-behavior history
    is then neither copied into the batch nor validated per request.

    Validation happens here, at the edge, once per request and piece: a request's batches share this user
    part (the user tower's batch, the second stage's exact scoring, the ranker's batch), so checking it in
    each model as well would walk the same up-to-10k-behavior history two or three times per request. The
    models' entry points therefore trust their input: `RetrieverInference.user_embedding` does not validate
    (callers that build batches by hand check them against its `batch_spec()` where they build them, as the
    reader and `retrieval.lists` do), and the ranker keeps only its cheap key and width check, which reads no
    data. `validate=False` (the config's `runtime.validate_batches: false`) trusts this builder entirely.
    """
    s = view.seq
    if max_len and len(s) > max_len:
        s = s.tail(max_len)
        with_sigs = None if with_sigs is None else with_sigs[len(with_sigs) - max_len:]
    user = {USER_ID: (np.array([view.user_id], np.int64), np.ones(1, np.int64))}
    for feat in sorted(set(view.attrs) | (set(user_keys) - {USER_ID})):
        vals = np.asarray(view.attrs.get(feat, ()), np.int64)
        user[feat] = (vals, np.array([len(vals)], np.int64))
    history = {HIST_ITEM_ID: s.item_ids, HIST_TS: s.ts_ms, HIST_ACTION: s.actions, HIST_CATEGORY: s.categories}
    if with_sigs is not None:
        history[HIST_SDIM_SIG] = with_sigs
    batch = build_batch(user=user, history=history, history_lengths=np.array([len(s)], np.int64), candidates={},
                        num_candidates=np.zeros(1, np.int64), request_ts=np.array([as_of_ms], np.int64),
                        user_dense=view.user_dense)
    if validate:
        validate_batch(batch, BatchSpec(user_keys=tuple(dict.fromkeys((USER_ID, *user_keys))), candidate_keys=()))
    return batch


def with_candidates(user: Batch, catalog: ItemCatalog, item_ids: np.ndarray, cand_dense: np.ndarray | None,
                    sdim: BucketSums | None = None, validate: bool = True) -> Batch:
    """`user` (a `user_batch`) plus candidates `item_ids`: their catalog features and `cand_dense` (N, Dc).

    `sdim`: the user's stored SDIM bucket sums, sent as ``sdim_sums`` / ``sdim_lengths`` (the ranker then
    gathers from them instead of scanning the history); the caller checks they fit the model and the view.
    `validate`: check what this adds (candidates, their dense features, the sums); the user and history
    parts were checked when `user` was built, and they share its request time, so a request's batch is
    validated once, piece by piece, before any model reads the piece.
    """
    n = len(item_ids)
    candidates = {}
    if n:  # a user-tower batch has no candidate keys at all (a keyed KJT with 0 rows trips validate_batch)
        candidates = catalog.candidate_features(item_ids)
    cand_dense = cand_dense if cand_dense is not None else np.zeros((n, 0), np.float32)
    part = build_batch(user={}, history={}, history_lengths=np.zeros(0, np.int64), candidates=candidates,
                       num_candidates=np.array([n], np.int64), request_ts=user.request_ts, candidate_dense=cand_dense)
    if sdim is not None:
        part = dataclasses.replace(
            part, sdim_sums=torch.from_numpy(np.ascontiguousarray(sdim.sums, np.float32))[None],
            sdim_lengths=torch.tensor([sdim.covered], dtype=torch.int64))
    if validate:
        validate_batch(part, BatchSpec(user_keys=(), history_keys=(), candidate_keys=(ITEM_ID,) if n else (),
                                       candidate_dense_dim=cand_dense.shape[1]))  # n = 0: all filtered out
    return dataclasses.replace(part, user=user.user, history=user.history, user_dense=user.user_dense)


def build_request_batch(view: UserView, catalog: ItemCatalog, item_ids: np.ndarray, cand_dense: np.ndarray | None,
                        as_of_ms: int, with_sigs: np.ndarray | None = None, user_keys: tuple[str, ...] = (),
                        sdim: BucketSums | None = None, validate: bool = True) -> Batch:
    """A B = 1 batch: the user view plus candidates `item_ids` (may be empty, for the user tower), in one call
    (`user_batch` then `with_candidates`; the runtime makes the two calls itself, to reuse the first)."""
    user = user_batch(view, as_of_ms, with_sigs, user_keys, validate)
    if not len(item_ids) and sdim is None:
        return user  # the user tower's batch
    return with_candidates(user, catalog, item_ids, cand_dense, sdim, validate)
