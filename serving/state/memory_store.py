"""An in-process `OnlineStore`: the state in Python dicts, behind one lock.

For unit tests of what runs over a store (runtime, consumers, rebuild) and for
embedding the serving library in one process. It keeps the state as long as
the object lives and is not shared between processes: a deployed server runs
`RedisOnlineStore`. tests/serving/test_store_contract.py runs one suite against
both, so whatever a test learns here holds on Redis.

Same semantics as `RedisOnlineStore` on one Redis:

* values are stored encoded (`serving.state.codec`), so a reader gets its own
  copy and what `encode_user` drops is dropped here too;
* `ingest` reads under the lock, calls `fn` without it, then writes under it
  with compare-and-set (a user is written only if its value is still the one
  read; else nothing of the batch is written, the batch is read again and
  recomputed, at most `max_retries` times): a concurrent writer of the same
  user, even one that `fn` itself calls, is a conflict, never overwritten;
* the whole batch (users, their dedupe marks, item logs, popularity) lands at
  once, so no item-side marks are kept;
* TTLs like the Redis keys': users `user_ttl_s` after their last write (0:
  never), dedupe marks `dedupe_ttl_s`, the rebuild lock its `ttl_s`;
* ties in `top_items` in ZREVRANGE's order (member as a string, descending).

A dedupe mark is kept per (user, event id) (Redis: per user group and event id,
the same for event ids that are unique).
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from serving.errors import StateUnavailable
from serving.state.base import EpochChanged, IngestFn, IngestResult, IngestWrite, ItemStats, OnlineStore, UserEvents
from serving.state.codec import UserRecord, decode_item_logs, decode_user, encode_user, prune_item_log

# the state-wide values `flush_prefix(keep=...)` names (RedisOnlineStore: `Keys.named`)
NAMED = ("meta", "epoch", "rebuild_lock", "positions", "applied")


class InMemoryOnlineStore(OnlineStore):
    """`OnlineStore` in this process's memory (module docstring).

    Args:
        user_ttl_s: a user's state expires this long after its last write; 0: never (RedisConfig.user_ttl_s).
        dedupe_ttl_s: dedupe marks live this long (RedisConfig.dedupe_ttl_s).
        clock: monotonic seconds (tests of the TTLs pass their own).

    Example::

        store = InMemoryOnlineStore()
        EventApplier(cfg.state, store, catalog, models, metrics, None).apply(messages)
        store.read_user(7)
    """

    def __init__(self, user_ttl_s: float = 0, dedupe_ttl_s: float = 14 * 86_400,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if user_ttl_s < 0 or dedupe_ttl_s <= 0:
            raise ValueError(f"user_ttl_s must be >= 0 and dedupe_ttl_s > 0, got {user_ttl_s} and {dedupe_ttl_s}")
        self.user_ttl_s = user_ttl_s
        self.dedupe_ttl_s = dedupe_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._instance = uuid.uuid4().hex  # this object is the "server": it never restarts
        self._users: dict[int, tuple[bytes, float | None]] = {}  # user -> (encoded record, expiry or None)
        self._marks: dict[tuple[int, str], float] = {}  # (user, event id) -> expiry
        self._item_logs: dict[int, bytearray] = {}
        self._popularity: dict[int, float] = {}
        self._meta: dict[str, str] = {}
        self._epoch: str | None = None
        self._rebuild_lock: tuple[str, float] | None = None  # (token, expiry)
        self._positions: dict[str, str] = {}
        self._applied: dict[str, int] = {}

    # ------------------------------------------------------------------ under the lock
    def _user(self, uid: int, now: float) -> bytes | None:
        v = self._users.get(uid)
        if v is None:
            return None
        if v[1] is not None and v[1] <= now:
            del self._users[uid]
            return None
        return v[0]

    def _marked(self, key: tuple[int, str], now: float) -> bool:
        exp = self._marks.get(key)
        if exp is None:
            return False
        if exp <= now:
            del self._marks[key]
            return False
        return True

    def _set_user(self, uid: int, blob: bytes, now: float) -> None:
        self._users[uid] = (blob, now + self.user_ttl_s if self.user_ttl_s else None)

    def _check_epoch(self, epoch: str) -> None:
        if (self._epoch or "") != epoch:
            raise EpochChanged(f"the in-memory store holds state epoch {self._epoch!r}, not {epoch!r}: "
                               "not writing until the state is rebuilt")

    def _lock_holder(self, now: float) -> str | None:
        if self._rebuild_lock is not None and self._rebuild_lock[1] <= now:
            self._rebuild_lock = None
        return None if self._rebuild_lock is None else self._rebuild_lock[0]

    # ------------------------------------------------------------------ request path
    def read_user(self, user_id: int) -> UserRecord | None:
        with self._lock:
            blob = self._user(user_id, self._clock())
        return None if blob is None else decode_user(blob, where=f"in-memory user {user_id}")

    def read_item_stats(self, item_ids: np.ndarray) -> ItemStats:
        with self._lock:
            blobs = [None if (b := self._item_logs.get(i)) is None else bytes(b) for i in item_ids.tolist()]
        return ItemStats(*decode_item_logs(blobs, where="in-memory item stats"))

    def ping(self) -> bool:
        return True

    # ------------------------------------------------------------------ ingest
    def ingest(self, events: UserEvents, fn: IngestFn, max_retries: int = 10,
               epoch: str | None = None) -> IngestResult:
        uids = list(events)
        eids = {u: list(dict.fromkeys(events[u])) for u in uids}
        done = IngestWrite()
        sizes: dict[int, int] = {}
        conflicts = 0
        while True:
            with self._lock:
                now = self._clock()
                if epoch is not None:
                    self._check_epoch(epoch)
                blobs = {u: self._user(u, now) for u in uids}
                seen = {e for u in uids for e in eids[u] if self._marked((u, e), now)}
            states = {u: (None if v is None else decode_user(v, where=f"in-memory user {u}", decode_attrs=False))
                      for u, v in blobs.items()}
            write = fn(states, seen)
            encoded = {u: encode_user(rec) for u, rec in write.users.items()}  # outside the lock
            with self._lock:
                changed = self._apply(write, encoded, blobs, epoch, sizes)
            if not changed:
                done.users.update(write.users)
                done.marks.update((u, write.marks[u]) for u in write.users if u in write.marks)
                done.items.update(write.items)
                break
            conflicts += 1  # read again: the changed users are recomputed
            if conflicts > max_retries:
                raise StateUnavailable(
                    f"ingest: {conflicts} conflicting writes in a row on {len(changed)} of {len(uids)} users; "
                    "is another consumer writing the same users (partition assigned twice)?")
        return IngestResult(write=done, conflicts=conflicts, item_log_bytes=sizes)

    def _apply(self, write: IngestWrite, encoded: Mapping[int, bytes], blobs: Mapping[int, bytes | None],
               epoch: str | None, sizes: dict[int, int]) -> list[int]:
        """Under the lock: writes everything, or nothing and returns the users changed since they were read."""
        now = self._clock()
        if epoch is not None:
            self._check_epoch(epoch)
        changed = [u for u in write.users if self._user(u, now) != blobs.get(u)]
        if changed:
            return changed
        mark_until = now + self.dedupe_ttl_s
        for u, blob in encoded.items():
            self._set_user(u, blob, now)
            for e in write.marks.get(u, ()):
                self._marks[(u, e)] = mark_until
        for i, w in write.items.items():
            if w.log:
                log = self._item_logs.setdefault(i, bytearray())
                log += w.log
                sizes[i] = len(log)
            if w.behaviors:
                self._popularity[i] = self._popularity.get(i, 0.0) + w.behaviors
        return []

    def prune_item_logs(self, item_ids: Iterable[int], cutoff_ms: int) -> int:
        folded = 0
        with self._lock:  # atomic: no append can land between the read and the write
            for i in dict.fromkeys(item_ids):
                log = self._item_logs.get(i)
                if log and (p := prune_item_log(bytes(log), cutoff_ms)) is not None:
                    self._item_logs[i] = bytearray(p[0])
                    folded += p[1]
        return folded

    # ------------------------------------------------------------------ bootstrap
    def put_users(self, records: Mapping[int, UserRecord]) -> None:
        encoded = {u: encode_user(rec) for u, rec in records.items()}
        with self._lock:
            now = self._clock()
            for u, blob in encoded.items():
                self._set_user(u, blob, now)

    def put_item_logs(self, logs: Mapping[int, bytes]) -> None:
        with self._lock:
            self._item_logs.update((i, bytearray(b)) for i, b in logs.items())

    def add_popularity(self, counts: Mapping[int, float]) -> None:
        with self._lock:
            for i, c in counts.items():
                if c:
                    self._popularity[i] = self._popularity.get(i, 0.0) + float(c)

    def top_items(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n most popular items; ties in ZREVRANGE's order (member, as a string, descending)."""
        with self._lock:
            rows = sorted(self._popularity.items(), key=lambda r: (r[1], str(r[0])), reverse=True)[:max(n, 0)]
        return np.array([i for i, _ in rows], np.int64), np.array([s for _, s in rows], np.float64)

    def set_meta(self, meta: Mapping[str, str]) -> None:
        with self._lock:
            self._meta.update((str(k), str(v)) for k, v in meta.items())

    def get_meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._meta)

    def flush_prefix(self, keep: Iterable[str] = ()) -> int:
        """Deletes the whole state but the state-wide values named in `keep` (`NAMED`). Returns how many
        entries, counted like Redis keys: each user, mark and item log, the popularity ranking, each named value."""
        keep = set(keep)
        if keep - set(NAMED):
            raise ValueError(f"flush_prefix keeps only {NAMED}, got {sorted(keep - set(NAMED))}")
        with self._lock:
            now = self._clock()
            n = sum(self._user(u, now) is not None for u in list(self._users))
            n += sum(self._marked(k, now) for k in list(self._marks)) + len(self._item_logs) + bool(self._popularity)
            self._users, self._marks, self._item_logs, self._popularity = {}, {}, {}, {}
            named = {"meta": bool(self._meta), "epoch": self._epoch is not None,
                     "rebuild_lock": self._lock_holder(now) is not None, "positions": bool(self._positions),
                     "applied": bool(self._applied)}
            for name, held in named.items():
                if name not in keep:
                    n += held
                    self._clear(name)
        return n

    def _clear(self, name: str) -> None:
        if name == "meta":
            self._meta = {}
        elif name == "epoch":
            self._epoch = None
        elif name == "rebuild_lock":
            self._rebuild_lock = None
        elif name == "positions":
            self._positions = {}
        else:
            self._applied = {}

    # ------------------------------------------------------------------ state epoch (serving.rebuild)
    def get_epoch(self) -> str | None:
        with self._lock:
            return self._epoch

    def create_epoch(self, epoch_id: str, info: Mapping[str, str], replace: bool) -> bool:
        with self._lock:
            if not replace and self._epoch is not None:
                return False
            self._meta.update((str(k), str(v)) for k, v in info.items())
            self._epoch = epoch_id
            return True

    def acquire_rebuild_lock(self, token: str, ttl_s: float) -> bool:
        if ttl_s <= 0:
            raise ValueError(f"rebuild lock ttl must be positive, got {ttl_s}")
        with self._lock:
            now = self._clock()
            if self._lock_holder(now) is not None:
                return False
            self._rebuild_lock = (token, now + ttl_s)
            return True

    def release_rebuild_lock(self, token: str) -> None:
        with self._lock:  # only our own lock (it may have expired and been taken over)
            if self._lock_holder(self._clock()) == token:
                self._rebuild_lock = None

    def put_marks(self, user_ids: Sequence[int], event_ids: Sequence[str]) -> int:
        if len(user_ids) != len(event_ids):
            raise ValueError(f"put_marks: {len(user_ids)} user ids for {len(event_ids)} event ids (must be parallel)")
        with self._lock:
            until = self._clock() + self.dedupe_ttl_s
            self._marks.update(((int(u), e), until) for u, e in zip(user_ids, event_ids))
        return len(event_ids)

    def partition_epochs(self, partitions: list[str]) -> dict[str, str]:
        with self._lock:
            return {p: self._positions[p] for p in partitions if p in self._positions}

    def set_partition_epochs(self, epochs: Mapping[str, str]) -> None:
        with self._lock:
            self._positions.update(epochs)

    def applied_offsets(self, partitions: list[str]) -> dict[str, int]:
        with self._lock:
            return {p: self._applied[p] for p in partitions if p in self._applied}

    def set_applied_offsets(self, offsets: Mapping[str, tuple[int | None, int]]) -> dict[str, int | None]:
        lost: dict[str, int | None] = {}
        with self._lock:
            for p, (old, new) in offsets.items():
                cur = self._applied.get(p)
                if cur == old:
                    self._applied[p] = int(new)
                else:
                    lost[p] = cur
        return lost

    def instance_id(self) -> str:
        """Fixed for the life of this object (the state lives and dies with it)."""
        return self._instance

    def close(self) -> None:
        """Nothing to release; the state stays readable until the object is dropped."""
