"""The `items` and `models` consumers: every replica reads all of these topics (no consumer group).

Both topics describe what every server process must hold in memory (the
catalog and index; the served model), so each process assigns itself every
partition and reads from the beginning when it starts (in production these
topics are compacted: the latest item record / announcements).

* items: `features.messages.parse_item` -> `ItemUpdater.add` (catalog + index).
* models: on start, the announcements already on the topic are read to the
  end and the newest one that passes validation is loaded (older ones are
  skipped, not re-validated one by one); afterwards every announcement goes
  through `ModelManager.load`. Malformed messages and rejected artifacts go
  to the dead-letter topic with the reason (when first seen, not again on a
  replay at start); a rejected artifact never replaces the served model.

Supervised like the events consumer (serving/stream/supervise.py): decoding
is total; any other error is counted in ``cascade_consumer_restarts_total``
and retried record by record after a backoff, a record failing
`KafkaConfig.max_record_failures` times in a row is dead-lettered
(``consumer_error``) and skipped, and a failure of the client itself opens a
new one that resumes where the last left off. Because these topics are read
from offset 0 at every start, a record that can never be applied costs a few
retries per start, never a crash loop.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

from features.messages import ModelAnnouncement, Rejection, parse_announcement, parse_item
from serving.config import KafkaConfig
from serving.errors import ArtifactError
from serving.lifecycle import ItemUpdater, ModelManager
from serving.metrics import ServingMetrics
from serving.stream.deadletter import DeadLetters, DeadLetterUnavailable
from serving.stream.supervise import Backoff, RecordFailures, describe

log = logging.getLogger(__name__)


class _BroadcastReader(threading.Thread):
    topic: str
    kind: str  # "items" | "models": the `consumer` label of the supervision metrics

    def __init__(self, cfg: KafkaConfig, topic: str, dead_letters: DeadLetters | None, name: str,
                 metrics: ServingMetrics) -> None:
        super().__init__(name=name, daemon=True)
        self.cfg = cfg
        self.topic = topic
        self.dead_letters = dead_letters
        self.metrics = metrics
        self._stop_evt = threading.Event()
        self.caught_up = threading.Event()  # set once everything on the topic at start was processed
        self.error: BaseException | None = None  # the last unexpected error (the thread goes on)
        self.restarts = 0
        self.failures = RecordFailures(cfg.max_record_failures)
        self._backoff = Backoff(cfg.retry_backoff_s, cfg.retry_backoff_max_s)
        self._positions: dict[Any, int] | None = None  # next offset per partition, once the backlog is done
        self._replaying = False

    def stop(self) -> None:
        self._stop_evt.set()

    def _dead_letter(self, msg: Any, reason: str, detail: str, on_replay: bool = False) -> None:
        # Messages replayed at start were dead-lettered by whoever saw them first: log only
        # (unless `on_replay`: a record skipped because the code fails on it is worth a letter each time).
        if self._replaying and not on_replay:
            log.warning("%s: skipping %s[%d]@%d on replay: %s: %s", self.name, msg.topic, msg.partition, msg.offset,
                        reason, detail)
        elif self.dead_letters is not None:
            self.dead_letters.send(msg, reason, detail)
            try:
                self.dead_letters.flush()
            except DeadLetterUnavailable as e:  # nothing is committed here; the record was still handled
                log.error("%s: %s", self.name, e)

    def _failed(self, e: BaseException, what: str) -> None:
        self.error = e
        self.restarts += 1
        self.metrics.consumer_restarts.labels(consumer=self.kind).inc()
        log.warning("%s: %s failed: %s", self.name, what, describe(e))

    def run(self) -> None:
        while not self._stop_evt.is_set():
            c = None
            try:
                c = self._client()
                self._read(c)
            except Exception as e:
                self._failed(e, "the consumer")
                log.exception("%s: reconnecting after an error", self.name)
                self._stop_evt.wait(self._backoff.next())
            finally:
                if c is not None:
                    try:
                        c.close(autocommit=False)
                    except Exception as e:
                        log.warning("%s close: %s", self.name, describe(e))
        self.caught_up.set()

    def _client(self) -> Any:
        from kafka import KafkaConsumer

        from serving.security import kafka_client_kwargs

        return KafkaConsumer(bootstrap_servers=self.cfg.bootstrap, group_id=None, enable_auto_commit=False,
                             **kafka_client_kwargs(self.cfg),  # SASL / SSL
                             client_id=f"{self.cfg.client_id}-{self.name}", check_crcs=False,
                             fetch_max_wait_ms=self.cfg.fetch_max_wait_ms, max_poll_records=self.cfg.max_poll_records)

    def _read(self, c: Any) -> None:
        from kafka import TopicPartition

        parts = None
        while parts is None and not self._stop_evt.is_set():
            parts = c.partitions_for_topic(self.topic)
            if parts is None:  # the topic does not exist yet
                self.caught_up.set()
                self._stop_evt.wait(1.0)
        if parts is None:
            return
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        c.assign(tps)
        if self._positions is None:
            self._read_backlog(c, tps)
        else:  # a new client after an error: resume where the last one was
            for tp in tps:
                if tp in self._positions:
                    c.seek(tp, self._positions[tp])
                else:
                    c.seek_to_beginning(tp)
        while not self._stop_evt.is_set():
            for tp, part in c.poll(timeout_ms=self.cfg.poll_timeout_ms).items():
                done = self._apply(part)
                if done:
                    self._positions[tp] = part[done - 1].offset + 1
                if done < len(part):  # a record failed: read the partition again from it, after a backoff
                    c.seek(tp, part[done].offset)
                    self._stop_evt.wait(self._backoff.next())
                else:
                    self._backoff.reset()

    def _read_backlog(self, c: Any, tps: list) -> None:
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        backlog: list[Any] = []
        while not self._stop_evt.is_set() and any(c.position(tp) < end[tp] for tp in tps):
            for part in c.poll(timeout_ms=self.cfg.poll_timeout_ms).values():
                backlog.extend(part)
        self._replaying = True
        try:
            self.on_backlog(backlog)
        except Exception as e:  # apply it record by record instead, each partition in order
            self._failed(e, f"a replay of {len(backlog)} messages")
            by_tp: dict[tuple[str, int], list[Any]] = {}
            for m in backlog:
                by_tp.setdefault((m.topic, m.partition), []).append(m)
            for part in by_tp.values():
                start = 0
                while start < len(part) and not self._stop_evt.is_set():
                    start += self._apply(part[start:])
                    if start < len(part):
                        self._stop_evt.wait(self._backoff.next())
        finally:
            self._replaying = False
        self._positions = {tp: c.position(tp) for tp in tps}
        self.caught_up.set()

    def _apply(self, part: Sequence[Any]) -> int:
        """`on_messages(part)`; if it raises, record by record: returns how many records are done (applied or
        skipped after `max_record_failures` failures); the record at the returned index failed this time."""
        try:
            self.on_messages(part)
        except Exception as e:
            self._failed(e, f"a batch of {len(part)} messages")
        else:
            if self.failures:
                for m in part:
                    self.failures.succeeded(m)
            return len(part)
        for i, m in enumerate(part):
            try:
                self.on_messages([m])
            except Exception as e:
                n = self.failures.failed(m)
                if n < self.cfg.max_record_failures:
                    log.warning("%s: %s[%d]@%d failed (%d of %d): %s", self.name, m.topic, m.partition, m.offset, n,
                                self.cfg.max_record_failures, describe(e))
                    return i
                detail = f"failed {n} times at this offset: {describe(e)}"
                log.error("%s: %s[%d]@%d skipped: %s", self.name, m.topic, m.partition, m.offset, detail)
                self._dead_letter(m, "consumer_error", detail, on_replay=True)
                self.metrics.consumer_skipped.labels(topic=m.topic).inc()
            self.failures.succeeded(m)
        return len(part)

    def on_backlog(self, msgs: list[Any]) -> None:
        self.on_messages(msgs)

    def on_messages(self, msgs: Sequence[Any]) -> None:
        raise NotImplementedError


class ItemsReader(_BroadcastReader):
    kind = "items"

    def __init__(self, cfg: KafkaConfig, updater: ItemUpdater, dead_letters: DeadLetters | None) -> None:
        super().__init__(cfg, cfg.topics.items, dead_letters, "items-reader", updater.metrics)
        self.updater = updater

    def on_messages(self, msgs: Sequence[Any]) -> None:
        items = []
        for m in msgs:
            it = parse_item(m.value)
            if isinstance(it, Rejection):
                self.updater.metrics.items_rejected.labels(reason=it.reason).inc()
                self._dead_letter(m, it.reason, it.detail)
            else:
                items.append(it)
        if items:
            n = self.updater.add(items)
            log.info("items: %d added to the catalog, %d indexed", len(items), n)


class ModelsReader(_BroadcastReader):
    kind = "models"

    def __init__(self, cfg: KafkaConfig, manager: ModelManager, dead_letters: DeadLetters | None,
                 on_loaded: Callable[[str], None] | None = None) -> None:
        super().__init__(cfg, cfg.topics.models, dead_letters, "models-reader", manager.metrics)
        self.manager = manager
        self.on_loaded = on_loaded

    def _decode(self, m: Any) -> ModelAnnouncement | None:
        a = parse_announcement(m.value)
        if isinstance(a, Rejection):
            self.manager.metrics.model_rejections.labels(reason=a.reason).inc()
            self._dead_letter(m, a.reason, a.detail)
            return None
        return a

    def _load(self, m: Any, a: ModelAnnouncement) -> bool:
        try:
            self.manager.load(a.uri, a.version, a.checksum)
        except ArtifactError as e:
            self._dead_letter(m, f"rejected_artifact:{e.reason}", e.detail)
            return False
        if self.on_loaded:
            self.on_loaded(a.version)
        return True

    def on_backlog(self, msgs: list[Any]) -> None:
        anns = [(m, a) for m in msgs if (a := self._decode(m)) is not None]
        anns.sort(key=lambda ma: ma[0].timestamp)
        for m, a in reversed(anns):  # newest first; stop at the first that loads
            t0 = time.perf_counter()
            try:
                loaded = self._load(m, a)
            except Exception as e:  # not a verdict on the artifact, but nothing to retry at start: the next older
                self._failed(e, f"loading announced version {a.version}")
                continue
            if loaded:
                log.info("models: started on announced version %s (%.2fs)", a.version, time.perf_counter() - t0)
                return

    def on_messages(self, msgs: Sequence[Any]) -> None:
        for m in msgs:
            a = self._decode(m)
            if a is not None:
                self._load(m, a)
