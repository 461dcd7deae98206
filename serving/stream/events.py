"""The `events` consumer: ingest -> decode/validate -> apply, idempotent under at-least-once.

Per polled batch (up to `KafkaConfig.max_poll_records` messages):

1. decode every message (`features.messages.decode_event`); malformed ones go
   to the dead-letter topic with the reason;
2. drop duplicates inside the batch (first occurrence wins, like the Spark path),
   group the events by user in arrival order;
3. one Redis transaction (`OnlineStore.ingest`): read the users and which event
   ids are already applied, apply the new events
   (`serving.state.update.apply_user_events`: `append_event` semantics,
   counters, SDIM signatures from the served model), write users + dedupe marks +
   item counters + popularity atomically;
4. flush the dead letters, then commit the offsets.

A crash anywhere before 4 redelivers the batch; the dedupe marks (written in
the same transaction as the state) make the replay a no-op for what was
already applied: nothing lost, nothing counted twice. If Redis is down, the
batch is retried (seeking back) until it answers; offsets never move past
unapplied events.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from features.messages import MessageError, decode_event
from features.schema import EVENT_TYPE_NAMES, Event
from features.sequence import action_code
from serving.config import KafkaConfig, StateConfig
from serving.errors import StateUnavailable
from serving.metrics import ServingMetrics
from serving.models import ModelHolder
from serving.runtime import CatalogRef
from serving.state.base import IngestWrite, OnlineStore
from serving.state.codec import UserRecord, encode_item_log
from serving.state.update import UserBatch, apply_user_batch
from serving.stream.deadletter import DeadLetters

log = logging.getLogger(__name__)

FRESHNESS_SAMPLES = 256  # events per batch observed into cascade_event_freshness_seconds


@dataclass
class BatchOutcome:
    messages: int = 0
    applied: int = 0
    deduplicated: int = 0
    dead_lettered: int = 0
    conflicts: int = 0


class EventApplier:
    """Applies a batch of raw `events` messages to the online store (steps 1-3 above)."""

    def __init__(self, state: StateConfig, store: OnlineStore, catalog: CatalogRef, models: ModelHolder,
                 metrics: ServingMetrics, dead_letters: DeadLetters | None, prune_bytes: int = 64 * 1024) -> None:
        self.state = state
        self.store = store
        self.catalog = catalog
        self.models = models
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.prune_bytes = prune_bytes
        self.counted_types = frozenset(state.stats.counted_event_types())
        self.behavior_types = frozenset(state.sequence.behavior_event_types)
        self.newest_ts = 0
        self.epoch: str | None = None  # write only while Redis holds this state epoch (serving.rebuild)
        self.recent_freshness_s: deque[float] = deque(maxlen=100_000)  # exact values, for benchmarks and debugging
        self._codes = {t: action_code(t, 0.0) for t in EVENT_TYPE_NAMES}  # + (label >= 0.5): the action code

    def _arrays(self, events: list[Event], catalog: Any) -> tuple[np.ndarray, ...]:
        n = len(events)
        item = np.fromiter((e.item_id for e in events), np.int64, n)
        ts = np.fromiter((e.ts_ms for e in events), np.int64, n)
        pos = np.fromiter((e.label >= 0.5 for e in events), np.uint8, n)
        codes = self._codes
        act = np.fromiter((codes[e.event_type] for e in events), np.int64, n) + pos  # features.sequence.action_code
        beh = np.fromiter((e.event_type in self.behavior_types for e in events), bool, n)
        cnt = np.fromiter((e.event_type in self.counted_types for e in events), bool, n)
        return item, ts, act, catalog.primary_categories(item), beh, cnt, pos

    def apply(self, msgs: Sequence[Any]) -> BatchOutcome:
        out = BatchOutcome(messages=len(msgs))
        by_user: dict[int, list[Event]] = defaultdict(list)
        produced_ms: dict[str, int] = {}
        for m in msgs:
            try:
                e = decode_event(m.value)
            except MessageError as err:
                out.dead_lettered += 1
                if self.dead_letters is not None:
                    self.dead_letters.send(m, err.reason, err.detail)
                else:
                    self.metrics.events_dead_lettered.labels(topic=m.topic, reason=err.reason).inc()
                continue
            if e.event_id in produced_ms:
                out.deduplicated += 1  # a duplicate inside the batch: the first occurrence wins
                continue
            produced_ms[e.event_id] = m.timestamp
            by_user[e.user_id].append(e)
        if not by_user:
            return out

        catalog = self.catalog.current
        bundle = self.models.current
        sig_spec = bundle.sig_spec if bundle is not None else 0
        signatures = bundle.signatures if sig_spec else None
        st = self.state
        retention = st.retention_ms()
        skipped = [0]
        # every per-event field for the whole batch at once (vectorized), sliced per user below
        arrays = self._arrays([e for evs in by_user.values() for e in evs], catalog)
        bounds, s0 = {}, 0
        for uid, evs in by_user.items():
            bounds[uid] = (s0, s0 + len(evs))
            s0 += len(evs)

        def fn(states, seen) -> IngestWrite:
            w = IngestWrite()
            skipped[0] = 0
            item_a, ts_a, act_a, cat_a, beh_a, cnt_a, pos_a = arrays
            applied_beh, applied_cnt = [], []
            for uid, evs in by_user.items():
                a, b = bounds[uid]
                sel = np.arange(a, b)
                if seen:
                    keep = np.fromiter((e.event_id not in seen for e in evs), bool, len(evs))
                    skipped[0] += int((~keep).sum())
                    if not keep.any():
                        continue
                    sel, evs = sel[keep], [e for e, k in zip(evs, keep) if k]
                bi = sel[beh_a[sel]]
                ci = sel[cnt_a[sel]]
                ub = UserBatch(evs, item_a[bi], ts_a[bi], act_a[bi], cat_a[bi], np.flatnonzero(beh_a[sel]),
                               ts_a[ci], pos_a[ci])
                rec = states.get(uid) or UserRecord.empty()
                w.users[uid] = apply_user_batch(rec, ub, st.sequence, retention, sig_spec, signatures)
                w.marks.extend(e.event_id for e in evs)
                applied_beh.append(bi)
                applied_cnt.append(ci)
            if applied_cnt:  # item counter logs: the applied counted events grouped by item (order is irrelevant)
                idx = np.concatenate(applied_cnt)
                idx = idx[np.argsort(item_a[idx], kind="stable")]
                items, starts = np.unique(item_a[idx], return_index=True)
                for i, part in zip(items.tolist(), np.split(idx, starts[1:])):
                    w.item_logs[i] = encode_item_log(ts_a[part], pos_a[part])
            if applied_beh:
                items, counts = np.unique(item_a[np.concatenate(applied_beh)], return_counts=True)
                w.popularity = dict(zip(items.tolist(), counts.astype(float).tolist()))
            return w

        users = list(by_user)
        res = self.store.ingest(users, [e.event_id for evs in by_user.values() for e in evs], fn, epoch=self.epoch)
        done_ms = time.time() * 1000.0
        out.conflicts = res.conflicts
        out.deduplicated += skipped[0]
        out.applied = len(res.write.marks)
        fresh = [max(0.0, (done_ms - produced_ms[eid]) / 1000.0) for eid in res.write.marks]
        self.recent_freshness_s.extend(fresh)
        obs = self.metrics.freshness.observe
        for f in fresh[::max(1, len(fresh) // FRESHNESS_SAMPLES)]:  # the histogram samples each batch evenly
            obs(f)
        newest = max((e.ts_ms for evs in by_user.values() for e in evs), default=0)
        self.newest_ts = max(self.newest_ts, newest)
        big = [i for i, n in res.item_log_bytes.items() if n > self.prune_bytes]
        if big:
            self.store.prune_item_logs(big, self.newest_ts - retention)
        return out


class EventsConsumer(threading.Thread):
    """The consumer-group loop around `EventApplier` (steps 4 and the retries)."""

    def __init__(self, cfg: KafkaConfig, applier: EventApplier, metrics: ServingMetrics,
                 dead_letters: DeadLetters | None, name: str = "events-consumer") -> None:
        super().__init__(name=name, daemon=True)
        self.cfg = cfg
        self.applier = applier
        self.metrics = metrics
        self.dead_letters = dead_letters
        self._stop_evt = threading.Event()
        self.ready = threading.Event()  # set once partitions are assigned
        self.error: BaseException | None = None
        self.totals = BatchOutcome()
        self.positions = None  # serving.rebuild.EpochPositions: rewinds after a state rebuild (None: off)

    def stop(self) -> None:
        self._stop_evt.set()

    def _consumer(self):
        from kafka import KafkaConsumer

        c = self.cfg
        return KafkaConsumer(
            c.topics.events, bootstrap_servers=c.bootstrap, group_id=c.events_group, client_id=f"{c.client_id}-events",
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=c.max_poll_records,
            session_timeout_ms=c.session_timeout_ms, heartbeat_interval_ms=c.heartbeat_interval_ms,
            fetch_max_bytes=c.fetch_max_bytes, max_partition_fetch_bytes=c.max_partition_fetch_bytes,
            fetch_max_wait_ms=c.fetch_max_wait_ms, check_crcs=False,
        )

    def run(self) -> None:
        from kafka.structs import OffsetAndMetadata

        try:
            consumer = self._consumer()
        except Exception as e:
            self.error = e
            log.error("events consumer could not start: %s", e)
            return
        last_lag = 0.0
        backoff = 0.1
        try:
            while not self._stop_evt.is_set():
                polled = consumer.poll(timeout_ms=self.cfg.poll_timeout_ms)
                if self.positions is not None:  # keep: after a state rebuild, seeks partitions to the snapshot offsets
                    polled = self.positions.after_poll(consumer, polled)
                if consumer.assignment():
                    self.ready.set()
                if time.monotonic() - last_lag > 1.0:
                    self._report_lag(consumer)
                    last_lag = time.monotonic()
                if not polled:
                    continue
                msgs = [m for part in polled.values() for m in part]
                t0 = time.perf_counter()
                try:
                    out = self.applier.apply(msgs)
                    if self.dead_letters is not None:
                        self.dead_letters.flush()
                except StateUnavailable as e:
                    # nothing committed: rewind to the batch's first offsets and retry when Redis answers
                    log.warning("events batch of %d not applied (%s); retrying in %.1fs", len(msgs), e, backoff)
                    for tp, part in polled.items():
                        consumer.seek(tp, part[0].offset)
                    self._stop_evt.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                consumer.commit({tp: OffsetAndMetadata(part[-1].offset + 1, "", -1) for tp, part in polled.items()})
                if self.positions is not None:  # keep: records which partitions' commits belong to the state epoch
                    self.positions.after_commit(polled)
                self.metrics.consumer_batch_seconds.labels(topic=self.cfg.topics.events).observe(time.perf_counter() - t0)
                self.metrics.events_applied.inc(out.applied)
                self.metrics.events_deduplicated.inc(out.deduplicated)
                self.metrics.ingest_conflicts.inc(out.conflicts)
                for f in ("messages", "applied", "deduplicated", "dead_lettered", "conflicts"):
                    setattr(self.totals, f, getattr(self.totals, f) + getattr(out, f))
        except Exception as e:  # surfaced through health/logs; the app decides what to do
            self.error = e
            log.exception("events consumer stopped on an error")
        finally:
            try:
                consumer.close(autocommit=False)
            except Exception:
                pass

    def _report_lag(self, consumer: Any) -> None:
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None:
                continue
            try:
                pos = consumer.position(tp, timeout_ms=100)
            except Exception:
                continue
            if pos is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, hw - pos))
