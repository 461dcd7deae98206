"""The `items` and `models` consumers: every replica reads all of these topics (no consumer group).

Both topics describe what every server process must hold in memory (the
catalog and index; the served model), so each process assigns itself every
partition and reads from the beginning when it starts (in production these
topics are compacted: the latest item record / announcements).

* items: `features.messages.decode_item` -> `ItemUpdater.add` (catalog + index).
* models: on start, the announcements already on the topic are read to the
  end and the newest one that passes validation is loaded (older ones are
  skipped, not re-validated one by one); afterwards every announcement goes
  through `ModelManager.load`. Malformed messages and rejected artifacts go
  to the dead-letter topic with the reason (when first seen, not again on a
  replay at start); a rejected artifact never replaces the served model.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from features.messages import MessageError, ModelAnnouncement, decode_item
from serving.config import KafkaConfig
from serving.errors import ArtifactError
from serving.lifecycle import ItemUpdater, ModelManager
from serving.stream.deadletter import DeadLetters

log = logging.getLogger(__name__)


class _BroadcastReader(threading.Thread):
    topic: str

    def __init__(self, cfg: KafkaConfig, topic: str, dead_letters: DeadLetters | None, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.cfg = cfg
        self.topic = topic
        self.dead_letters = dead_letters
        self._stop_evt = threading.Event()
        self.caught_up = threading.Event()  # set once everything on the topic at start was processed
        self.error: BaseException | None = None
        self._replaying = False

    def stop(self) -> None:
        self._stop_evt.set()

    def _dead_letter(self, msg: Any, reason: str, detail: str) -> None:
        # Messages replayed at start were dead-lettered by whoever saw them first: log only.
        if self._replaying:
            log.warning("%s: skipping %s[%d]@%d on replay: %s: %s", self.name, msg.topic, msg.partition, msg.offset,
                        reason, detail)
        elif self.dead_letters is not None:
            self.dead_letters.send(msg, reason, detail)
            self.dead_letters.flush()

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        try:
            c = KafkaConsumer(bootstrap_servers=self.cfg.bootstrap, group_id=None, enable_auto_commit=False,
                              client_id=f"{self.cfg.client_id}-{self.name}", check_crcs=False,
                              fetch_max_wait_ms=self.cfg.fetch_max_wait_ms,
                              max_poll_records=self.cfg.max_poll_records)
        except Exception as e:
            self.error = e
            log.error("%s could not start: %s", self.name, e)
            return
        try:
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
            c.seek_to_beginning(*tps)
            end = c.end_offsets(tps)
            backlog = []
            while not self._stop_evt.is_set() and any(c.position(tp) < end[tp] for tp in tps):
                for part in c.poll(timeout_ms=self.cfg.poll_timeout_ms).values():
                    backlog.extend(part)
            self._replaying = True
            try:
                self.on_backlog(backlog)
            finally:
                self._replaying = False
            self.caught_up.set()
            while not self._stop_evt.is_set():
                for part in c.poll(timeout_ms=self.cfg.poll_timeout_ms).values():
                    self.on_messages(part)
        except Exception as e:
            self.error = e
            log.exception("%s stopped on an error", self.name)
        finally:
            self.caught_up.set()
            c.close(autocommit=False)

    def on_backlog(self, msgs: list[Any]) -> None:
        self.on_messages(msgs)

    def on_messages(self, msgs: list[Any]) -> None:
        raise NotImplementedError


class ItemsReader(_BroadcastReader):
    def __init__(self, cfg: KafkaConfig, updater: ItemUpdater, dead_letters: DeadLetters | None) -> None:
        super().__init__(cfg, cfg.topics.items, dead_letters, "items-reader")
        self.updater = updater

    def on_messages(self, msgs: list[Any]) -> None:
        items = []
        for m in msgs:
            try:
                items.append(decode_item(m.value))
            except MessageError as e:
                self.updater.metrics.items_rejected.labels(reason=e.reason).inc()
                self._dead_letter(m, e.reason, e.detail)
        if items:
            n = self.updater.add(items)
            log.info("items: %d added to the catalog, %d indexed", len(items), n)


class ModelsReader(_BroadcastReader):
    def __init__(self, cfg: KafkaConfig, manager: ModelManager, dead_letters: DeadLetters | None,
                 on_loaded: Callable[[str], None] | None = None) -> None:
        super().__init__(cfg, cfg.topics.models, dead_letters, "models-reader")
        self.manager = manager
        self.on_loaded = on_loaded

    def _decode(self, m: Any) -> ModelAnnouncement | None:
        try:
            return ModelAnnouncement.decode(m.value)
        except MessageError as e:
            self.manager.metrics.model_rejections.labels(reason=e.reason).inc()
            self._dead_letter(m, e.reason, e.detail)
            return None

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
            if self._load(m, a):
                log.info("models: started on announced version %s (%.2fs)", a.version, time.perf_counter() - t0)
                return

    def on_messages(self, msgs: list[Any]) -> None:
        for m in msgs:
            a = self._decode(m)
            if a is not None:
                self._load(m, a)
