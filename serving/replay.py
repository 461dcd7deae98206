"""Replay a canonical events dataset into the `events` topic at a rate (demos and load).

Events are produced in (ts_ms, event_id) order, keyed by user (so each user's
events stay ordered on one partition and arrive in the order the offline path
sorts them). ``fresh_ts`` stamps each event with the current time instead,
keeping that order (timestamps never decrease); ``id_prefix`` renames the
event ids, so replaying a dataset again counts as new events instead of
redeliveries.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.datasets.common import read_table
from features.messages import encode_event, event_key
from features.schema import Event


@dataclass(frozen=True)
class ReplayConfig:
    rate: float = 1000.0  # events/s; 0 = as fast as possible
    users: tuple[int, ...] = ()  # () = all
    limit: int = 0  # 0 = all
    since_ms: int = 0  # only events at or after this Unix ms (e.g. after a bootstrap's as-of time)
    fresh_ts: bool = False
    id_prefix: str = ""
    topic: str = "cascade.events"
    chunk: int = 200  # events sent between two rate checks

    def __post_init__(self) -> None:
        if self.rate < 0 or self.limit < 0 or self.chunk <= 0:
            raise ValueError("replay: rate and limit must be >= 0 and chunk > 0")


@dataclass(frozen=True)
class ReplayResult:
    sent: int
    users: int
    seconds: float


def load_events(dataset: Path, users: tuple[int, ...] = (), limit: int = 0, since_ms: int = 0) -> pa.Table:
    """The dataset's events for `users` (all if empty) at or after `since_ms`, sorted by (ts_ms, event_id),
    at most `limit`."""
    t = read_table(dataset, "events")
    if since_ms:
        t = t.filter(pc.greater_equal(t.column("ts_ms"), since_ms))
    if users:
        t = t.filter(pc.is_in(t.column("user_id"), value_set=pa.array(np.asarray(users, np.int64))))
    t = t.take(pc.sort_indices(t, sort_keys=[("ts_ms", "ascending"), ("event_id", "ascending")]))
    return t.slice(0, limit) if limit else t


def replay_events(dataset: Path, bootstrap: str, cfg: ReplayConfig,
                  progress: Callable[[int, int], None] | None = None) -> ReplayResult:
    from kafka import KafkaProducer

    t = load_events(dataset, cfg.users, cfg.limit, cfg.since_ms)
    total = t.num_rows
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=256 * 1024,
                             client_id="cascade-replay")
    start = time.monotonic()
    sent = 0
    last_ts = 0
    try:
        for rb in t.to_batches(max_chunksize=cfg.chunk):
            for row in rb.to_pylist():
                e = Event.from_dict(row)
                if cfg.fresh_ts:
                    last_ts = max(last_ts, int(time.time() * 1000))
                    e = replace(e, ts_ms=last_ts)
                if cfg.id_prefix:
                    e = replace(e, event_id=cfg.id_prefix + e.event_id)
                producer.send(cfg.topic, key=event_key(e), value=encode_event(e))
                sent += 1
            if progress:
                progress(sent, total)
            if cfg.rate > 0:
                ahead = start + sent / cfg.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush()
    finally:
        producer.close(timeout=10)
    users = len(pc.unique(t.column("user_id"))) if total else 0
    return ReplayResult(sent=sent, users=users, seconds=time.monotonic() - start)
