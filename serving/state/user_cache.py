"""The consumer's cache of the user records it wrote, each under the generation it was written with.

A Redis ingest reads every user of a poll batch, decodes it, folds the events in and writes it back. The
read and the decode are most of what a user costs (a 1,000-behavior user with SDIM sums is ~40 KB on the
wire), and they are wasted on a user this process wrote itself a moment ago: its record is still here.

So `RedisOnlineStore.ingest` keeps, per user it wrote, the record and the 8-byte generation of the value it
wrote (`codec.encode_user` draws a random one per encoding). A user found here is not read: its events are
folded into the cached record and the write's compare-and-set is made against the cached generation. If
anything else wrote the user since (another consumer after a rebalance, a bulk load, a rebuild, the user's
TTL expired, the state was flushed), Redis no longer holds that generation, the write is refused as a
conflict, the entry is dropped and the user is read and recomputed like any other. A stale entry can
therefore cost one more round trip, never a wrong state. The encoding is lossless (decode(encode(r)) holds
r's values), so a fold from the cache equals a fold from the stored value.

Records are never mutated after they are made (the fold builds new arrays), so an entry can be handed to
the fold as it is. Bounded by an estimate of the records' bytes, least recently used first out.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Iterable

import numpy as np

from serving.state.codec import UserRecord

ENTRY_OVERHEAD = 2048  # bytes per entry beyond its arrays: ~10 array headers, the record's dataclasses, the LRU node


def _owned(a: np.ndarray | None) -> np.ndarray | None:
    """`a`, copied when it is a small view into a much larger array (e.g. one user's rows of a whole batch's
    stacked SDIM sums), so that a cached record does not keep the batch's arrays alive."""
    if a is None:
        return None
    base = a.base
    if isinstance(base, np.ndarray) and base.nbytes > 2 * a.nbytes + 4096:
        return a.copy()
    return a


def own_arrays(rec: UserRecord) -> UserRecord:
    """`rec` holding only arrays of its own size (the signatures and the SDIM sums may be batch-wide views)."""
    sigs = _owned(rec.sigs)
    sdim = rec.sdim
    if sdim is not None:
        sums, counts = _owned(sdim.sums), _owned(sdim.counts)
        if sums is not sdim.sums or counts is not sdim.counts:
            sdim = dataclasses.replace(sdim, sums=sums, counts=counts)
    if sigs is rec.sigs and sdim is rec.sdim:
        return rec
    return dataclasses.replace(rec, sigs=sigs, sdim=sdim)


class UserCache:
    """user id -> (generation, record) of the users this process wrote last; LRU, at most `max_bytes`
    (estimated from each written value's size). Thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"UserCache needs max_bytes > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, tuple[bytes, UserRecord, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, user_ids: Iterable[int]) -> dict[int, tuple[bytes, UserRecord]]:
        """The cached (generation, record) of those of `user_ids` that are here (each now most recently used)."""
        out: dict[int, tuple[bytes, UserRecord]] = {}
        entries = self._entries
        with self._lock:
            for u in user_ids:
                e = entries.get(u)
                if e is not None:
                    entries.move_to_end(u)
                    out[u] = (e[0], e[1])
        return out

    def put(self, written: Iterable[tuple[int, bytes, UserRecord, int]]) -> None:
        """Records just written: (user, the value's generation, the record, the value's size in bytes)."""
        entries = self._entries
        with self._lock:
            for u, gen, rec, size in written:
                old = entries.pop(u, None)
                if old is not None:
                    self.bytes -= old[2]
                # in memory the actions are int64 (1 byte each in the value)
                n = size + 7 * len(rec.seq) + ENTRY_OVERHEAD
                if n > self.max_bytes:
                    continue
                entries[u] = (gen, own_arrays(rec), n)
                self.bytes += n
            while self.bytes > self.max_bytes:
                self.bytes -= entries.popitem(last=False)[1][2]

    def drop(self, user_ids: Iterable[int]) -> int:
        """Forgets these users (their stored value changed behind this process); returns how many were here."""
        n = 0
        with self._lock:
            for u in user_ids:
                old = self._entries.pop(u, None)
                if old is not None:
                    self.bytes -= old[2]
                    n += 1
        return n

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
