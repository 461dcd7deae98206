"""Noticing that Redis came back empty and rebuilding the online state, with every event applied once.

Redis restarted without persistence, or a failover to an empty replica, leaves
the server with no state while the consumer group's committed offsets say
everything was applied. Three pieces fix that:

* **The state epoch.** A key (`OnlineStore.get_epoch`) that bootstrap writes
  and an empty Redis lacks. `StateRebuilder` checks it at start and every
  `rebuild.check_interval_s`.
* **The rebuild.** One replica (under a lock in Redis) deletes what is left
  under the prefix, bootstraps the snapshot (`rebuild.snapshot`, see
  `resolve_snapshot`) with a dedupe mark per loaded event, then installs a new
  epoch that names the snapshot's Kafka offsets (none: the earliest retained
  offset). The epoch key is written last, in one transaction with its offsets.
* **Positions and the fence.** `EpochPositions` is the events consumer's hook:
  ingest writes only while Redis holds the epoch the consumer positioned
  itself for (`OnlineStore.ingest(epoch=...)`, else `EpochChanged` and the
  batch is retried), and on a new epoch every partition is rewound to the
  snapshot offset unless Redis records that its committed offset already
  belongs to this epoch (a rewind commits the snapshot offset, then records
  that). So a partition that moves to another replica, or a server killed
  before it rewound, still restarts at the snapshot offset.

Redis can also come back *with* its epoch but without its last writes (an RDB
older than the crash, a lagging replica promoted). After every commit the
consumer records the committed offset in Redis, compare-and-set against what it
recorded before; a record older than its own (noticed at the next commit), or a
new Redis instance (run_id, noticed by the watcher), sends the partition back
to the offset the restored state records, and the marks dedupe the overlap.

Exactly once in effect: an event before the snapshot's offsets is in the
snapshot and is not consumed again; one after them is consumed at least once
and deduplicated by its mark; one in both (a snapshot newer than its offsets,
or no offsets at all) was marked by the rebuild, so its delivery is a no-op.

A snapshot is a canonical dataset directory (events/, users/) and may carry
``kafka_offsets.json``: ``{"topic": "cascade.events", "offsets": {"0": 1234,
...}}``, per partition the first offset whose event is *not* in the dataset
(whatever archives the events topic into the dataset writes it).
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features import layout
from serving.artifacts import PUBLISHED, VERSION_MANIFEST, VERSIONS
from serving.bootstrap import bootstrap_dataset, new_epoch_id
from serving.config import RebuildConfig, StateConfig
from serving.errors import StateUnavailable
from serving.metrics import ServingMetrics
from serving.models import ModelHolder
from serving.runtime import CatalogRef
from serving.state.base import OnlineStore

log = logging.getLogger(__name__)

OFFSETS_FILE = "kafka_offsets.json"
LOCK = "rebuild_lock"  # key name under the prefix (kept when the rest is deleted)


@dataclass(frozen=True)
class Snapshot:
    dataset: Path  # canonical dataset directory
    as_of_ms: int | None  # only events before this (None: all)
    topic: str | None  # the events topic the offsets are of
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> first offset not in the snapshot
    described: str = ""


def _offsets(dataset: Path) -> tuple[str | None, dict[int, int]]:
    f = dataset / OFFSETS_FILE
    if not f.is_file():
        return None, {}
    try:
        d = json.loads(f.read_text())
        return str(d["topic"]), {int(p): int(o) for p, o in dict(d["offsets"]).items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: expected {{\"topic\": NAME, \"offsets\": {{PARTITION: OFFSET}}}}: {e}") from e


def _from_dataset(dataset: Path, as_of_ms: int | None, described: str) -> Snapshot:
    if not (dataset / "events").is_dir():
        raise FileNotFoundError(f"snapshot dataset {dataset} has no events/ directory ({described})")
    topic, offsets = _offsets(dataset)
    return Snapshot(dataset, as_of_ms, topic, offsets, described)


def _from_features(fdir: Path, described: str) -> Snapshot:
    m = json.loads((fdir / layout.MANIFEST).read_text())
    path = (m.get("input") or {}).get("path")
    if not path or "://" in str(path):
        raise ValueError(f"features snapshot {fdir}: its manifest's input.path {path!r} is not a local dataset directory")
    end = (m.get("time_range") or {}).get("snapshot_end_ms")
    return _from_dataset(Path(path), int(end) if end is not None else None, f"{described}features {fdir}, dataset {path}")


def resolve_snapshot(path: Path) -> Snapshot:
    """The dataset to rebuild from: `path` is a pipeline artifacts directory (its published version's
    features snapshot), a `cascade build-features` output (its input dataset, up to its snapshot end) or
    a canonical dataset directory. Raises FileNotFoundError / ValueError naming what is missing."""
    path = Path(path)
    if (path / PUBLISHED).is_file():
        version = json.loads((path / PUBLISHED).read_text())["version"]
        man = path / VERSIONS / version / VERSION_MANIFEST
        if not man.is_file():
            raise FileNotFoundError(f"published version {version} has no {man}")
        fdir = (json.loads(man.read_text()).get("stages", {}).get("features") or {}).get("dir")
        if not fdir:
            raise ValueError(f"{man} records no features directory (stages.features.dir)")
        return _from_features(Path(fdir), f"published version {version}: ")
    if (path / "events").is_dir():
        return _from_dataset(path, None, f"dataset {path}")
    if (path / layout.MANIFEST).is_file():
        return _from_features(path, "")
    raise FileNotFoundError(f"rebuild.snapshot {path} is neither a pipeline artifacts directory ({PUBLISHED}), "
                            f"a features directory ({layout.MANIFEST}) nor a canonical dataset (events/)")


@dataclass(frozen=True)
class Epoch:
    id: str
    rewind: bool  # False: an adopted/bootstrapped state, the consumers keep their committed offsets
    topic: str | None = None
    offsets: dict[int, int] = field(default_factory=dict)

    def start(self, topic: str, partition: int) -> int | None:
        """Where a partition starts in this epoch (None: the earliest retained offset)."""
        return self.offsets.get(partition) if topic == self.topic else None


class StateRebuilder(threading.Thread):
    """Watches the state epoch; rebuilds the state when Redis lost it. `rebuilding` is True meanwhile."""

    def __init__(self, cfg: RebuildConfig, store: OnlineStore, state: StateConfig, catalog: CatalogRef,
                 models: ModelHolder, metrics: ServingMetrics) -> None:
        super().__init__(name="state-rebuild", daemon=True)
        self.cfg = cfg
        self.store = store
        self.state = state
        self.catalog = catalog
        self.models = models
        self.metrics = metrics
        self.current: Epoch | None = None  # the epoch Redis holds, as last read (None: not known yet)
        self.rebuilding = False
        self._read_once = False  # whether an epoch check has reached Redis yet
        self._instance: str | None = None  # the Redis instance (run_id) last seen
        self.resyncs = 0  # times Redis restarted / failed over keeping its epoch (maybe without its last writes)
        self._stop_evt = threading.Event()

    def check(self) -> Epoch | None:
        """One probe: read the epoch, rebuild when it is gone. Returns the current epoch (None: unknown)."""
        try:
            eid = self.store.get_epoch()
            first, self._read_once = not self._read_once, True
            if eid is None:
                if first and self._holds_state():
                    # a state written before epochs existed (an upgrade): keep it and its positions
                    self.store.create_epoch(new_epoch_id(), {"epoch_rewind": "none"}, replace=False)
                    log.warning("online state under the prefix has no epoch: adopted as it is")
                else:
                    self.rebuild()
                eid = self.store.get_epoch()
            if eid is not None and (self.current is None or eid != self.current.id):
                self.current = self._read(eid)
                log.info("online state epoch %s (%s)", eid, "consumers rewind to its snapshot offsets"
                         if self.current.rewind else "consumers keep their committed offsets")
            self.rebuilding = eid is None
            rid = self.store.instance_id()
            if self._instance is not None and rid != self._instance and eid is not None:
                self.resyncs += 1
                log.warning("Redis restarted or failed over keeping state epoch %s: the consumers resume where "
                            "it last recorded applying events (writes after that may be gone)", eid)
            self._instance = rid
        except StateUnavailable as e:  # Redis down (degraded mode) or gone mid-rebuild: the next check retries
            (log.warning if self.rebuilding else log.debug)("state epoch not checked: %s", e)
        self.metrics.state_rebuilding.set(1 if self.rebuilding else 0)
        return self.current

    def _holds_state(self) -> bool:
        meta = self.store.get_meta()
        return bool(meta) and not meta.get("rebuilding")

    def _read(self, eid: str) -> Epoch:
        meta = self.store.get_meta()
        if meta.get("epoch_id") != eid:  # an epoch without its record: treat as a fresh state
            return Epoch(eid, rewind=True)
        offsets = {int(p): int(o) for p, o in json.loads(meta.get("epoch_offsets") or "{}").items()}
        return Epoch(eid, meta.get("epoch_rewind") == "snapshot", meta.get("epoch_topic") or None, offsets)

    def rebuild(self) -> bool:
        """Rebuilds the state unless another replica is doing it (then returns False and waits for its epoch)."""
        token = uuid.uuid4().hex
        self.rebuilding = True
        self.metrics.state_rebuilding.set(1)
        if not self.store.acquire_rebuild_lock(token, self.cfg.lock_ttl_s):
            log.info("the online state is being rebuilt by another replica")
            return False
        t0 = time.perf_counter()
        log.warning("the online state is empty (no epoch in Redis): rebuilding it from %s",
                    self.cfg.snapshot or "the events topic alone (no rebuild.snapshot)")
        try:
            snap = resolve_snapshot(self.cfg.snapshot) if self.cfg.snapshot is not None else None
            self.store.flush_prefix(keep=(LOCK,))  # a partial state is worse than none
            eid = new_epoch_id()
            self.store.set_meta({"rebuilding": token})
            info: dict[str, Any] = {"epoch_id": eid, "epoch_rewind": "snapshot", "rebuilding": "",
                                    "epoch_topic": "", "epoch_offsets": "{}", "epoch_source": "events topic"}
            if snap is not None:
                bundle = self.models.current
                s = bootstrap_dataset(self.store, snap.dataset, self.state, self.catalog.current, snap.as_of_ms,
                                      bundle=bundle if bundle is not None and bundle.sig_spec else None,
                                      marks=self.cfg.dedupe_marks, set_epoch=False)
                info.update(epoch_topic=snap.topic or "", epoch_offsets=json.dumps(snap.offsets),
                            epoch_source=snap.described)
                log.info("rebuild: %d users, %d events from %s (as of %s); consumers resume at %s", s.users,
                         s.events, snap.described, s.as_of_ms, snap.offsets or "the earliest retained offsets")
            self.store.create_epoch(eid, {k: str(v) for k, v in info.items()}, replace=True)
        except BaseException:
            self.metrics.state_rebuilds.labels(outcome="failed").inc()
            raise
        finally:
            try:
                self.store.release_rebuild_lock(token)
            except StateUnavailable:
                pass  # expires by itself
        secs = time.perf_counter() - t0
        self.metrics.state_rebuilds.labels(outcome="done").inc()
        self.metrics.state_rebuild_seconds.set(secs)
        log.warning("online state rebuilt in %.1fs: epoch %s", secs, eid)
        return True

    def run(self) -> None:
        wait = self.cfg.check_interval_s
        while not self._stop_evt.wait(wait):
            try:
                self.check()
                wait = self.cfg.check_interval_s
            except Exception:  # a failed rebuild (bad snapshot, Redis gone mid-way) is retried, backing off
                wait = min(max(wait * 2, 1.0), 60.0)
                log.exception("state rebuild failed; retrying in %.1fs", wait)

    def stop(self) -> None:
        self._stop_evt.set()


def _key(tp: Any) -> str:
    return f"{tp.topic}:{tp.partition}"


class EpochPositions:
    """The events consumer's hook (`EventsConsumer.positions`): positions its partitions for the current
    epoch before anything of theirs is applied, and fences the applier's writes to that epoch.

    A partition is rewound by seeking to its start in the epoch and committing that offset at once, then
    recording in Redis that its committed offset belongs to the epoch. Until both succeeded it stays
    unchecked (its records are not applied, the next poll tries again), so whoever holds it next, this
    consumer after a rebalance included, restarts at the epoch's start or at a commit made in the epoch.
    """

    def __init__(self, rebuilder: StateRebuilder, applier: Any, metrics: ServingMetrics) -> None:
        self.rebuilder = rebuilder
        self.store = rebuilder.store
        self.applier = applier
        self.metrics = metrics
        self._epoch: str | None = None
        self._checked: set = set()  # partitions positioned for self._epoch
        self._resyncs = 0
        self._recorded: dict = {}  # partition -> the applied offset last read from / written to Redis
        self._regressed: dict = {}  # partition -> the older applied offset Redis holds (it lost writes)

    @staticmethod
    def _unread(consumer: Any, polled: dict) -> dict:
        for tp, part in polled.items():  # nothing of it applied: fetch it again later
            consumer.seek(tp, part[0].offset)
        return {}

    def after_poll(self, consumer: Any, polled: dict) -> dict:
        """Called right after each poll (records or none); returns the records that may be applied now."""
        cur = self.rebuilder.current
        if cur is None or self.rebuilder.rebuilding:
            return self._unread(consumer, polled)
        if cur.id != self._epoch:
            self._epoch, self._checked, self._recorded, self._regressed = cur.id, set(), {}, {}
        assigned = consumer.assignment()
        self._checked &= assigned
        for tp, r in list(self._regressed.items()):
            del self._regressed[tp]
            self._recorded[tp] = r
            if tp in assigned and (r is not None or cur.rewind):
                self._resume(consumer, polled, tp, r if r is not None else cur.start(tp.topic, tp.partition))
        new = [tp for tp in assigned if tp not in self._checked]
        if new and cur.rewind:
            try:
                done = self.store.partition_epochs([_key(tp) for tp in new])
            except StateUnavailable:
                return self._unread(consumer, polled)
            kept = []
            for tp in new:
                if done.get(_key(tp)) == cur.id:
                    self._checked.add(tp)  # its committed offset is of this epoch already
                    kept.append(tp)
                    continue
                if tp in polled:
                    polled.pop(tp)
                if self._rewind(consumer, tp, cur):
                    self._checked.add(tp)
        else:
            self._checked.update(new)
            kept = new
        resync = self._resyncs != self.rebuilder.resyncs
        verify = [tp for tp in (assigned if resync else kept) if tp in self._checked]
        if verify:
            try:
                self._behind(consumer, polled, verify)
            except StateUnavailable:
                return self._unread(consumer, polled)
            self._resyncs = self.rebuilder.resyncs
        self.applier.epoch = cur.id
        return polled

    def _behind(self, consumer: Any, polled: dict, partitions: list) -> None:
        """Where Redis recorded applying less than the consumer's position (it restarted from an older
        snapshot, or a lagging replica took over), resume there: the marks dedupe what it still holds."""
        from kafka.errors import KafkaError

        applied = self.store.applied_offsets([_key(tp) for tp in partitions])
        for tp in partitions:
            r = applied.get(_key(tp))
            self._recorded[tp] = r
            if r is None:
                continue
            try:
                pos = polled[tp][0].offset if tp in polled else consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            if pos is not None and r < pos:
                self._resume(consumer, polled, tp, r)

    def _resume(self, consumer: Any, polled: dict, tp: Any, offset: int | None) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        polled.pop(tp, None)
        try:
            if offset is None:
                offset = int(consumer.beginning_offsets([tp])[tp])
            consumer.seek(tp, offset)
            consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
        except KafkaError as e:  # the records dropped above are fetched again from the position kept
            log.warning("%s not resumed at %s yet (%s)", _key(tp), offset, e)
            self._regressed[tp] = offset
            return
        self.metrics.consumer_rewinds.inc()
        log.warning("%s resumed at offset %d: the state in Redis ends there", _key(tp), offset)

    def _rewind(self, consumer: Any, tp: Any, cur: Epoch) -> bool:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        start = cur.start(tp.topic, tp.partition)
        try:
            if start is None:
                start = int(consumer.beginning_offsets([tp])[tp])
            consumer.seek(tp, start)
            consumer.commit({tp: OffsetAndMetadata(start, "", -1)})
            self.store.set_partition_epochs({_key(tp): cur.id})
        except (KafkaError, StateUnavailable) as e:  # a rebalance, the broker or Redis away: next poll
            log.warning("%s not rewound for state epoch %s yet (%s)", _key(tp), cur.id, e)
            return False
        self.metrics.consumer_rewinds.inc()
        log.info("%s rewound to offset %d for state epoch %s", _key(tp), start, cur.id)
        return True

    def after_commit(self, offsets: dict) -> None:
        """Called after offsets were committed: records them in Redis, after the state they cover."""
        by_key = {_key(tp): tp for tp in offsets}
        try:
            lost = self.store.set_applied_offsets({_key(tp): (self._recorded.get(tp), off) for tp, off in offsets.items()})
        except StateUnavailable:
            return  # recorded with the next commit
        for key, tp in by_key.items():
            if key in lost:  # Redis holds an older record than we wrote: it lost writes (restart, failover)
                self._regressed[tp] = lost[key]
                log.warning("%s: Redis recorded applying up to %s only; resuming there", key, lost[key])
            else:
                self._recorded[tp] = offsets[tp]
