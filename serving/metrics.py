"""Every Prometheus metric the server exports, declared once, here.

Names follow Prometheus conventions: a ``cascade_`` namespace, base units
(``_seconds``), ``_total`` for counters, no per-user or per-item labels.
`METRIC_NAMES` is the list dashboards and alert rules may use (the Helm chart's
test checks every PromQL metric name against it); histograms also expose
``_bucket``, ``_sum`` and ``_count`` series.

Each server instance owns a `ServingMetrics` on its own `CollectorRegistry`
(so several servers can live in one test process); `serving.app` exposes it
on ``/metrics`` (its own port, `MetricsConfig.address`).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# name -> (type, help). Counters are listed with their exposed ``_total`` name.
RANK_REQUESTS_TOTAL = "cascade_rank_requests_total"
RANK_STAGE_SECONDS = "cascade_rank_stage_seconds"
RANK_CANDIDATES = "cascade_rank_candidates"
RANKING_SCORE = "cascade_ranking_score"
RANKER_BATCH_SIZE = "cascade_ranker_batch_size"
REQUESTS_IN_FLIGHT = "cascade_requests_in_flight"
REQUESTS_SHED_TOTAL = "cascade_requests_shed_total"
DEGRADED_ANSWERS_TOTAL = "cascade_degraded_answers_total"
REDIS_UP = "cascade_redis_up"
CONSUMER_LAG = "cascade_consumer_lag"
CONSUMER_BATCH_SECONDS = "cascade_consumer_batch_seconds"
CONSUMER_RESTARTS_TOTAL = "cascade_consumer_restarts_total"
CONSUMER_SKIPPED_RECORDS_TOTAL = "cascade_consumer_skipped_records_total"
CONSUMER_COMMIT_FAILURES_TOTAL = "cascade_consumer_commit_failures_total"
EVENT_FRESHNESS_SECONDS = "cascade_event_freshness_seconds"
EVENTS_APPLIED_TOTAL = "cascade_events_applied_total"
EVENTS_DEDUPLICATED_TOTAL = "cascade_events_deduplicated_total"
EVENTS_DEAD_LETTERED_TOTAL = "cascade_events_dead_lettered_total"
INGEST_CONFLICTS_TOTAL = "cascade_ingest_conflicts_total"
INGEST_USERS_TOTAL = "cascade_ingest_users_total"
ITEMS_ADDED_TOTAL = "cascade_items_added_total"
ITEMS_REJECTED_TOTAL = "cascade_items_rejected_total"
INDEX_ITEMS = "cascade_index_items"
MODEL_INFO = "cascade_model_info"
MODEL_LOADED_TIMESTAMP_SECONDS = "cascade_model_loaded_timestamp_seconds"
MODEL_SWAPS_TOTAL = "cascade_model_swaps_total"
MODEL_REJECTIONS_TOTAL = "cascade_model_rejections_total"
SDIM_SIGNATURE_RECOMPUTES_TOTAL = "cascade_sdim_signature_recomputes_total"
SDIM_SUMS_FALLBACKS_TOTAL = "cascade_sdim_sums_fallbacks_total"
DEADLINE_DROPPED_TOTAL = "cascade_deadline_dropped_total"
HEALTH_SERVING = "cascade_health_serving"
STATE_REBUILDS_TOTAL = "cascade_state_rebuilds_total"
STATE_REBUILD_SECONDS = "cascade_state_rebuild_seconds"
STATE_REBUILDING = "cascade_state_rebuilding"
CONSUMER_REWINDS_TOTAL = "cascade_consumer_rewinds_total"

METRIC_NAMES: tuple[str, ...] = (
    RANK_REQUESTS_TOTAL, RANK_STAGE_SECONDS, RANK_CANDIDATES, RANKING_SCORE, RANKER_BATCH_SIZE, REQUESTS_IN_FLIGHT,
    REQUESTS_SHED_TOTAL, DEGRADED_ANSWERS_TOTAL, REDIS_UP, CONSUMER_LAG, CONSUMER_BATCH_SECONDS,
    CONSUMER_RESTARTS_TOTAL, CONSUMER_SKIPPED_RECORDS_TOTAL, CONSUMER_COMMIT_FAILURES_TOTAL,
    EVENT_FRESHNESS_SECONDS, EVENTS_APPLIED_TOTAL, EVENTS_DEDUPLICATED_TOTAL, EVENTS_DEAD_LETTERED_TOTAL,
    INGEST_CONFLICTS_TOTAL, INGEST_USERS_TOTAL, ITEMS_ADDED_TOTAL, ITEMS_REJECTED_TOTAL, INDEX_ITEMS, MODEL_INFO,
    MODEL_LOADED_TIMESTAMP_SECONDS, MODEL_SWAPS_TOTAL, MODEL_REJECTIONS_TOTAL, SDIM_SIGNATURE_RECOMPUTES_TOTAL,
    SDIM_SUMS_FALLBACKS_TOTAL,
    DEADLINE_DROPPED_TOTAL, HEALTH_SERVING,
    STATE_REBUILDS_TOTAL, STATE_REBUILD_SECONDS, STATE_REBUILDING, CONSUMER_REWINDS_TOTAL,
)

# Stage names of `cascade_rank_stage_seconds` (and of the debug timings in RankResponse).
STAGES: tuple[str, ...] = (
    "state_read", "user_tower", "ann", "filter_seen", "item_stats", "features", "ranker", "topk", "total",
)

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)
_FRESHNESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _counter_base(name: str) -> str:
    return name.removesuffix("_total")


class ServingMetrics:
    """The metric objects of one server, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(_counter_base(RANK_REQUESTS_TOTAL), "gRPC requests by method and final status code",
                                ["method", "status"], registry=r)
        self.stage_seconds = Histogram(RANK_STAGE_SECONDS, "Rank latency per pipeline stage ('total' = whole handler)",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram(RANK_CANDIDATES, "Candidates ranked per request (after dropping seen items)",
                                    buckets=(0, 10, 50, 100, 200, 500, 1000, 2000, 5000), registry=r)
        self.ranker_batch = Histogram(RANKER_BATCH_SIZE, "Requests per ranker forward (micro-batching; 1 = alone)",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.score = Histogram(RANKING_SCORE, "Ranker scores of the returned items",
                               buckets=tuple(i / 10 for i in range(1, 11)), registry=r)
        self.in_flight = Gauge(REQUESTS_IN_FLIGHT, "Requests accepted and not finished (queued for a handler or running)",
                               registry=r)
        self.shed = Counter(_counter_base(REQUESTS_SHED_TOTAL), "Requests rejected with RESOURCE_EXHAUSTED (load shedding)",
                            registry=r)
        self.degraded = Counter(_counter_base(DEGRADED_ANSWERS_TOTAL),
                                "Answers not from the full pipeline, by fallback reason", ["reason"], registry=r)
        self.redis_up = Gauge(REDIS_UP, "1 when the last Redis health probe succeeded", registry=r)
        self.consumer_lag = Gauge(CONSUMER_LAG, "Messages behind the partition's high watermark",
                                  ["topic", "partition"], registry=r)
        self.consumer_batch_seconds = Histogram(CONSUMER_BATCH_SECONDS, "Time to apply one polled batch (decode to commit)",
                                                ["topic"], buckets=_LATENCY_BUCKETS, registry=r)
        self.consumer_restarts = Counter(_counter_base(CONSUMER_RESTARTS_TOTAL),
                                         "Unexpected errors in a consumer (events, items, models) retried after a "
                                         "backoff", ["consumer"], registry=r)
        self.consumer_skipped = Counter(_counter_base(CONSUMER_SKIPPED_RECORDS_TOTAL),
                                        "Records that kept failing at the same offset, dead-lettered and skipped",
                                        ["topic"], registry=r)
        self.consumer_commit_failures = Counter(_counter_base(CONSUMER_COMMIT_FAILURES_TOTAL),
                                                "Offset commits refused (a rebalance moved the partitions; the new "
                                                "owner re-reads them and the dedupe marks make that a no-op)",
                                                ["consumer"], registry=r)
        self.freshness = Histogram(EVENT_FRESHNESS_SECONDS,
                                   "Event produced (Kafka timestamp) to visible in Redis (up to 256 evenly spaced "
                                   "events per applied batch)", buckets=_FRESHNESS_BUCKETS, registry=r)
        self.events_applied = Counter(_counter_base(EVENTS_APPLIED_TOTAL), "Events written to the online state",
                                      registry=r)
        self.events_deduplicated = Counter(_counter_base(EVENTS_DEDUPLICATED_TOTAL),
                                           "Redelivered events skipped (event_id already applied)", registry=r)
        self.events_dead_lettered = Counter(_counter_base(EVENTS_DEAD_LETTERED_TOTAL),
                                            "Malformed messages sent to the dead-letter topic, by source topic and reason",
                                            ["topic", "reason"], registry=r)
        self.ingest_conflicts = Counter(_counter_base(INGEST_CONFLICTS_TOTAL),
                                        "Ingest transactions retried because another writer changed a user's state",
                                        registry=r)
        self.ingest_users = Counter(_counter_base(INGEST_USERS_TOTAL),
                                    "Users of applied batches by where their state came from: read (from Redis), "
                                    "cached (the consumer's own last write, not read), stale (cached, but changed "
                                    "by another writer: read again)", ["source"], registry=r)
        self.items_added = Counter(_counter_base(ITEMS_ADDED_TOTAL), "Items added to the ANN index from the items topic",
                                   registry=r)
        self.items_rejected = Counter(_counter_base(ITEMS_REJECTED_TOTAL), "Items not added, by reason", ["reason"],
                                      registry=r)
        self.index_items = Gauge(INDEX_ITEMS, "Items searchable in the ANN index", registry=r)
        self.model_info = Gauge(MODEL_INFO, "1 for the model version being served", ["version"], registry=r)
        self.model_loaded_ts = Gauge(MODEL_LOADED_TIMESTAMP_SECONDS, "When the served model was swapped in (Unix s)",
                                     registry=r)
        self.model_swaps = Counter(_counter_base(MODEL_SWAPS_TOTAL), "Model versions swapped in", registry=r)
        self.model_rejections = Counter(_counter_base(MODEL_REJECTIONS_TOTAL), "Model artifacts rejected, by reason",
                                        ["reason"], registry=r)
        self.sdim_recomputes = Counter(_counter_base(SDIM_SIGNATURE_RECOMPUTES_TOTAL),
                                       "Requests whose stored SDIM signatures were from another model and were recomputed",
                                       registry=r)
        self.sdim_sums_fallbacks = Counter(_counter_base(SDIM_SUMS_FALLBACKS_TOTAL),
                                           "Requests whose ranker scanned the behaviors because the stored SDIM "
                                           "bucket sums could not be used, by reason (missing: none stored; version: "
                                           "another model's; point_in_time: the request sees fewer behaviors)",
                                           ["reason"], registry=r)
        self.deadline_dropped = Counter(_counter_base(DEADLINE_DROPPED_TOTAL),
                                        "Requests dropped because their deadline passed before a stage (that stage "
                                        "and the later ones were not computed), by stage", ["stage"], registry=r)
        self.health_serving = Gauge(HEALTH_SERVING, "1 while the gRPC health check is SERVING: live (process), ready "
                                    "(can answer, maybe degraded), full (every dependency healthy)", ["check"],
                                    registry=r)
        self.state_rebuilds = Counter(_counter_base(STATE_REBUILDS_TOTAL),
                                      "Online state rebuilds after Redis came back empty (snapshot + stream), by outcome",
                                      ["outcome"], registry=r)
        self.state_rebuild_seconds = Gauge(STATE_REBUILD_SECONDS, "How long the last rebuild by this server took",
                                           registry=r)
        self.state_rebuilding = Gauge(STATE_REBUILDING, "1 while Redis holds no state epoch (being rebuilt)", registry=r)
        self.consumer_rewinds = Counter(_counter_base(CONSUMER_REWINDS_TOTAL),
                                        "Event partitions rewound to a new state epoch's snapshot offsets", registry=r)
        self._version: str | None = None

    def set_model(self, version: str) -> None:
        if self._version is not None:
            self.model_info.remove(self._version)
        self.model_info.labels(version=version).set(1)
        self.model_loaded_ts.set(time.time())
        self._version = version
