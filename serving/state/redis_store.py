"""The Redis implementation of `OnlineStore` (redis-py + hiredis).

Key layout (prefix `RedisConfig.key_prefix`, default ``cascade:v1``; a new
layout gets a new prefix, so old and new servers can share a Redis)::

    {p}:u:{user_id}          one packed value per user (serving.state.codec): sequence, SDIM
                             signatures, counter log, attributes; PX user_ttl_s when set
    {p}:e:{event_id}         dedupe mark of an applied event; EX dedupe_ttl_s
    {p}:i:{item_id}          the item's counter log: 9-byte records appended with APPEND, old ones
                             folded into summary records (serving.state.codec)
    {p}:popularity           ZSET item -> behaviors (the cold-start and fallback ranking)
    {p}:meta                 HASH: what the state was bootstrapped from, its epoch's snapshot offsets
    {p}:epoch                the state epoch id (serving.rebuild): written by bootstrap, gone when
                             Redis came back empty; ingest with an epoch writes only while it matches
    {p}:rebuild_lock         held by the replica rebuilding the state
    {p}:positions            HASH "topic:partition" -> the epoch that partition's committed offset belongs to
    {p}:applied              HASH "topic:partition" -> offset committed after its events were written here

Request path: one GET for the user, one MGET for the candidates' counters.
Ingest: WATCH the batch's users, one MGET (users + marks), then MULTI, one
EVALSHA of `APPLY_LUA` doing every write (users, marks, item APPENDs,
popularity), EXEC. One command instead of one per write keeps the client's
cost per event low; the transaction makes it all-or-nothing, and a WatchError
means another consumer wrote one of those users meanwhile (a rebalance): the
batch is recomputed from fresh reads. Item keys are never read-modify-written
by ingest, so consumers of different partitions never conflict on them.

Note: the transaction spans many keys; on Redis Cluster it needs the keys of
one transaction in one slot (hash tags per user) and per-slot transactions.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import redis
from redis.exceptions import RedisError, WatchError

from serving.config import RedisConfig
from serving.errors import StateUnavailable
from serving.security import redis_connection_kwargs
from serving.state.base import EpochChanged, IngestFn, IngestResult, ItemStats, OnlineStore
from serving.state.codec import UserRecord, decode_item_logs, decode_user, encode_user, prune_item_log


# KEYS: users (nu) | marks (nm) | items (ni) | popularity (if np > 0)
# ARGV: nu nm ni np user_ttl_ms mark_ttl_s | user values (nu) | item records (ni) | (member, increment) x np
APPLY_LUA = """
local nu, nm, ni, np = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local uttl, mttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local a = 7
for i = 1, nu do
  if uttl > 0 then redis.call('SET', KEYS[i], ARGV[a], 'PX', uttl) else redis.call('SET', KEYS[i], ARGV[a]) end
  a = a + 1
end
for i = nu + 1, nu + nm do redis.call('SET', KEYS[i], '1', 'EX', mttl) end
local sizes = {}
for i = 1, ni do
  sizes[i] = redis.call('APPEND', KEYS[nu + nm + i], ARGV[a])
  a = a + 1
end
if np > 0 then
  local pk = KEYS[nu + nm + ni + 1]
  for i = 1, np do
    redis.call('ZINCRBY', pk, ARGV[a + 1], ARGV[a])
    a = a + 2
  end
end
return sizes
"""

# KEYS: dedupe marks to set; ARGV: their TTL in seconds
MARKS_LUA = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], '1', 'EX', ARGV[1]) end
return #KEYS
"""

# KEYS: the applied-offsets hash; ARGV: (field, expected ('' = absent), new) triplets.
# Sets each field that still holds what its writer last wrote; returns (field, current) of the others.
CAS_APPLIED_LUA = """
local out = {}
for i = 1, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if (cur == false and ARGV[i + 1] == '') or cur == ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  else
    out[#out + 1] = ARGV[i]
    out[#out + 1] = cur or ''
  end
end
return out
"""


