"""The `events` consumer: ingest -> decode/validate -> apply, idempotent under at-least-once.

Per polled batch (up to `KafkaConfig.max_poll_records` messages):

1. decode every message (`features.messages.decode_event`); malformed ones go
   to the dead-letter topic with the reason;
2. drop duplicates inside the batch (first occurrence wins, like the Spark path),
   group the events by user in arrival order;
3. `OnlineStore.ingest`: read the users and which event ids are already
   applied, apply the new events (`serving.state.update.apply_user_batches`:
   `append_event` semantics, counters, SDIM signatures from the served model;
   a user's events are slices of arrays computed once for the batch), write
   each user with its dedupe marks atomically, and each event's item counters
   and popularity exactly once (one Redis: the whole batch in one script; a
   cluster: per slot, serving/state/redis_store.py says why that is safe);
4. flush the dead letters, then commit the offsets.

A crash anywhere before 4 redelivers the batch; the dedupe marks (written with
the state) make the replay a no-op for what was already applied: nothing lost,
nothing counted twice. If Redis is down, the
batch is retried (seeking back) until it answers; offsets never move past
unapplied events.

Hostile input (serving/stream/supervise.py has the rules): decoding is total
(`features.messages.parse_event`, with `StateConfig.event_bounds` against
this process's clock), so a malformed message is a dead letter, never an
exception. Any other error while applying a batch is retried record by
record, so the batch's good records are applied and committed and only the
failing record waits; after `KafkaConfig.max_record_failures` failures at the
same offset it is dead-lettered and skipped. A refused commit (a rebalance
moved the partitions) is counted and the loop goes on: the next poll rejoins
the group and whoever owns the partitions re-reads from the last commit. An
error outside a batch (the client itself) closes the consumer and opens a new
one after a backoff; the thread never ends before `stop`.

Counter-log pruning is bounded by the wall clock: the retention is counted
back from min(newest event seen, now), so no accepted timestamp (at most
`event_max_future` ahead) can push other events out of a log early.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from features.messages import Rejection, parse_event
from features.schema import Event
from serving.config import KafkaConfig, StateConfig
from serving.errors import StateUnavailable
from serving.metrics import ServingMetrics
from serving.models import ModelHolder
from serving.runtime import CatalogRef
from serving.state.base import BEHAVIOR, COUNTED, IngestWrite, ItemWrite, OnlineStore
from serving.state.codec import ITEM_LOG_DTYPE, UserRecord, encode_item_log
from serving.state.update import EventArrays, apply_user_batches, prune_cutoff
from serving.stream.deadletter import DeadLetters, DeadLetterUnavailable
from serving.stream.supervise import Backoff, RecordFailures, describe

log = logging.getLogger(__name__)

FRESHNESS_SAMPLES = 256  # events per batch observed into cascade_event_freshness_seconds


@dataclass
class BatchOutcome:
    messages: int = 0
    applied: int = 0
    deduplicated: int = 0
    dead_lettered: int = 0
    conflicts: int = 0
    users: int = 0  # users written or read by the batch's ingest
    cached_users: int = 0  # of them, folded from the store's cache of its own writes (not read)
    stale_cached_users: int = 0  # cached, but changed by another writer: read again


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
        self.bounds = state.event_bounds()
        self.counted_types = frozenset(state.stats.counted_event_types())
        self.behavior_types = frozenset(state.sequence.behavior_event_types)
        self.newest_ts = 0
        self.epoch: str | None = None  # write only while Redis holds this state epoch (serving.rebuild)
        self.recent_freshness_s: deque[float] = deque(maxlen=100_000)  # exact values, for benchmarks and debugging

    def apply(self, msgs: Sequence[Any]) -> BatchOutcome:
        out = BatchOutcome(messages=len(msgs))
        by_user: dict[int, list[Event]] = defaultdict(list)
        produced_ms: dict[str, int] = {}
        now_ms = int(time.time() * 1000)
        for m in msgs:
            e = parse_event(m.value, self.bounds, now_ms)
            if isinstance(e, Rejection):
                out.dead_lettered += 1
                if self.dead_letters is not None:
                    self.dead_letters.send(m, e.reason, e.detail)
                else:
                    self.metrics.events_dead_lettered.labels(topic=m.topic, reason=e.reason).inc()
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
        sdim = bundle if sig_spec and bundle.sums_window else None  # keeps SDIM bucket sums beside the sequence
        st = self.state
        retention = st.retention_ms()
        skipped = [0]
        # every per-event field for the whole batch at once (vectorized), the users' events contiguous
        flat = [e for evs in by_user.values() for e in evs]
        arrays = EventArrays.of_events(flat, catalog.primary_categories, self.behavior_types, self.counted_types)
        item_a, ts_a, beh_a, cnt_a, pos_a = arrays.item, arrays.ts, arrays.beh, arrays.cnt, arrays.pos
        eids = [e.event_id for e in flat]
        cuts = np.cumsum([0, *map(len, by_user.values())]).tolist()  # user k's events: [cuts[k], cuts[k + 1])
        flags_a = (cnt_a.astype(np.uint8) * COUNTED) | (beh_a.astype(np.uint8) * BEHAVIOR)
        spans = arrays.spans(cuts)  # user k's batch: slices of the whole batch's arrays (no per-user copies)

        def fn(states, seen) -> IngestWrite:
            w = IngestWrite()
            skipped[0] = 0
            applied = []
            uids: list[int] = []
            recs: list[UserRecord] = []
            ubs: list = []
            for k, uid in enumerate(by_user):
                a, b = cuts[k], cuts[k + 1]
                keep = None
                if seen:
                    keep = np.fromiter((e not in seen for e in eids[a:b]), bool, b - a)
                    if keep.all():
                        keep = None
                    elif not keep.any():
                        skipped[0] += b - a
                        continue
                if keep is None:  # the common case: all new
                    ub = spans[k]
                    w.marks[uid] = eids[a:b]
                    applied.append((a, b))
                else:  # some already applied (a redelivery): the rest, selected
                    skipped[0] += int((~keep).sum())
                    sel = a + np.flatnonzero(keep)
                    ub = arrays.select(sel)
                    w.marks[uid] = [eids[j] for j in sel.tolist()]
                    applied.append(sel)
                uids.append(uid)
                recs.append(states.get(uid) or UserRecord.empty())
                ubs.append(ub)
            # every user of the batch at once (their SDIM sums in a few array operations)
            w.users.update(zip(uids, apply_user_batches(recs, ubs, st.sequence, retention, sig_spec, signatures,
                                                         now_ms, sdim)))
            if applied:  # per item: its applied events' counter records and behaviors, in arrival order
                idx = np.concatenate([np.arange(*x) if isinstance(x, tuple) else x for x in applied])
                idx = idx[flags_a[idx] != 0]
                idx = idx[np.argsort(item_a[idx], kind="stable")]
                items, starts = np.unique(item_a[idx], return_index=True)
                # each item's flags and counter records are slices of two byte strings built once for the batch
                ends = np.r_[starts[1:], len(idx)]
                counted = cnt_a[idx]
                rec_starts = (np.r_[0, np.cumsum(counted)] * ITEM_LOG_DTYPE.itemsize).tolist()
                flags_b = flags_a[idx].tobytes()
                log_b = encode_item_log(ts_a[idx[counted]], pos_a[idx[counted]])
                idx_l = idx.tolist()
                for i, a, b in zip(items.tolist(), starts.tolist(), ends.tolist()):
                    w.items[i] = ItemWrite([eids[j] for j in idx_l[a:b]], flags_b[a:b],
                                           log_b[rec_starts[a]:rec_starts[b]])
            return w

        res = self.store.ingest({u: eids[cuts[k]:cuts[k + 1]] for k, u in enumerate(by_user)}, fn, epoch=self.epoch)
        done_ms = time.time() * 1000.0
        out.conflicts = res.conflicts
        out.users, out.cached_users, out.stale_cached_users = len(by_user), res.cached_users, res.stale_cached_users
        out.deduplicated += skipped[0]
        out.applied = res.write.applied
        if out.applied == len(eids):
            produced = np.fromiter((produced_ms[e] for e in eids), np.float64, len(eids))
        else:
            produced = np.fromiter((produced_ms[e] for m in res.write.marks.values() for e in m), np.float64,
                                   out.applied)
        fresh = (np.maximum(0.0, done_ms - produced) / 1000.0).tolist()
        self.recent_freshness_s.extend(fresh)
        obs = self.metrics.freshness.observe
        for f in fresh[::max(1, len(fresh) // FRESHNESS_SAMPLES)]:  # the histogram samples each batch evenly
            obs(f)
        self.newest_ts = max(self.newest_ts, int(ts_a.max()))
        big = [i for i, n in res.item_log_bytes.items() if n > self.prune_bytes]
        if big:  # the retention counted back from the newest event seen, never from past the wall clock
            self.store.prune_item_logs(big, prune_cutoff(self.newest_ts, retention, now_ms))
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
        self.error: BaseException | None = None  # the last unexpected error (the thread goes on)
        self.restarts = 0
        self.totals = BatchOutcome()
        self.failures = RecordFailures(cfg.max_record_failures)
        self._record_backoff = Backoff(cfg.retry_backoff_s, cfg.retry_backoff_max_s)
        self.positions = None  # serving.rebuild.EpochPositions: rewinds after a state rebuild (None: off)

    def stop(self) -> None:
        self._stop_evt.set()

    def _consumer(self):
        from kafka import KafkaConsumer

        from serving.security import kafka_client_kwargs

        c = self.cfg
        return KafkaConsumer(
            c.topics.events, bootstrap_servers=c.bootstrap, group_id=c.events_group, client_id=f"{c.client_id}-events",
            **kafka_client_kwargs(c),  # SASL / SSL
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=c.max_poll_records,
            session_timeout_ms=c.session_timeout_ms, heartbeat_interval_ms=c.heartbeat_interval_ms,
            fetch_max_bytes=c.fetch_max_bytes, max_partition_fetch_bytes=c.max_partition_fetch_bytes,
            fetch_max_wait_ms=c.fetch_max_wait_ms, check_crcs=False,
        )

    def run(self) -> None:
        """Supervises `_consume`: a failure of the client closes it and opens a new one after a backoff."""
        backoff = Backoff(self.cfg.retry_backoff_s, self.cfg.retry_backoff_max_s)
        while not self._stop_evt.is_set():
            consumer = None
            try:
                consumer = self._consumer()
                self._consume(consumer, backoff)
            except Exception as e:
                self.error = e
                self.restarts += 1
                self.metrics.consumer_restarts.labels(consumer="events").inc()
                delay = backoff.next()
                log.exception("events consumer failed (%s); reconnecting in %.1fs", describe(e), delay)
                self._stop_evt.wait(delay)
            finally:
                if consumer is not None:
                    try:
                        consumer.close(autocommit=False)
                    except Exception as e:
                        log.warning("events consumer close: %s", describe(e))

    def _consume(self, consumer: Any, backoff: Backoff) -> None:
        last_lag = 0.0
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
            t0 = time.perf_counter()
            try:
                done = self._apply_batch(consumer, polled)
            except (StateUnavailable, DeadLetterUnavailable) as e:
                # nothing of the batch committed: rewind and retry when Redis / the dead-letter topic answers
                n = sum(len(p) for p in polled.values())
                delay = backoff.next()
                log.warning("events batch of %d not applied (%s); retrying in %.1fs", n, e, delay)
                self._rewind(consumer, {tp: part[0].offset for tp, part in polled.items()})
                self._stop_evt.wait(delay)
                continue
            if done:
                backoff.reset()
            self.metrics.consumer_batch_seconds.labels(topic=self.cfg.topics.events).observe(time.perf_counter() - t0)

    def _apply_batch(self, consumer: Any, polled: dict) -> bool:
        """Applies and commits a polled batch; False when a record failed and waits for a retry."""
        msgs = [m for part in polled.values() for m in part]
        try:
            out = self.applier.apply(msgs)
            if self.dead_letters is not None:
                self.dead_letters.flush()
        except (StateUnavailable, DeadLetterUnavailable):
            raise
        except Exception as e:
            self.error = e
            self.restarts += 1
            self.metrics.consumer_restarts.labels(consumer="events").inc()
            log.warning("events batch of %d failed (%s); applying it record by record", len(msgs), describe(e))
            return self._apply_one_by_one(consumer, polled)
        if self.failures:
            for m in msgs:
                self.failures.succeeded(m)
        self._record(out)
        self._commit(consumer, {tp: part[-1].offset + 1 for tp, part in polled.items()})
        return True

    def _apply_one_by_one(self, consumer: Any, polled: dict) -> bool:
        """Each record alone, in partition order; a partition stops at its first failing record (rewound
        to it), unless that record has failed `max_record_failures` times: then it is dead-lettered and
        skipped. Commits what was applied; False when something waits for a retry (after a backoff)."""
        commit: dict[Any, int] = {}
        rewind: dict[Any, int] = {}
        unavailable: BaseException | None = None
        for tp, part in polled.items():
            if unavailable is not None:
                rewind[tp] = part[0].offset
                continue
            for m in part:
                try:
                    try:
                        out = self.applier.apply([m])
                        if self.dead_letters is not None:
                            self.dead_letters.flush()
                    except (StateUnavailable, DeadLetterUnavailable):
                        raise
                    except Exception as e:
                        n = self.failures.failed(m)
                        if n < self.cfg.max_record_failures:
                            log.warning("events %s[%d]@%d failed (%d of %d): %s", m.topic, m.partition, m.offset, n,
                                        self.cfg.max_record_failures, describe(e))
                            rewind[tp] = m.offset
                            break
                        self._skip(m, e, n)  # raises DeadLetterUnavailable: not skipped without its letter
                        commit[tp] = m.offset + 1
                        continue
                except (StateUnavailable, DeadLetterUnavailable) as e:
                    unavailable = e
                    rewind[tp] = m.offset
                    break
                self.failures.succeeded(m)
                self._record(out)
                commit[tp] = m.offset + 1
        # what was applied is committed; each partition is read again from its first record not applied
        self._commit(consumer, commit)
        self._rewind(consumer, rewind)
        if unavailable is not None:
            log.warning("events records not applied (%s); retrying", describe(unavailable))
        if rewind:
            self._stop_evt.wait(self._record_backoff.next())
            return False
        self._record_backoff.reset()
        return True

    def _skip(self, m: Any, e: BaseException, n: int) -> None:
        detail = f"failed {n} times at this offset: {describe(e)}"
        log.error("events %s[%d]@%d skipped: %s", m.topic, m.partition, m.offset, detail)
        if self.dead_letters is not None:
            self.dead_letters.send(m, "consumer_error", detail)
            self.dead_letters.flush()  # raises DeadLetterUnavailable: the record is not skipped without its letter
        else:
            self.metrics.events_dead_lettered.labels(topic=m.topic, reason="consumer_error").inc()
        self.metrics.consumer_skipped.labels(topic=m.topic).inc()
        self.failures.succeeded(m)
        self.totals.dead_lettered += 1
        self.totals.messages += 1

    def _record(self, out: BatchOutcome) -> None:
        self.metrics.events_applied.inc(out.applied)
        self.metrics.events_deduplicated.inc(out.deduplicated)
        self.metrics.ingest_conflicts.inc(out.conflicts)
        if out.users:
            users = self.metrics.ingest_users
            users.labels(source="read").inc(out.users - out.cached_users)
            users.labels(source="cached").inc(out.cached_users - out.stale_cached_users)
            users.labels(source="stale").inc(out.stale_cached_users)
        for f in ("messages", "applied", "deduplicated", "dead_lettered", "conflicts", "users", "cached_users",
                  "stale_cached_users"):
            setattr(self.totals, f, getattr(self.totals, f) + getattr(out, f))

    def _commit(self, consumer: Any, offsets: dict[Any, int]) -> None:
        """Commits; a refused commit (rebalance) is counted and tolerated: the partitions' new owner
        re-reads from the last committed offset and the dedupe marks make that a no-op."""
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        if not offsets:
            return
        try:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
            if self.positions is not None:  # keep: records which partitions' commits belong to the state epoch
                self.positions.after_commit(offsets)
        except KafkaError as e:  # CommitFailedError (rebalance), coordinator moves, ...
            self.metrics.consumer_commit_failures.labels(consumer="events").inc()
            log.warning("events offsets not committed (%s): they will be read again, harmlessly", describe(e))

    def _rewind(self, consumer: Any, offsets: dict[Any, int]) -> None:
        owned = consumer.assignment()
        for tp, off in offsets.items():
            if tp in owned:  # a partition revoked meanwhile is re-read by its new owner from the commit
                try:
                    consumer.seek(tp, off)
                except Exception as e:
                    log.warning("events could not rewind %s to %d: %s", tp, off, describe(e))

    def _report_lag(self, consumer: Any) -> None:
        for tp in consumer.assignment():
            try:
                hw = consumer.highwater(tp)
                pos = consumer.position(tp, timeout_ms=100) if hw is not None else None
            except Exception:  # the partition was revoked meanwhile, or the broker is away: next time
                continue
            if pos is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, hw - pos))
