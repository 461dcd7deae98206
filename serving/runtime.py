"""A ranking request -> scored items. No grpc here: `serving.servicer` translates proto <-> these types.

Stages (each timed into ``cascade_rank_stage_seconds{stage}``). The deadline is
checked before every stage: a request whose deadline has passed (say, while it
queued for a handler thread) is answered DEADLINE_EXCEEDED instead of computed,
and counted in ``cascade_deadline_dropped_total{stage}`` by the stage it skipped:

    state_read   one Redis GET: sequence + SDIM signatures and bucket sums + counters + attributes
    user_tower   the retriever's user embedding of the user as of the request time
    ann          top-N of the ANN index (+ room for the seen items that will be dropped)
    filter_seen  drop items the user already interacted with (exclude_seen)
    item_stats   the candidates' counters: rows of the refreshed catalog snapshot (serving/item_features.py),
                 or one Redis MGET (point-in-time requests, no fresh snapshot, `item_stats: request`)
    features     the candidates' dense features and the batch
    ranker       the ranker's probabilities; with an SDIM ranker, from the user's stored bucket sums (each
                 candidate gathers its m buckets, the L behaviors are not scanned) when they are this model's
                 and cover what the request sees, else by the scan (``cascade_sdim_sums_fallbacks_total``)
    topk         the best k

Degraded answers never raise: a user with no behaviors before the request
time (unknown, or only impressions) gets popular items ranked by the ranker
(``cold_start``); Redis down -> the in-memory popularity list
(``redis_unavailable``); the index failing -> popular items ranked by the ranker
(``index_unavailable``). Each is counted in ``cascade_degraded_answers_total``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from features.batch import BatchSpec, validate_batch
from features.list_context import recent_items, second_stage_dense
from serving.batching import UserView, build_request_batch, candidate_dense, user_view
from serving.catalog import ItemCatalog
from serving.config import LimitsConfig, RuntimeConfig
from serving.errors import DeadlineExceeded, InvalidRequest, NoModelLoaded, StateUnavailable
from serving.metrics import ServingMetrics
from serving.item_features import ItemDenseCache
from serving.models import ModelBundle, ModelHolder
from serving.state.base import OnlineStore
from serving.state.codec import BucketSums, UserRecord

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class RankQuery:
    user_id: int
    k: int
    num_candidates: int = 0  # 0: the server default
    context: Mapping[str, str] = field(default_factory=dict)
    exclude_seen: bool = False
    debug: bool = False
    candidate_item_ids: tuple[int, ...] = ()
    as_of_ms: int = 0  # 0: now


@dataclass
class RankResult:
    item_ids: np.ndarray  # (k,) int64
    scores: np.ndarray  # (k,) float32
    retrieval_scores: np.ndarray  # (k,) float32
    model_version: str
    fallback_reason: str = ""
    timings: list[tuple[str, float]] = field(default_factory=list)
    history_length: int = 0
    candidates_considered: int = 0


class Deadline:
    """An absolute monotonic deadline; `check` raises DeadlineExceeded naming the next stage."""

    def __init__(self, expires_at: float | None) -> None:
        self.expires_at = expires_at

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        return cls(None if seconds is None else time.monotonic() + seconds)

    def expired(self) -> bool:
        return self.expires_at is not None and time.monotonic() >= self.expires_at

    def check(self, stage: str) -> None:
        if self.expired():
            raise DeadlineExceeded(f"deadline exceeded before stage {stage!r}")


class Availability:
    """Whether Redis answered lately: set down by failing requests, up by the health probe. And whether the
    ANN index failed: set by a failing search, cleared by the next one that works (full health reads both)."""

    def __init__(self) -> None:
        self.redis_up = True
        self.last_error = ""
        self.index_error = ""  # "" = the last search worked

    def down(self, err: str) -> None:
        if self.redis_up:
            log.warning("redis unavailable, answering degraded until it recovers: %s", err)
        self.redis_up, self.last_error = False, err

    def up(self) -> None:
        if not self.redis_up:
            log.info("redis answers again: full answers resume")
        self.redis_up = True

    def index_failed(self, err: str) -> None:
        self.index_error = err or "search failed"

    def index_ok(self) -> None:
        if self.index_error:
            log.info("ANN search works again")
            self.index_error = ""


class CatalogRef:
    """The current catalog; replaced (never mutated) by the items consumer."""

    def __init__(self, catalog: ItemCatalog) -> None:
        self.current = catalog
        self.lock = threading.Lock()  # serializes writers


class Popularity:
    """The in-memory popularity list (fallback and cold start), refreshed from the store."""

    def __init__(self, ids: np.ndarray | None = None, counts: np.ndarray | None = None) -> None:
        self.ids = ids if ids is not None else np.empty(0, np.int64)
        self.counts = counts if counts is not None else np.empty(0, np.float64)

    def set(self, ids: np.ndarray, counts: np.ndarray) -> None:
        self.ids, self.counts = ids, counts  # two attribute writes; readers take `snapshot`

    def snapshot(self, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, counts = self.ids, self.counts
        if len(ids) != len(counts) or not len(ids):
            return fallback, np.zeros(len(fallback))
        return ids, counts


def validate_query(q: RankQuery, limits: LimitsConfig) -> None:
    """Raises InvalidRequest naming the field and the limit."""
    if not INT64_MIN <= q.user_id <= INT64_MAX:
        raise InvalidRequest(f"user_id={q.user_id} is outside the int64 range")
    if not 1 <= q.k <= limits.max_k:
        raise InvalidRequest(f"k={q.k} must be in [1, {limits.max_k}]")
    if not 0 <= q.num_candidates <= limits.max_num_candidates:
        raise InvalidRequest(f"num_candidates={q.num_candidates} must be in [0, {limits.max_num_candidates}] "
                             "(0 = server default)")
    if q.num_candidates and q.k > q.num_candidates:
        raise InvalidRequest(f"k={q.k} exceeds num_candidates={q.num_candidates}")
    if len(q.context) > limits.max_context_entries:
        raise InvalidRequest(f"context has {len(q.context)} entries, at most {limits.max_context_entries} are allowed")
    for key, val in q.context.items():
        if not key or len(key) > limits.max_context_chars:
            raise InvalidRequest(f"context key {key[:40]!r} must have 1..{limits.max_context_chars} characters")
        if len(val) > limits.max_context_chars:
            raise InvalidRequest(f"context[{key!r}] has {len(val)} characters, at most {limits.max_context_chars}")
    if len(q.candidate_item_ids) > limits.max_candidate_item_ids:
        raise InvalidRequest(f"candidate_item_ids has {len(q.candidate_item_ids)} ids, at most "
                             f"{limits.max_candidate_item_ids}")
    if q.candidate_item_ids and len(set(q.candidate_item_ids)) != len(q.candidate_item_ids):
        raise InvalidRequest("candidate_item_ids has duplicates")
    if q.as_of_ms < 0:
        raise InvalidRequest(f"as_of_ms={q.as_of_ms} must be >= 0 (0 = now)")


class _Clock:
    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics
        self.timings: list[tuple[str, float]] = []
        self.t0 = self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings.append((stage, now - self.t))
        self.t = now

    def finish(self) -> list[tuple[str, float]]:
        self.timings.append(("total", time.perf_counter() - self.t0))
        for s, sec in self.timings:
            self.metrics.stage_seconds.labels(stage=s).observe(sec)
        return self.timings


def exact_scores(retriever, uvec: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """(N,) float32 retriever scores of the given items for one user vector (0 for items it does not index)."""
    rows, known = retriever.rows(item_ids)
    vecs = np.asarray(retriever.item_vectors, np.float32)[rows]  # (N, D)
    return np.where(known, vecs @ uvec.astype(np.float32), 0.0).astype(np.float32)


def second_stage_scale(bundle: ModelBundle) -> float:
    """The retriever's logit per unit of score, which a second-stage ranker's base column is in."""
    scale = bundle.retriever.logit_scale
    if not scale:
        raise ValueError(f"model {bundle.version}: the ranker is a second stage but the retriever export records "
                         f"no logit_scale; re-export the retriever")
    return float(scale)


def list_dense(bundle: ModelBundle, retrieval: np.ndarray, cands: np.ndarray, history: np.ndarray,
               as_of: int) -> np.ndarray:
    """A second-stage ranker's candidate_dense for one served list (best first): the list features of the
    retriever's logits, then the context features as of now when the ranker reads them
    (`features.list_context.second_stage_dense`, the function training used)."""
    context = bundle.ranker.context
    recent = None
    hist_len = np.array([len(history)], np.int64)
    if context is not None:
        recent = recent_items(np.array([0, len(history)], np.int64), history, np.array([0]), hist_len,
                              context.window)
    return second_stage_dense(retrieval[None, :] * second_stage_scale(bundle), cands[None, :], context, recent,
                              hist_len, request_ts=np.array([as_of], np.int64))


class Runtime:
    def __init__(self, limits: LimitsConfig, cfg: RuntimeConfig, store: OnlineStore, models: ModelHolder,
                 catalog: CatalogRef, popularity: Popularity, availability: Availability,
                 metrics: ServingMetrics, item_dense: ItemDenseCache | None = None) -> None:
        self.limits = limits
        self.item_dense = item_dense
        self._max_age_ms = int(cfg.item_stats_max_age_s * 1000)
        self.cfg = cfg
        self.store = store
        self.models = models
        self.catalog = catalog
        self.popularity = popularity
        self.availability = availability
        self.metrics = metrics

    # ------------------------------------------------------------------ public
    def rank(self, q: RankQuery, deadline: Deadline = Deadline(None)) -> RankResult:
        validate_query(q, self.limits)
        bundle = self.models.current
        if bundle is None:
            raise NoModelLoaded("no model version is loaded yet (health is NOT_SERVING); retry later")
        clock = _Clock(self.metrics)
        due = self._due
        due(deadline, "state_read")
        as_of = q.as_of_ms or int(time.time() * 1000)
        n_cand = q.num_candidates or self.limits.default_num_candidates
        catalog = self.catalog.current

        if not self.availability.redis_up:
            return self._popular(bundle, q, clock, "redis_unavailable")
        try:
            rec = self.store.read_user(q.user_id)
        except StateUnavailable as e:
            self.availability.down(str(e))
            return self._popular(bundle, q, clock, "redis_unavailable")
        clock.lap("state_read")
        due(deadline, "user_tower")

        view = user_view(q.user_id, rec, as_of, bundle.dense)
        cold = view.history_length == 0  # no behaviors before as_of: nothing for the user tower to read
        sigs = self._signatures(bundle, rec, view)
        sums = self._bucket_sums(bundle, rec, view)
        fallback = "cold_start" if cold else ""
        seen = view.seq.item_ids if q.exclude_seen else np.empty(0, np.int64)  # may repeat: only sizes the ANN k
        retrieval = None
        ubatch = None  # the user-tower batch; its user and history parts are reused for the ranker
        if q.candidate_item_ids:
            cands = np.asarray(q.candidate_item_ids, np.int64)
            clock.lap("user_tower")
            clock.lap("ann")
        elif cold:
            cands = self.popularity.snapshot(bundle.retriever.item_ids)[0][: n_cand + len(seen)]
            clock.lap("user_tower")
            clock.lap("ann")
        else:
            ubatch = build_request_batch(view, catalog, np.empty(0, np.int64), None, as_of, sigs, bundle.user_keys)
            uvec = bundle.retriever.user_embedding(ubatch).detach().float().numpy()  # (1, D)
            clock.lap("user_tower")
            due(deadline, "ann")
            want = min(len(bundle.index), n_cand + min(len(seen), 4 * n_cand))
            try:
                ids, sc = bundle.index.search(uvec, want)
                cands, retrieval = ids[0], sc[0]
                ok = cands >= 0
                cands, retrieval = cands[ok], retrieval[ok]
                self.availability.index_ok()
            except Exception as e:  # the index failing must not fail the request
                log.warning("ANN search failed, answering from popularity: %s", e)
                self.availability.index_failed(f"{type(e).__name__}: {e}")
                fallback = "index_unavailable"
                cands = self.popularity.snapshot(bundle.retriever.item_ids)[0][: n_cand + len(seen)]
            clock.lap("ann")
        due(deadline, "filter_seen")

        if len(seen):
            keep = ~np.isin(cands, seen)
            cands = cands[keep]
            retrieval = None if retrieval is None else retrieval[keep]
        if not q.candidate_item_ids:
            cands = cands[:n_cand]
            retrieval = None if retrieval is None else retrieval[:n_cand]
        second = bundle.ranker.second_stage
        if second and (retrieval is None or q.candidate_item_ids) and len(cands) and not cold:
            # a second-stage ranker corrects the retriever's logits: score client/fallback candidates exactly
            if ubatch is None:
                ubatch = build_request_batch(view, catalog, np.empty(0, np.int64), None, as_of, sigs,
                                             bundle.user_keys)
            uvec = bundle.retriever.user_embedding(ubatch).detach().float().numpy()[0]  # (D,)
            retrieval = exact_scores(bundle.retriever, uvec, cands)
            order = np.argsort(-retrieval, kind="stable")  # the list's order: best first
            cands, retrieval = cands[order], retrieval[order]
        if retrieval is None:
            retrieval = np.zeros(len(cands), np.float32)
        clock.lap("filter_seen")
        due(deadline, "item_stats")

        dense, stats = None, None
        if second:
            dense = list_dense(bundle, retrieval, cands, view.seq.item_ids, as_of)
        elif self.cfg.item_stats == "cached" and not q.as_of_ms and self.item_dense is not None:
            dense = self.item_dense.lookup(catalog, bundle.dense, cands, as_of, self._max_age_ms)
        if dense is None:
            if self.cfg.item_stats != "off" and len(cands):
                try:
                    stats = self.store.read_item_stats(cands)
                except StateUnavailable as e:
                    self.availability.down(str(e))
                    return self._popular(bundle, q, clock, "redis_unavailable")
        clock.lap("item_stats")
        due(deadline, "features")
        if dense is None:
            dense = candidate_dense(catalog, cands, stats, as_of, bundle.dense)
        batch = build_request_batch(view, catalog, cands, dense, as_of, sigs, bundle.user_keys, reuse=ubatch, sdim=sums)
        if second:  # it reads the list, not the counters: no user dense features
            batch = dataclasses.replace(batch, user_dense=batch.user_dense[:, :0])
        if self.cfg.validate_batches:
            validate_batch(batch, BatchSpec(user_keys=bundle.user_keys, candidate_dense_dim=dense.shape[1]))
        clock.lap("features")
        due(deadline, "ranker")

        if not len(cands):
            probs = torch.empty(0)
        elif second:  # listwise logits on the retriever's scale: probabilities would saturate into ties
            probs = bundle.ranker.logits(batch).float()
        else:
            probs = bundle.ranker.forward(batch).float()
        clock.lap("ranker")
        due(deadline, "topk")
        k = min(q.k, len(cands))
        top = torch.topk(probs, k).indices.numpy() if k else np.empty(0, np.int64)
        clock.lap("topk")
        result = RankResult(
            item_ids=cands[top], scores=probs.numpy()[top].astype(np.float32), retrieval_scores=retrieval[top],
            model_version=bundle.version, fallback_reason=fallback, history_length=view.history_length,
            candidates_considered=len(cands),
        )
        return self._finish(result, clock)

    # ------------------------------------------------------------------ internals
    def _due(self, deadline: Deadline, stage: str) -> None:
        """Raises DeadlineExceeded (counted by the skipped stage) when the deadline has passed."""
        if deadline.expired():
            self.metrics.deadline_dropped.labels(stage=stage).inc()
            deadline.check(stage)

    def _signatures(self, bundle: ModelBundle, rec, view) -> np.ndarray | None:
        """The history's SDIM signatures for this model: stored ones when they match, else recomputed."""
        if not bundle.sig_spec:
            return None
        if rec is not None and rec.sig_spec == bundle.sig_spec and view.sigs is not None:
            return view.sigs
        if len(view.seq):
            self.metrics.sdim_recomputes.inc()
        return bundle.signatures(view.seq.item_ids)

    def _bucket_sums(self, bundle: ModelBundle, rec: UserRecord | None, view: UserView) -> BucketSums | None:
        """The stored SDIM bucket sums when this model keeps them, they are its version and cover exactly the
        behaviors the request sees; else None (the ranker scans), counted by reason unless there is nothing
        to scan. A version mismatch heals when the consumer next writes the user, or by a backfill."""
        if not bundle.sums_window or not view.history_length:
            return None
        s = None if rec is None else rec.sdim
        if s is None:
            reason = "missing"
        elif s.spec != bundle.sig_spec:
            reason = "version"
        elif len(view.seq) != len(rec.seq):
            reason = "point_in_time"  # the request's as_of hides behaviors the sums include
        elif s.covered != min(len(rec.seq), bundle.sums_window):
            reason = "missing"  # built for another window: unusable, rebuilt on the next write
        else:
            return s
        self.metrics.sdim_sums_fallbacks.labels(reason=reason).inc()
        return None

    def _popular(self, bundle: ModelBundle, q: RankQuery, clock: _Clock, reason: str) -> RankResult:
        ids, counts = self.popularity.snapshot(bundle.retriever.item_ids)
        if q.candidate_item_ids:
            want = np.asarray(q.candidate_item_ids, np.int64)
            order = {int(i): r for r, i in enumerate(ids)}
            rank = np.array([order.get(int(i), len(ids)) for i in want])
            ids = want[np.argsort(rank, kind="stable")]
            counts = np.zeros(len(ids))
        k = min(q.k, len(ids))
        top = counts[:k] / counts[0] if k and counts[0] > 0 else np.zeros(k)
        clock.lap("state_read")
        result = RankResult(item_ids=ids[:k].astype(np.int64), scores=top.astype(np.float32),
                            retrieval_scores=np.zeros(k, np.float32), model_version=bundle.version,
                            fallback_reason=reason, candidates_considered=len(ids))
        return self._finish(result, clock)

    def _finish(self, result: RankResult, clock: _Clock) -> RankResult:
        result.timings = clock.finish()
        if result.fallback_reason:
            self.metrics.degraded.labels(reason=result.fallback_reason).inc()
        self.metrics.candidates.observe(result.candidates_considered)
        for s in result.scores.tolist():
            self.metrics.score.observe(s)
        return result