class Keys:
    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def user(self, uid: int) -> str:
        return f"{self.p}:u:{uid}"

    def mark(self, event_id: str) -> str:
        return f"{self.p}:e:{event_id}"

    def item_log(self, iid: int) -> str:
        return f"{self.p}:i:{iid}"

    @property
    def popularity(self) -> str:
        return f"{self.p}:popularity"

    @property
    def meta(self) -> str:
        return f"{self.p}:meta"

    @property
    def epoch(self) -> str:
        return f"{self.p}:epoch"

    @property
    def rebuild_lock(self) -> str:
        return f"{self.p}:rebuild_lock"

    @property
    def positions(self) -> str:
        return f"{self.p}:positions"

    @property
    def applied(self) -> str:
        return f"{self.p}:applied"


class RedisOnlineStore(OnlineStore):
    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self.keys = Keys(cfg.key_prefix)
        common = dict(max_connections=cfg.max_connections, health_check_interval=0, **redis_connection_kwargs(cfg))
        # Request path: short timeouts (a slow Redis is a down Redis: degrade, don't queue).
        self._fast = redis.Redis.from_url(cfg.url, socket_timeout=cfg.socket_timeout_s,
                                          socket_connect_timeout=cfg.socket_timeout_s, **common)
        self._slow = redis.Redis.from_url(cfg.url, socket_timeout=cfg.ingest_socket_timeout_s,
                                          socket_connect_timeout=cfg.ingest_socket_timeout_s, **common)
        self._apply = self._slow.register_script(APPLY_LUA)

    # ------------------------------------------------------------------ request path
    def read_user(self, user_id: int) -> UserRecord | None:
        key = self.keys.user(user_id)
        try:
            blob = self._fast.get(key)
        except RedisError as e:
            raise StateUnavailable(f"redis GET {key}: {e}") from e
        return None if blob is None else decode_user(blob, where=key)

    def read_item_stats(self, item_ids: np.ndarray) -> ItemStats:
        p = self.keys.p
        keys = [f"{p}:i:{i}" for i in item_ids.tolist()]
        try:
            vals = self._fast.mget(keys) if keys else []
        except RedisError as e:
            raise StateUnavailable(f"redis MGET of {len(keys)} items' counters: {e}") from e
        return ItemStats(*decode_item_logs(vals, where=f"{p}:i:*"))

    def ping(self) -> bool:
        try:
            return bool(self._fast.ping())
        except RedisError:
            return False

    # ------------------------------------------------------------------ ingest
    def ingest(self, user_ids: Iterable[int], event_ids: Iterable[str], fn: IngestFn, max_retries: int = 10,
               epoch: str | None = None) -> IngestResult:
        uids = list(dict.fromkeys(user_ids))
        eids = list(dict.fromkeys(event_ids))
        ukeys = [self.keys.user(u) for u in uids]
        mkeys = [self.keys.mark(e) for e in eids]
        fence = [self.keys.epoch] if epoch is not None else []  # watched: a flush/rebuild aborts the EXEC
        conflicts = 0
        ttl_ms = self.cfg.user_ttl_s * 1000
        with self._slow.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*ukeys, *fence)
                    vals = pipe.mget(ukeys + mkeys + fence)  # immediate mode after WATCH
                    if fence and (vals[-1] or b"").decode() != epoch:
                        raise EpochChanged(f"redis holds state epoch {vals[-1]!r}, not {epoch!r}: "
                                           "not writing until the state is rebuilt")
                    states = {u: (None if v is None else decode_user(v, where=k, decode_attrs=False))
                              for u, k, v in zip(uids, ukeys, vals[:len(uids)])}
                    seen = {e for e, v in zip(eids, vals[len(uids):]) if v is not None}
                    write = fn(states, seen)
                    log_items = list(write.item_logs)
                    pop = list(write.popularity.items())
                    keys = ([self.keys.user(u) for u in write.users] + [self.keys.mark(e) for e in write.marks]
                            + [self.keys.item_log(i) for i in log_items] + ([self.keys.popularity] if pop else []))
                    args = [len(write.users), len(write.marks), len(log_items), len(pop), ttl_ms,
                            self.cfg.dedupe_ttl_s, *(encode_user(r) for r in write.users.values()),
                            *(write.item_logs[i] for i in log_items), *(x for i, c in pop for x in (str(i), c))]
                    pipe.multi()
                    self._apply(keys=keys, args=args, client=pipe)
                    res = pipe.execute()
                    break
                except WatchError:
                    conflicts += 1
                    if conflicts > max_retries:
                        raise StateUnavailable(
                            f"ingest: {conflicts} conflicting transactions in a row on {len(uids)} users; "
                            "is another consumer writing the same users (partition assigned twice)?"
                        ) from None
                    pipe.reset()
                except RedisError as e:
                    raise StateUnavailable(f"redis ingest transaction ({len(uids)} users, {len(eids)} events): {e}") from e
        sizes = {i: int(n) for i, n in zip(log_items, res[-1])}
        return IngestResult(write=write, conflicts=conflicts, item_log_bytes=sizes)

    def prune_item_logs(self, item_ids: Iterable[int], cutoff_ms: int) -> int:
        dropped = 0
        for i in item_ids:
            key = self.keys.item_log(i)
            with self._slow.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    blob = pipe.get(key)
                    if not blob:
                        continue
                    pruned = prune_item_log(blob, cutoff_ms)
                    if pruned is None:
                        continue
                    pipe.multi()
                    pipe.set(key, pruned[0])
                    pipe.execute()
                    dropped += pruned[1]
                except WatchError:
                    continue  # appended meanwhile: prune next time
                except RedisError as e:
                    raise StateUnavailable(f"redis prune of {key}: {e}") from e
        return dropped

    # ------------------------------------------------------------------ bootstrap
    def put_users(self, records: Mapping[int, UserRecord], chunk: int = 500) -> None:
        ttl_ms = self.cfg.user_ttl_s * 1000
        items = list(records.items())
        try:
            for s in range(0, len(items), chunk):
                pipe = self._slow.pipeline(transaction=False)
                for u, rec in items[s:s + chunk]:
                    pipe.set(self.keys.user(u), encode_user(rec), px=ttl_ms or None)
                pipe.execute()
        except RedisError as e:
            raise StateUnavailable(f"redis bulk load of {len(items)} users: {e}") from e

    def put_item_logs(self, logs: Mapping[int, bytes], chunk: int = 1000) -> None:
        ids = list(logs)
        try:
            for s in range(0, len(ids), chunk):
                pipe = self._slow.pipeline(transaction=False)
                for i in ids[s:s + chunk]:
                    pipe.set(self.keys.item_log(i), logs[i])
                pipe.execute()
        except RedisError as e:
            raise StateUnavailable(f"redis bulk load of {len(ids)} items' counters: {e}") from e

    def add_popularity(self, counts: Mapping[int, float], chunk: int = 5000) -> None:
        items = [(str(i), float(c)) for i, c in counts.items() if c]
        try:
            for s in range(0, len(items), chunk):
                pipe = self._slow.pipeline(transaction=False)
                for i, c in items[s:s + chunk]:
                    pipe.zincrby(self.keys.popularity, c, i)
                pipe.execute()
        except RedisError as e:
            raise StateUnavailable(f"redis popularity load: {e}") from e

    def top_items(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            rows = self._slow.zrevrange(self.keys.popularity, 0, n - 1, withscores=True)
        except RedisError as e:
            raise StateUnavailable(f"redis ZREVRANGE {self.keys.popularity}: {e}") from e
        ids = np.fromiter((int(m) for m, _ in rows), np.int64, len(rows))
        scores = np.fromiter((s for _, s in rows), np.float64, len(rows))
        return ids, scores

    def set_meta(self, meta: Mapping[str, str]) -> None:
        try:
            self._slow.hset(self.keys.meta, mapping=dict(meta))
        except RedisError as e:
            raise StateUnavailable(f"redis HSET {self.keys.meta}: {e}") from e

    def get_meta(self) -> dict[str, str]:
        try:
            return {k.decode(): v.decode() for k, v in self._slow.hgetall(self.keys.meta).items()}
        except RedisError as e:
            raise StateUnavailable(f"redis HGETALL {self.keys.meta}: {e}") from e

    def flush_prefix(self, keep: Iterable[str] = ()) -> int:
        """Deletes every key under the prefix but `keep` (key names after the prefix, e.g. "rebuild_lock")
        (tests, `--bootstrap --fresh`, rebuilds). Returns the number deleted."""
        n = 0
        kept = {f"{self.keys.p}:{k}".encode() for k in keep}
        try:
            for batch in _chunks(self._slow.scan_iter(match=f"{self.keys.p}:*", count=1000), 1000):
                batch = [k for k in batch if k not in kept]
                n += self._slow.delete(*batch) if batch else 0
        except RedisError as e:
            raise StateUnavailable(f"redis delete of {self.keys.p}:*: {e}") from e
        return n

    # ------------------------------------------------------------------ state epoch (serving.rebuild)
    def get_epoch(self) -> str | None:
        try:
            v = self._slow.get(self.keys.epoch)
        except RedisError as e:
            raise StateUnavailable(f"redis GET {self.keys.epoch}: {e}") from e
        return None if v is None else v.decode()

    def create_epoch(self, epoch_id: str, info: Mapping[str, str], replace: bool) -> bool:
        with self._slow.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(self.keys.epoch)
                if not replace and pipe.exists(self.keys.epoch):
                    return False
                pipe.multi()
                if info:
                    pipe.hset(self.keys.meta, mapping=dict(info))
                pipe.set(self.keys.epoch, epoch_id)
                pipe.execute()
                return True
            except WatchError:
                return False  # another writer set one meanwhile
            except RedisError as e:
                raise StateUnavailable(f"redis epoch write {self.keys.epoch}: {e}") from e

    def acquire_rebuild_lock(self, token: str, ttl_s: float) -> bool:
        try:
            return bool(self._slow.set(self.keys.rebuild_lock, token, nx=True, px=int(ttl_s * 1000)))
        except RedisError as e:
            raise StateUnavailable(f"redis SET {self.keys.rebuild_lock} NX: {e}") from e

    def release_rebuild_lock(self, token: str) -> None:
        try:  # only our own lock (it may have expired and been taken over)
            self._slow.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                            "return 0", 1, self.keys.rebuild_lock, token)
        except RedisError as e:
            raise StateUnavailable(f"redis release of {self.keys.rebuild_lock}: {e}") from e

    def put_marks(self, event_ids: Iterable[str], chunk: int = 5000) -> int:
        n = 0
        mark = self._slow.register_script(MARKS_LUA)  # one command per chunk: the client's cost per key is the floor
        try:
            for batch in _chunks(event_ids, chunk):
                mark(keys=[self.keys.mark(e) for e in batch], args=[self.cfg.dedupe_ttl_s])
                n += len(batch)
        except RedisError as e:
            raise StateUnavailable(f"redis bulk load of dedupe marks ({n} written): {e}") from e
        return n

    def partition_epochs(self, partitions: list[str]) -> dict[str, str]:
        if not partitions:
            return {}
        try:
            vals = self._slow.hmget(self.keys.positions, partitions)
        except RedisError as e:
            raise StateUnavailable(f"redis HMGET {self.keys.positions}: {e}") from e
        return {p: v.decode() for p, v in zip(partitions, vals) if v is not None}

    def set_partition_epochs(self, epochs: Mapping[str, str]) -> None:
        if not epochs:
            return
        try:
            self._slow.hset(self.keys.positions, mapping=dict(epochs))
        except RedisError as e:
            raise StateUnavailable(f"redis HSET {self.keys.positions}: {e}") from e

    def applied_offsets(self, partitions: list[str]) -> dict[str, int]:
        if not partitions:
            return {}
        try:
            vals = self._slow.hmget(self.keys.applied, partitions)
        except RedisError as e:
            raise StateUnavailable(f"redis HMGET {self.keys.applied}: {e}") from e
        return {p: int(v) for p, v in zip(partitions, vals) if v is not None}

    def set_applied_offsets(self, offsets: Mapping[str, tuple[int | None, int]]) -> dict[str, int | None]:
        if not offsets:
            return {}
        args = [x for k, (old, new) in offsets.items() for x in (k, "" if old is None else str(old), str(new))]
        try:
            res = self._slow.eval(CAS_APPLIED_LUA, 1, self.keys.applied, *args)
        except RedisError as e:
            raise StateUnavailable(f"redis compare-and-set of {self.keys.applied}: {e}") from e
        return {res[i].decode(): (int(res[i + 1]) if res[i + 1] else None) for i in range(0, len(res), 2)}

    def instance_id(self) -> str:
        try:
            return str(self._slow.info("server")["run_id"])
        except (RedisError, KeyError) as e:
            raise StateUnavailable(f"redis INFO server: {e}") from e

    def close(self) -> None:
        self._fast.close()
        self._slow.close()


def _chunks(it: Iterable, n: int):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
