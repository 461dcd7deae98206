"""A ranking request -> scored items. No grpc here: `serving.servicer` translates proto <-> these types.

The request path is a sequence of stages (`Runtime.stages`), each a small
function over one `RequestContext` (read state -> retrieve -> filter ->
candidate features -> rank -> select). What every stage needs is done once,
by the runner (`Runtime.rank`): it times each stage into
``cascade_rank_stage_seconds{stage}`` (and `RankResult.timings`), checks the
deadline before each (a request whose deadline has passed, say while it
queued for a handler thread, is answered DEADLINE_EXCEEDED instead of
computed, and counted in ``cascade_deadline_dropped_total{stage}`` by the
stage it skipped), and answers degraded when Redis is unavailable:

    state_read   one Redis GET: sequence + SDIM signatures and bucket sums + counters + attributes
    user_tower   the retriever's user embedding of the user as of the request time
    ann          top-N of the ANN index (+ room for the seen items that will be dropped)
    filter_seen  drop items the user already interacted with (exclude_seen)
    item_stats   the candidates' counters: rows of the refreshed catalog snapshot (serving/item_features.py),
                 or one Redis MGET (point-in-time requests, no fresh snapshot, `item_stats: request`)
    features     the candidates' dense features and the batch
    ranker       the ranker's probabilities, in one forward with the other requests waiting for theirs
                 (micro-batching, serving/microbatch.py); with an SDIM ranker, from the user's stored bucket sums (each
                 candidate gathers its m buckets, the L behaviors are not scanned) when they are this model's
                 and cover what the request sees, else by the scan (``cascade_sdim_sums_fallbacks_total``)
    topk         the best k

Degraded answers never raise: a user with no behaviors before the request
time (unknown, or only impressions) gets popular items ranked by the ranker
(``cold_start``); Redis down -> the in-memory popularity list
(``redis_unavailable``); the index failing -> popular items ranked by the ranker
(``index_unavailable``). Each is counted in ``cascade_degraded_answers_total``.

The request's batch is validated once, piece by piece where `serving.batching`
builds it, before a model reads it (why the models do not: `batching.user_batch`).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from features.batch import Batch
from features.candidate_lists import retrieval_products, retrieval_similarities
from features.list_context import recent_items, second_stage_dense
from retrieval.lists import candidate_vectors
from serving.batching import UserView, candidate_dense, user_batch, user_view, with_candidates
from serving.catalog import ItemCatalog
from serving.config import LimitsConfig, RuntimeConfig
from serving.errors import DeadlineExceeded, InvalidRequest, NoModelLoaded, StateUnavailable
from serving.metrics import ServingMetrics
from serving.microbatch import RankerBatcher
from serving.item_features import ItemDenseCache
from serving.models import ModelBundle, ModelHolder
from serving.state.base import ItemStats, OnlineStore
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


@dataclass
class RequestContext:
    """One request on its way through `Runtime.stages`: what it asked, what each stage filled in (by field)."""

    query: RankQuery
    bundle: ModelBundle  # the model version answering, fixed for the whole request
    catalog: ItemCatalog  # the catalog snapshot, fixed for the whole request
    as_of: int  # ms: the request time (the query's as_of_ms, or now)
    num_candidates: int  # the query's, or the server default
    clock: _Clock  # the timings so far
    record: UserRecord | None = None  # state_read: the user's record (None: no state)
    view: UserView | None = None  # user_tower: the user as of `as_of`
    sigs: np.ndarray | None = None  # user_tower: the history's SDIM signatures (None: the ranker reads none)
    sums: BucketSums | None = None  # user_tower: the stored SDIM bucket sums, when usable
    seen: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # user_tower: to exclude (may repeat)
    user: Batch | None = None  # the user part of the batches, built on first use (`Runtime._user_batch`)
    user_vec: np.ndarray | None = None  # (1, D) the user tower's vector, when computed
    cands: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # ann, filter_seen: (N,) item ids
    retrieval: np.ndarray | None = None  # (N,) float32 retriever scores; filter_seen fills unknown ones with 0
    dense: np.ndarray | None = None  # item_stats or features: (N, Dc) candidate dense features
    stats: ItemStats | None = None  # item_stats: the candidates' counters (None: not read)
    batch: Batch | None = None  # features: the ranker's batch
    scores: torch.Tensor | None = None  # ranker: (N,) probabilities (a second stage's logits)
    top: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # topk: (k,) rows of cands, best first
    fallback: str = ""  # why the answer is degraded ("": it is not)

    @property
    def cold(self) -> bool:
        """No behaviors before the request time: nothing for the user tower to read."""
        return self.view.history_length == 0

    @property
    def retrieves(self) -> bool:
        """The candidates come from the index (not the client's list, not popularity for a cold user)."""
        return not self.query.candidate_item_ids and not self.cold


def exact_scores(retriever, uvec: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """(N,) float32 retriever scores of the given items for one user vector (0 for items it does not index)."""
    return (candidate_vectors(retriever, item_ids) @ uvec.astype(np.float32)).astype(np.float32)


def second_stage_scale(bundle: ModelBundle) -> float:
    """The retriever's logit per unit of score, which a second-stage ranker's base column is in."""
    scale = bundle.retriever.logit_scale
    if not scale:
        raise ValueError(f"model {bundle.version}: the ranker is a second stage but the retriever export records "
                         f"no logit_scale; re-export the retriever")
    return float(scale)


def list_dense(bundle: ModelBundle, retrieval: np.ndarray, cands: np.ndarray, history: np.ndarray,
               as_of: int, user_vec: np.ndarray | None = None) -> np.ndarray:
    """A second-stage ranker's candidate_dense for one served list (best first): the list features of the
    retriever's logits, then the context features as of now when the ranker reads them, then the retriever-vector
    features it reads: the per-dimension logit terms from `user_vec` (D,) (zero without a user vector: a cold
    user's list has no retriever logits either) and the similarities to the last behaviors, then the item-item
    features from the last behaviors (`features.list_context.second_stage_dense`, `features.candidate_lists` and
    `features.item_item`, the functions training used)."""
    scale = second_stage_scale(bundle)
    hist_len = np.array([len(history)], np.int64)

    def last(width: int) -> np.ndarray:  # (1, width) the request's last behaviors, right-aligned
        return recent_items(np.array([0, len(history)], np.int64), history, np.array([0]), hist_len, width)

    vectors = []
    dim = max(int(getattr(bundle.ranker.cfg, "retrieval_products", 0)), 0)
    sim_k = max(int(getattr(bundle.ranker.cfg, "retrieval_similarity", 0)), 0)
    cand_vecs = candidate_vectors(bundle.retriever, cands)[None] if dim or sim_k else None
    if dim:
        u = np.zeros(dim, np.float32) if user_vec is None else np.asarray(user_vec, np.float32).reshape(-1)
        vectors.append(retrieval_products(u[None, :] * np.float32(scale), cand_vecs))
    if sim_k:
        recent_k = last(sim_k)
        vectors.append(retrieval_similarities(cand_vecs, candidate_vectors(bundle.retriever, np.maximum(recent_k, 0)),
                                              recent_k >= 0))
    context = bundle.ranker.context
    recent = last(context.window) if context is not None else None
    item_item = getattr(bundle.ranker, "item_item", None)
    if item_item is not None:
        item_item = item_item.list_features(last(bundle.ranker.item_item_history), cands[None, :])
    return second_stage_dense(retrieval[None, :] * scale, cands[None, :], context, recent, hist_len,
                              request_ts=np.array([as_of], np.int64),
                              vectors=np.concatenate(vectors, 1) if vectors else None, item_item=item_item)


def _ranker_logits(ranker, batch: Batch) -> torch.Tensor:
    return ranker.logits(batch).float()


def _ranker_probabilities(ranker, batch: Batch) -> torch.Tensor:
    return ranker.forward(batch).float()


class Runtime:
    """A `RankQuery` -> a `RankResult` through `stages`, in order, over one `RequestContext`. The runner (`rank`)
    checks the deadline before each stage, times each, answers from popularity when Redis is unavailable and
    counts the degraded answers; a stage only computes."""

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
        self.batcher = (RankerBatcher(cfg.ranker_batch_max, cfg.ranker_batch_wait_ms, metrics.ranker_batch.observe)
                        if cfg.ranker_batch_max > 1 else None)
        # (name, stage) in request order; the names label the timings and the deadline drops
        self.stages: tuple[tuple[str, Callable[[RequestContext], None]], ...] = (
            ("state_read", self._read_state),  # read state
            ("user_tower", self._user_tower),  # retrieve
            ("ann", self._ann),
            ("filter_seen", self._filter_seen),  # filter
            ("item_stats", self._item_stats),  # candidate features
            ("features", self._features),
            ("ranker", self._rank),  # rank
            ("topk", self._select),  # select
        )

    def close(self) -> None:
        """Stops the ranker's micro-batching worker (after the forwards already submitted)."""
        if self.batcher is not None:
            self.batcher.close()

    # ------------------------------------------------------------------ the runner
    def rank(self, q: RankQuery, deadline: Deadline = Deadline(None)) -> RankResult:
        validate_query(q, self.limits)
        bundle = self.models.current
        if bundle is None:
            raise NoModelLoaded("no model version is loaded yet (health is NOT_SERVING); retry later")
        clock = _Clock(self.metrics)
        ctx = RequestContext(q, bundle, self.catalog.current, as_of=q.as_of_ms or int(time.time() * 1000),
                             num_candidates=q.num_candidates or self.limits.default_num_candidates, clock=clock)
        try:
            for stage, run in self.stages:
                if deadline.expired():  # counted by the stage it skips
                    self.metrics.deadline_dropped.labels(stage=stage).inc()
                    deadline.check(stage)
                run(ctx)
                clock.lap(stage)
        except StateUnavailable as e:  # Redis down, known or found by this request: the popularity answer
            self.availability.down(str(e))
            return self._finish(self._popular(ctx, "redis_unavailable"), clock)
        top = ctx.top
        result = RankResult(
            item_ids=ctx.cands[top], scores=ctx.scores.numpy()[top].astype(np.float32),
            retrieval_scores=ctx.retrieval[top], model_version=bundle.version, fallback_reason=ctx.fallback,
            history_length=ctx.view.history_length, candidates_considered=len(ctx.cands),
        )
        return self._finish(result, clock)

    def _popular(self, ctx: RequestContext, reason: str) -> RankResult:
        """The in-memory popularity list (the client's candidates in its order), scored relative to the top."""
        q = ctx.query
        ids, counts = self.popularity.snapshot(ctx.bundle.retriever.item_ids)
        if q.candidate_item_ids:
            want = np.asarray(q.candidate_item_ids, np.int64)
            order = {int(i): r for r, i in enumerate(ids)}
            rank = np.array([order.get(int(i), len(ids)) for i in want])
            ids = want[np.argsort(rank, kind="stable")]
            counts = np.zeros(len(ids))
        k = min(q.k, len(ids))
        top = counts[:k] / counts[0] if k and counts[0] > 0 else np.zeros(k)
        ctx.clock.lap("state_read")  # timed as the stage it answers instead of
        return RankResult(item_ids=ids[:k].astype(np.int64), scores=top.astype(np.float32),
                          retrieval_scores=np.zeros(k, np.float32), model_version=ctx.bundle.version,
                          fallback_reason=reason, candidates_considered=len(ids))

    def _finish(self, result: RankResult, clock: _Clock) -> RankResult:
        result.timings = clock.finish()
        if result.fallback_reason:
            self.metrics.degraded.labels(reason=result.fallback_reason).inc()
        self.metrics.candidates.observe(result.candidates_considered)
        for s in result.scores.tolist():
            self.metrics.score.observe(s)
        return result

    # ------------------------------------------------------------------ the stages
    def _read_state(self, ctx: RequestContext) -> None:
        """The user's record: one Redis GET (none while Redis is known down, until the health probe sees it up)."""
        if not self.availability.redis_up:
            raise StateUnavailable(self.availability.last_error)  # the runner answers as for a failed read
        ctx.record = self.store.read_user(ctx.query.user_id)

    def _user_tower(self, ctx: RequestContext) -> None:
        """The user as of the request time (``cold_start`` without behaviors before it), and the user tower's
        vector when the index will be searched."""
        q, bundle = ctx.query, ctx.bundle
        ctx.view = view = user_view(q.user_id, ctx.record, ctx.as_of, bundle.dense)
        ctx.sigs = self._signatures(bundle, ctx.record, view)
        ctx.sums = self._bucket_sums(bundle, ctx.record, view)
        ctx.fallback = "cold_start" if ctx.cold else ""
        if q.exclude_seen:
            ctx.seen = view.seq.item_ids
        if ctx.retrieves:
            ctx.user_vec = bundle.retriever.user_embedding(self._user_batch(ctx)).detach().float().numpy()  # (1, D)

    def _ann(self, ctx: RequestContext) -> None:
        """The candidates: the client's, popular items for a cold user, else the index's top-N plus room for the
        seen items `filter_seen` drops; popular items when the index fails (``index_unavailable``)."""
        q, bundle = ctx.query, ctx.bundle
        if q.candidate_item_ids:
            ctx.cands = np.asarray(q.candidate_item_ids, np.int64)
            return
        if not ctx.retrieves:
            ctx.cands = self._popular_ids(ctx)
            return
        n = ctx.num_candidates
        want = min(len(bundle.index), n + min(len(ctx.seen), 4 * n))
        try:
            ids, sc = bundle.index.search(ctx.user_vec, want)
            ok = ids[0] >= 0
            ctx.cands, ctx.retrieval = ids[0][ok], sc[0][ok]
            self.availability.index_ok()
        except Exception as e:  # the index failing must not fail the request
            log.warning("ANN search failed, answering from popularity: %s", e)
            self.availability.index_failed(f"{type(e).__name__}: {e}")
            ctx.fallback = "index_unavailable"
            ctx.cands = self._popular_ids(ctx)

    def _filter_seen(self, ctx: RequestContext) -> None:
        """Drops the seen items (exclude_seen) and keeps the best `num_candidates` of a server-made list; every
        candidate gets its retriever score (0 when unknown). A second-stage ranker corrects the retriever's
        logits, so there the client's and popularity candidates are scored exactly and put in that order."""
        q, bundle = ctx.query, ctx.bundle
        cands, retrieval = ctx.cands, ctx.retrieval
        if len(ctx.seen):
            keep = ~np.isin(cands, ctx.seen)
            cands = cands[keep]
            retrieval = None if retrieval is None else retrieval[keep]
        if not q.candidate_item_ids:
            cands = cands[:ctx.num_candidates]
            retrieval = None if retrieval is None else retrieval[:ctx.num_candidates]
        if bundle.ranker.second_stage and (retrieval is None or q.candidate_item_ids) and len(cands) and not ctx.cold:
            if ctx.user_vec is None:
                ctx.user_vec = bundle.retriever.user_embedding(self._user_batch(ctx)).detach().float().numpy()
            retrieval = exact_scores(bundle.retriever, ctx.user_vec[0], cands)
            order = np.argsort(-retrieval, kind="stable")  # the list's order: best first
            cands, retrieval = cands[order], retrieval[order]
        ctx.cands = cands
        ctx.retrieval = retrieval if retrieval is not None else np.zeros(len(cands), np.float32)

    def _item_stats(self, ctx: RequestContext) -> None:
        """The candidates' dense features where no counters need reading (a second stage's list features; rows
        of the refreshed catalog snapshot for a request at "now" with `item_stats: cached`), else their
        counters: one Redis MGET, unless `item_stats: off`."""
        bundle = ctx.bundle
        if bundle.ranker.second_stage:
            ctx.dense = list_dense(bundle, ctx.retrieval, ctx.cands, ctx.view.seq.item_ids, ctx.as_of,
                                   None if ctx.user_vec is None else ctx.user_vec[0])
        elif self.cfg.item_stats == "cached" and not ctx.query.as_of_ms and self.item_dense is not None:
            ctx.dense = self.item_dense.lookup(ctx.catalog, bundle.dense, ctx.cands, ctx.as_of, self._max_age_ms)
        if ctx.dense is None and self.cfg.item_stats != "off" and len(ctx.cands):
            ctx.stats = self.store.read_item_stats(ctx.cands)

    def _features(self, ctx: RequestContext) -> None:
        """The ranker's batch: the user batch plus the candidates' features (and the stored SDIM sums)."""
        if ctx.dense is None:
            ctx.dense = candidate_dense(ctx.catalog, ctx.cands, ctx.stats, ctx.as_of, ctx.bundle.dense)
        batch = with_candidates(self._user_batch(ctx), ctx.catalog, ctx.cands, ctx.dense, ctx.sums,
                                self.cfg.validate_batches)
        if ctx.bundle.ranker.second_stage:  # it reads the list, not the counters: no user dense features
            batch = dataclasses.replace(batch, user_dense=batch.user_dense[:, :0])
        ctx.batch = batch

    def _rank(self, ctx: RequestContext) -> None:
        """The ranker's probabilities; a second stage's logits (on the retriever's scale, where probabilities
        would saturate into ties). Micro-batched with the other requests waiting, when the batcher is on."""
        ranker = ctx.bundle.ranker
        score = _ranker_logits if ranker.second_stage else _ranker_probabilities
        if not len(ctx.cands):
            ctx.scores = torch.empty(0)
        elif self.batcher is not None:
            ctx.scores = self.batcher.score(ranker, ctx.batch, score)
        else:
            ctx.scores = score(ranker, ctx.batch)

    def _select(self, ctx: RequestContext) -> None:
        """The best k."""
        k = min(ctx.query.k, len(ctx.cands))
        ctx.top = torch.topk(ctx.scores, k).indices.numpy() if k else np.empty(0, np.int64)

    # ------------------------------------------------------------------ helpers of the stages
    def _user_batch(self, ctx: RequestContext) -> Batch:
        """The user part of the request's batches (user tower, second-stage scoring, ranker): built and
        validated once, by the first stage that needs it."""
        if ctx.user is None:
            ctx.user = user_batch(ctx.view, ctx.as_of, ctx.sigs, ctx.bundle.user_keys, self.cfg.validate_batches,
                                  self._history_needed(ctx))
        return ctx.user

    @staticmethod
    def _history_needed(ctx: RequestContext) -> int:
        """The most behaviors a model of this request reads (0: unknown, send all): the user tower's `max_len`
        and the ranker's `history_len` — only its `short_len` when the long-term part comes from the stored
        SDIM sums (the history length the ranker sees is then the sums' coverage, the same either way)."""
        retriever, ranker = ctx.bundle.retriever, ctx.bundle.ranker
        lens = (getattr(retriever, "max_len", None),
                getattr(ranker, "short_len" if ctx.sums is not None else "history_len", None))
        return max(lens) if all(isinstance(n, int) and n > 0 for n in lens) else 0

    def _popular_ids(self, ctx: RequestContext) -> np.ndarray:
        """The popularity list's head, with room for the seen items `filter_seen` drops."""
        return self.popularity.snapshot(ctx.bundle.retriever.item_ids)[0][: ctx.num_candidates + len(ctx.seen)]

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
