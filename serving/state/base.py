"""The online-store interface: what the request path and the consumers need from it.

The request path reads one user (one round trip) and the counters of the
ranked candidates (one more); the events consumer runs `ingest`: read the
users of a batch and the batch's already-applied event ids, compute the new
states in Python, write each with its dedupe marks atomically (a write that fails
and is retried if the user changed meanwhile), every event's item effect once.
`RedisOnlineStore` (serving/state/redis_store.py) is the deployed implementation, `InMemoryOnlineStore`
(serving/state/memory_store.py) the in-process one for unit tests and embedding; another backend implements
this and passes tests/serving/test_store_contract.py, the suite both pass.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from serving.errors import StateUnavailable
from serving.state.codec import UserRecord


class EpochChanged(StateUnavailable):
    """The store no longer holds the state epoch a writer was positioned for (it came back empty, or was
    rebuilt): nothing was written; the writer waits for the rebuild and re-positions (serving.rebuild)."""


@dataclass(frozen=True)
class ItemStats:
    """Counter logs of n items, flattened: entry j belongs to item ``owner[j]``."""

    ts_ms: np.ndarray  # (M,) int64
    pos: np.ndarray  # (M,) uint8
    owner: np.ndarray  # (M,) int64 in [0, n)
    total_cnt: np.ndarray  # (n,) int64
    total_pos: np.ndarray  # (n,) int64


COUNTED, BEHAVIOR = 1, 2  # ItemWrite.flags bits


@dataclass(frozen=True)
class ItemWrite:
    """What one ingest adds to one item: per event (arrival order) whether it is counted (it has the next
    9-byte record of `log`) and whether it is a behavior (+1 popularity). The event ids let a store whose
    item writes are not atomic with the user's apply each event to the item once (RedisOnlineStore, cluster)."""

    event_ids: list[str]
    flags: bytes  # (E,) COUNTED | BEHAVIOR per event
    log: bytes  # counter-log records of the counted events, in order (serving.state.codec.encode_item_log)

    @property
    def behaviors(self) -> int:
        return self.flags.count(BEHAVIOR) + self.flags.count(COUNTED | BEHAVIOR)


@dataclass
class IngestWrite:
    """Everything one ingest writes."""

    users: dict[int, UserRecord] = field(default_factory=dict)
    marks: dict[int, list[str]] = field(default_factory=dict)  # user -> the event ids of theirs now applied
    items: dict[int, ItemWrite] = field(default_factory=dict)  # item -> its counter records and popularity

    @property
    def applied(self) -> int:
        return sum(len(v) for v in self.marks.values())


@dataclass(frozen=True)
class IngestResult:
    write: IngestWrite
    conflicts: int  # transactions retried because a user changed between read and write
    item_log_bytes: dict[int, int]  # item -> its log size after the append (to schedule pruning)
    cached_users: int = 0  # users not read: their record was in the writer's cache (RedisOnlineStore)
    stale_cached_users: int = 0  # of those, written by someone else meanwhile: read again (counted in conflicts)


# (current records of the batch's users (None: unknown), event ids already applied) -> the writes
IngestFn = Callable[[Mapping[int, UserRecord | None], set[str]], IngestWrite]
# user -> the ids of that user's events in the batch (a dedupe mark lives with its event's user)
UserEvents = Mapping[int, Sequence[str]]


class OnlineStore(abc.ABC):
    @abc.abstractmethod
    def read_user(self, user_id: int) -> UserRecord | None:
        """The user's record, or None for a user with no state (cold start). Raises StateUnavailable."""

    @abc.abstractmethod
    def read_item_stats(self, item_ids: np.ndarray) -> ItemStats:
        """Counter logs of the given items (unknown items: empty). Raises StateUnavailable."""

    @abc.abstractmethod
    def ingest(self, events: UserEvents, fn: IngestFn, max_retries: int = 10,
               epoch: str | None = None) -> IngestResult:
        """Read the users + which of their events are applied, call `fn`, write its result; each user's
        record with its marks atomically, every event's effect exactly once (retried on conflict).

        With `epoch`, the write happens only while the store's epoch is that one (else EpochChanged)."""

    @abc.abstractmethod
    def prune_item_logs(self, item_ids: Iterable[int], cutoff_ms: int) -> int:
        """Folds item log entries older than `cutoff_ms` into summary records; returns how many were folded."""

    @abc.abstractmethod
    def put_users(self, records: Mapping[int, UserRecord]) -> None:
        """Bulk load (bootstrap): overwrites the users' records."""

    @abc.abstractmethod
    def put_item_logs(self, logs: Mapping[int, bytes]) -> None:
        """Bulk load (bootstrap): overwrites the items' counter logs (summary records included)."""

    @abc.abstractmethod
    def add_popularity(self, counts: Mapping[int, float]) -> None:
        """Bulk load (bootstrap): adds behavior counts to the popularity ranking."""

    @abc.abstractmethod
    def top_items(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n most popular items (ids, counts), best first."""

    @abc.abstractmethod
    def set_meta(self, meta: Mapping[str, str]) -> None:
        """Records what the state was bootstrapped from (source, as-of time, counts)."""

    @abc.abstractmethod
    def get_meta(self) -> dict[str, str]: ...

    # ------------------------------------------------------------------ state epoch (serving.rebuild)
    # Optional: a store without them runs with `rebuild.enabled=false`.
    def get_epoch(self) -> str | None:
        """The id of the state's epoch; None when the store holds no epoch (empty). Raises StateUnavailable."""
        raise NotImplementedError

    def create_epoch(self, epoch_id: str, info: Mapping[str, str], replace: bool) -> bool:
        """Sets the epoch (with `info` into the meta) atomically; replace=False: only if none is set."""
        raise NotImplementedError

    def acquire_rebuild_lock(self, token: str, ttl_s: float) -> bool:
        raise NotImplementedError

    def release_rebuild_lock(self, token: str) -> None:
        raise NotImplementedError

    def put_marks(self, user_ids: Sequence[int], event_ids: Sequence[str]) -> int:
        """Bulk load (rebuild): marks these events (of these users, parallel) applied. Returns how many."""
        raise NotImplementedError

    def partition_epochs(self, partitions: list[str]) -> dict[str, str]:
        """partition ("topic:n") -> the epoch its committed Kafka offset belongs to (absent: unknown)."""
        raise NotImplementedError

    def set_partition_epochs(self, epochs: Mapping[str, str]) -> None:
        raise NotImplementedError

    def applied_offsets(self, partitions: list[str]) -> dict[str, int]:
        """partition ("topic:n") -> the offset committed after its events were written to this store."""
        raise NotImplementedError

    def set_applied_offsets(self, offsets: Mapping[str, tuple[int | None, int]]) -> dict[str, int | None]:
        """partition -> (the offset its writer last recorded (None: none), the new one): sets those still
        holding the old one; returns partition -> what the others hold (the store lost writes)."""
        raise NotImplementedError

    def instance_id(self) -> str:
        """Changes when the store restarts or fails over (Redis: the run_id). Raises StateUnavailable."""
        raise NotImplementedError

    def flush_prefix(self, keep: Iterable[str] = ()) -> int:
        """Deletes the whole state but the keys named in `keep` (e.g. "rebuild_lock"). Returns how many keys."""
        raise NotImplementedError

    @abc.abstractmethod
    def ping(self) -> bool:
        """True when the store answers now (health)."""

    @abc.abstractmethod
    def close(self) -> None: ...
