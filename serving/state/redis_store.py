"""The Redis implementation of `OnlineStore` (redis-py + hiredis), on one Redis or on a Redis Cluster.

Key layout (prefix `RedisConfig.key_prefix`, default ``cascade:v2``; a new
layout gets a new prefix, so old and new servers can share a Redis). Every key
carries a hash tag (``{...}``) so that what one transaction writes is in one
cluster slot; `Keys` is the one place that builds key names::

    {p}:{u:<g>}:<user>            one packed value per user (g = user mod user_groups) (serving.state.codec):
                                  sequence, SDIM signatures, counter log, attributes; PX user_ttl_s when set
    {p}:{u:<g>}:n:<user>:<gen>    an ingest's new value for the user, staged until APPLY_LUA renames it over
                                  the user's key (gen: the value's generation); PX 60 s
    {p}:{u:<g>}:e:<event>         dedupe mark of an applied event, in its user's slot; EX dedupe_ttl_s
    {p}:{i:<g>}:i:<item>          the item's counter log (g = item mod item_groups): 9-byte records
                                  appended with APPEND, old ones folded into summary records (codec)
    {p}:{i:<g>}:e:<event>         cluster only: the event's effect on its item is applied; EX dedupe_ttl_s
    {p}:{i:<g>}:popularity        ZSET item -> behaviors, for the items of group g (top_items merges groups)
    {p}:{global}:meta             HASH: what the state was bootstrapped from, its epoch's snapshot offsets
    {p}:{global}:epoch            the state epoch id (serving.rebuild): written by bootstrap, gone when
                                  Redis came back empty; ingest with an epoch writes only while it matches
    {p}:{global}:rebuild_lock     held by the replica rebuilding the state
    {p}:{global}:positions        HASH "topic:partition" -> the epoch that partition's committed offset belongs to
    {p}:{global}:applied          HASH "topic:partition" -> offset committed after its events were written here

Request path: one GET for the user, one MGET for the candidates' counters (on
a cluster, one MGET per slot, pipelined per node by redis-py).

Ingest: one read (MGET of the batch's users, their events' marks and the
epoch), `fn` computes the writes in Python, then one pipeline stages the users'
new values with plain SETs and `APPLY_LUA` installs them (RENAME) with
compare-and-set: a user is written only if its value is still the one read
(its 8-byte generation, `codec.cas_token`: one GETRANGE inside the script, not
a hash of the whole value; a format-1 value: its SHA-1), together with its marks. A
user that changed meanwhile (another consumer wrote it: a rebalance) is a
conflict: the batch is read again and recomputed; its already-applied events
are then marked and skipped. Item keys are never read-modify-written, so
consumers of different partitions never conflict on them.

* One Redis (``redis.cluster=false``): one EVALSHA writes everything (users,
  marks, item APPENDs, popularity) and checks the epoch first: the batch is
  all-or-nothing, exactly as before the cluster layout.
* Redis Cluster: a script may only touch one slot, so the batch is written in
  two pipelined phases of per-slot calls: (1) the items, each event's item
  effect guarded by an item-side mark ``{i:<g>}:e:<event>`` set in the same
  script (SET NX: an event reaches its item's log and popularity at most once,
  whatever is replayed), (2) the users with their marks, compare-and-set per
  slot. What is no longer atomic: writes of different users, and an event's
  item effect versus its user's. Why that is safe: an event's user mark is
  written only after its item effect landed (phase 2 runs after phase 1
  answered), so a crash or error between the phases leaves the event unmarked
  at its user, the batch is redelivered, and the replay re-sends the item
  writes (no-ops: already marked) and applies the user part: nothing lost,
  nothing counted twice. A crash between users leaves some users applied and
  marked, the rest not; the replay applies only the rest. Readers may see an
  event in an item's counters before it is in its user's sequence. The epoch
  fence is checked at the read and in phase 1's pipeline, not inside each
  slot's script (the epoch lives in one slot): a rebuild that deletes the state
  between that check and phase 2 can let one batch's writes land on the
  emptied state (users written for the first time and item marks; a user read
  with a value fails its compare-and-set). Item-side marks double the dedupe
  marks' memory; they are not written on one Redis, where items and marks are
  in one transaction.

Cluster limits: the epoch key lives on one master, so a master that restarts
empty while the others keep their data is not seen as an empty state (its run
id changes `instance_id`, which sends partitions back to their recorded
offsets, but those records may live on a master that kept them): run cluster
masters with replicas or persistence.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import redis
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from serving.config import RedisConfig
from serving.errors import StateUnavailable
from serving.security import redis_connection_kwargs
from serving.state.base import EpochChanged, IngestFn, IngestResult, IngestWrite, ItemStats, OnlineStore, UserEvents
from serving.state.codec import (GEN_BYTES, GEN_OFFSET, UserRecord, cas_token, decode_item_logs, decode_user, encode_user,
                                 prune_item_log)
from serving.state.user_cache import UserCache

# Writes one slot's share of an ingest (one Redis: all of it). Returns {1, item log sizes...} when written,
# {0, 1-based indices of users whose value changed since it was read...} when nothing was written (conflict),
# {-1} when the epoch is not ARGV[1] (nothing written), {-2, index} when a user's staged value is gone
# (expired or evicted before the script ran; nothing written: the caller stages and calls again).
# The users' new values are not arguments: the same pipeline SETs each first under its own staging key
# (`Keys.staged`, named by the value's generation, so writers never share one; PX STAGE_TTL_MS), and the
# script RENAMEs it over the user's key once every compare-and-set holds: value bytes passed through a
# script cost Redis ~4x what a plain SET of them costs, and a RENAME copies nothing.
# KEYS: epoch (if ARGV[1] ~= '') | users (nu) | their staged values (nu) | their marks | popularity shards (ns)
#       | items (ni) | item marks
# ARGV: epoch nu ni ns user_ttl_ms mark_ttl_s mark_items(0/1)
#       | per user: the value read's codec.cas_token ('' = none; 8 bytes: its generation; else its SHA-1),
#         number of marks
#       | per item: member, popularity shard (1-based), records, behaviors, flags (mark_items: 1 byte per event)
APPLY_LUA = """
local nu, ni, ns = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local uttl, mttl, mark_items = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local k = 1
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
  k = 2
end
local a = 8
local bad = {}
for i = 1, nu do
  local key, want = KEYS[k + i - 1], ARGV[a + 2 * (i - 1)]
  if want == '' then
    if redis.call('EXISTS', key) == 1 then bad[#bad + 1] = i end
  elseif #want == GEN_BYTES then
    if redis.call('GETRANGE', key, GEN_FIRST, GEN_LAST) ~= want then bad[#bad + 1] = i end
  else
    local cur = redis.call('GET', key)
    if not cur or redis.sha1hex(cur) ~= want then bad[#bad + 1] = i end
  end
end
local staged = k + nu
local gone = 0
for i = 1, nu do
  if gone == 0 and redis.call('EXISTS', KEYS[staged + i - 1]) == 0 then gone = i end
end
if #bad > 0 or gone > 0 then
  for i = 1, nu do redis.call('DEL', KEYS[staged + i - 1]) end
  if #bad > 0 then return {0, unpack(bad)} end
  return {-2, gone}
end
local m = staged + nu
for i = 1, nu do
  local key = KEYS[k + i - 1]
  redis.call('RENAME', KEYS[staged + i - 1], key)
  if uttl > 0 then redis.call('PEXPIRE', key, uttl) else redis.call('PERSIST', key) end
  for j = 1, tonumber(ARGV[a + 1]) do
    redis.call('SET', KEYS[m], '1', 'EX', mttl)
    m = m + 1
  end
  a = a + 2
end
local shard = m
local ik = m + ns
local im = ik + ni
local out = {1}
for i = 1, ni do
  local member, s, recs, beh, flags = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3]), ARGV[a + 4]
  a = a + 5
  local key = KEYS[ik + i - 1]
  if mark_items then
    local keep, r = {}, 1
    beh = 0
    for j = 1, #flags do
      local f = string.byte(flags, j)
      local new = redis.call('SET', KEYS[im], '1', 'NX', 'EX', mttl)
      im = im + 1
      if f % 2 == 1 then
        if new then keep[#keep + 1] = string.sub(recs, r, r + 8) end
        r = r + 9
      end
      if new and f >= 2 then beh = beh + 1 end
    end
    recs = table.concat(keep)
  end
  if #recs > 0 then out[#out + 1] = redis.call('APPEND', key, recs) else out[#out + 1] = 0 end
  if beh > 0 then redis.call('ZINCRBY', KEYS[shard + s - 1], beh, member) end
end
return out
""".replace("GEN_BYTES", str(GEN_BYTES)).replace("GEN_FIRST", str(GEN_OFFSET)).replace(
    "GEN_LAST", str(GEN_OFFSET + GEN_BYTES - 1))
STAGE_TTL_MS = 60_000  # a staged value outlives its pipeline by far; one a crash left behind goes away

# KEYS: dedupe marks to set; ARGV: their TTL in seconds
MARKS_LUA = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], '1', 'EX', ARGV[1]) end
return #KEYS
"""

# KEYS: item logs; ARGV: per key (sha1 of the value pruned, the pruned value). Sets each key still holding
# the value that was pruned; returns 1/0 per key.
PRUNE_LUA = """
local out = {}
for i = 1, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if cur and redis.sha1hex(cur) == ARGV[2 * i - 1] then
    redis.call('SET', KEYS[i], ARGV[2 * i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: epoch, meta (one slot); ARGV: replace (0/1), epoch id, meta field, value, ... -> 1 set, 0 one exists
EPOCH_LUA = """
if ARGV[1] == '0' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if #ARGV > 2 then redis.call('HSET', KEYS[2], unpack(ARGV, 3)) end
redis.call('SET', KEYS[1], ARGV[2])
return 1
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

RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


# what a Redis or Redis Cluster client raises when the store cannot do its work (-> StateUnavailable);
# RedisClusterException (no slot owner, cluster down at discovery) is not a RedisError
REDIS_ERRORS = (RedisError, RedisClusterException)


class _Lua:
    """A script run by EVALSHA (`RedisOnlineStore._eval_all` loads it where a node lacks it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


APPLY, MARKS, PRUNE, EPOCH = _Lua(APPLY_LUA), _Lua(MARKS_LUA), _Lua(PRUNE_LUA), _Lua(EPOCH_LUA)
GET = _Lua("return redis.call('GET', KEYS[1])")  # a plain GET that can share a script pipeline


class Keys:
    """Every key name of the layout (module docstring). Hash tags: ``{u:<group>}``, ``{i:<group>}``, ``{global}``."""

    def __init__(self, prefix: str, user_groups: int = 128, item_groups: int = 16) -> None:
        self.p = prefix
        self.user_groups = user_groups
        self.item_groups = item_groups
        self._user_slots = [key_slot(f"u:{g}".encode()) for g in range(user_groups)]
        self._item_slots = [key_slot(f"i:{g}".encode()) for g in range(item_groups)]

    def user(self, uid: int) -> str:
        return f"{self.p}:{{u:{uid % self.user_groups}}}:{uid}"

    def staged(self, uid: int, gen: bytes) -> str:
        """Where an ingest stages the user's new value (generation `gen`) before APPLY_LUA renames it in place."""
        return f"{self.p}:{{u:{uid % self.user_groups}}}:n:{uid}:{gen.hex()}"

    def mark(self, uid: int, event_id: str) -> str:
        return f"{self.p}:{{u:{uid % self.user_groups}}}:e:{event_id}"

    def user_slot(self, uid: int) -> int:
        return self._user_slots[uid % self.user_groups]

    def group_slot(self, group: int) -> int:
        return self._item_slots[group]

    def item_group(self, iid: int) -> int:
        return iid % self.item_groups

    def item_log(self, iid: int) -> str:
        return f"{self.p}:{{i:{iid % self.item_groups}}}:i:{iid}"

    def item_mark(self, group: int, event_id: str) -> str:
        return f"{self.p}:{{i:{group}}}:e:{event_id}"

    def popularity(self, group: int) -> str:
        return f"{self.p}:{{i:{group}}}:popularity"

    def named(self, name: str) -> str:
        """A state-wide key ("meta", "epoch", "rebuild_lock", "positions", "applied"), all in one slot."""
        return f"{self.p}:{{global}}:{name}"

    @property
    def meta(self) -> str:
        return self.named("meta")

    @property
    def epoch(self) -> str:
        return self.named("epoch")

    @property
    def rebuild_lock(self) -> str:
        return self.named("rebuild_lock")

    @property
    def positions(self) -> str:
        return self.named("positions")

    @property
    def applied(self) -> str:
        return self.named("applied")


def _sha1(blob: bytes | None) -> str:
    return "" if blob is None else hashlib.sha1(blob).hexdigest()


def _client(cfg: RedisConfig, timeout_s: float) -> Any:
    kw = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=cfg.max_connections,
              **redis_connection_kwargs(cfg))
    if not cfg.cluster:
        return redis.Redis.from_url(cfg.url, health_check_interval=0, **kw)
    from redis.cluster import ClusterNode, RedisCluster

    nodes = [ClusterNode(h, int(p)) for h, _, p in (a.rpartition(":") for a in cfg.cluster_nodes)]
    return RedisCluster.from_url(cfg.url, startup_nodes=nodes, **kw)


class RedisOnlineStore(OnlineStore):
    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self.cluster = cfg.cluster
        self.keys = Keys(cfg.key_prefix, cfg.user_groups, cfg.item_groups)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        # the records this process's ingests wrote (serving.state.user_cache): not read again while current
        self.user_cache = UserCache(cfg.ingest_cache_mb << 20) if cfg.ingest_cache_mb else None

    # A cluster client discovers the nodes when it is made: made on first use, so that a server starts
    # (degraded) while Redis is down, like with one Redis.
    def _get(self, which: str) -> Any:
        c = self._clients.get(which)
        if c is not None:
            return c
        with self._lock:
            if which not in self._clients:
                timeout = self.cfg.socket_timeout_s if which == "fast" else self.cfg.ingest_socket_timeout_s
                try:
                    self._clients[which] = _client(self.cfg, timeout)
                except REDIS_ERRORS as e:
                    raise StateUnavailable(f"redis cluster at {self.cfg.url}: {e}") from e
            return self._clients[which]

    @property
    def _fast(self) -> Any:  # request path: short timeouts (a slow Redis is a down Redis: degrade, don't queue)
        return self._get("fast")

    @property
    def _slow(self) -> Any:  # consumers, bootstrap, rebuild: big pipelines
        return self._get("slow")

    def _mget(self, client: Any, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        return client.mget_nonatomic(keys) if self.cluster else client.mget(keys)

    def _eval_all(self, client: Any, calls: Sequence[tuple]) -> list[Any]:
        """Runs script calls ``(script, keys, args[, commands sent just before it])`` in one pipeline (a
        cluster: each call, with its commands, in its slot's node, in order), loading scripts a node lacks;
        returns the scripts' results in order (a command's error is raised)."""
        if not calls:
            return []
        todo = list(range(len(calls)))
        out: list[Any] = [None] * len(calls)
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            at = []  # position of each script's answer in the pipeline's
            for i in todo:
                lua, keys, args, *pre = calls[i]
                for cmd in (pre[0] if pre else ()):
                    pipe.execute_command(*cmd)
                at.append(len(pipe))
                pipe.execute_command("EVALSHA", lua.sha, len(keys), *keys, *args)  # (ClusterPipeline blocks .evalsha)
            res = pipe.execute(raise_on_error=False)
            for r in res:
                if isinstance(r, Exception) and not isinstance(r, NoScriptError):
                    raise r
            missing = []
            for i, r in zip(todo, (res[j] for j in at)):
                if isinstance(r, NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(r, Exception):
                    raise r
                else:
                    out[i] = r
            if not missing:
                break
            for lua in {calls[i][0] for i in missing}:
                client.script_load(lua.source)  # a cluster: on every master
            todo = missing
        return out

    def _slot_groups(self, keys: Iterable[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for k in keys:
            groups.setdefault(self._slow.keyslot(k) if self.cluster else 0, []).append(k)
        return groups

    # ------------------------------------------------------------------ request path
    def read_user(self, user_id: int) -> UserRecord | None:
        key = self.keys.user(user_id)
        try:
            blob = self._fast.get(key)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis GET {key}: {e}") from e
        return None if blob is None else decode_user(blob, where=key)

    def read_item_stats(self, item_ids: np.ndarray) -> ItemStats:
        keys = [self.keys.item_log(i) for i in item_ids.tolist()]
        try:
            vals = self._mget(self._fast, keys)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis MGET of {len(keys)} items' counters: {e}") from e
        return ItemStats(*decode_item_logs(vals, where=f"{self.keys.p}:{{i:*}}:i:*"))

    def ping(self) -> bool:
        try:
            return bool(self._fast.ping())
        except (*REDIS_ERRORS, StateUnavailable):
            return False

    # ------------------------------------------------------------------ ingest
    def ingest(self, events: UserEvents, fn: IngestFn, max_retries: int = 10,
               epoch: str | None = None) -> IngestResult:
        k = self.keys
        uids = list(events)
        eids = {u: list(dict.fromkeys(events[u])) for u in uids}
        flat = [e for u in uids for e in eids[u]]
        mark_keys = [k.mark(u, e) for u in uids for e in eids[u]]
        cache = self.user_cache
        done = IngestWrite()
        sizes: dict[int, int] = {}
        conflicts = hits = stale = 0
        try:
            while True:
                # users this process wrote last are not read: their cached generation is the write's
                # compare-and-set token (a user changed meanwhile is a conflict, then read like the others)
                cached = cache.lookup(uids) if cache is not None else {}
                fetch = [u for u in uids if u not in cached] if cached else uids
                if not conflicts:
                    hits = len(cached)
                read_keys = [k.user(u) for u in fetch] + mark_keys
                if epoch is not None:
                    read_keys.append(k.epoch)
                vals = self._mget(self._slow, read_keys)
                if epoch is not None:
                    self._check_epoch(vals[-1], epoch)
                states: dict[int, UserRecord | None] = {u: rec for u, (_, rec) in cached.items()}
                tokens = {u: gen for u, (gen, _) in cached.items()}
                for u, v in zip(fetch, vals):
                    states[u] = None if v is None else decode_user(v, where=k.user(u), decode_attrs=False)
                    tokens[u] = cas_token(v)
                seen = {e for e, v in zip(flat, vals[len(fetch):]) if v is not None}
                write = fn(states, seen)
                gens: dict[int, tuple[bytes, int]] = {}
                written, changed = self._write(write, tokens, epoch, sizes, gens)
                if cache is not None:
                    cache.put((u, gens[u][0], write.users[u], gens[u][1]) for u in written)
                    stale += cache.drop(changed)
                for u in written:  # what landed (a cluster: the groups without a conflict)
                    done.users[u] = write.users[u]
                    if u in write.marks:
                        done.marks[u] = write.marks[u]
                done.items.update(write.items)
                if not changed:
                    break
                conflicts += 1  # read again: what landed is now marked, the changed users are recomputed
                if conflicts > max_retries:
                    raise StateUnavailable(
                        f"ingest: {conflicts} conflicting writes in a row on {len(changed)} of {len(uids)} users; "
                        "is another consumer writing the same users (partition assigned twice)?")
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis ingest ({len(uids)} users, {len(mark_keys)} events): {e}") from e
        return IngestResult(write=done, conflicts=conflicts, item_log_bytes=sizes, cached_users=hits,
                            stale_cached_users=stale)

    @staticmethod
    def _check_epoch(value: bytes | None, epoch: str) -> None:
        if (value or b"").decode() != epoch:
            raise EpochChanged(f"redis holds state epoch {value!r}, not {epoch!r}: "
                               "not writing until the state is rebuilt")

    def _write(self, write: IngestWrite, tokens: Mapping[int, bytes], epoch: str | None, sizes: dict[int, int],
               gens: dict[int, tuple[bytes, int]]) -> tuple[list[int], list[int]]:
        """Writes `write`, each user only if its value's `codec.cas_token` is still `tokens[user]` (item log
        sizes into `sizes`; each user's new value's generation and size into `gens`) -> (users written, users
        changed since read: not written)."""
        users = list(write.users)
        items = list(write.items)
        if not self.cluster:  # one call, all-or-nothing
            res = self._eval_all(self._slow, [self._apply_call(write, users, items, tokens, epoch, False, gens)])[0]
            return self._outcome(res, users, items, epoch, sizes)
        k = self.keys
        by_slot: dict[int, list[int]] = {}
        for i in items:
            by_slot.setdefault(k.group_slot(k.item_group(i)), []).append(i)
        phase1 = [self._apply_call(write, [], part, tokens, None, True, gens) for part in by_slot.values()]
        if epoch is not None:  # the epoch is re-read with phase 1 (its own slot, so not inside the scripts)
            phase1.append((GET, [k.epoch], []))
        res = self._eval_all(self._slow, phase1)
        for part, r in zip(by_slot.values(), res):
            self._outcome(r, [], part, None, sizes)
        if epoch is not None:
            self._check_epoch(res[-1], epoch)
        by_slot = {}
        for u in users:
            by_slot.setdefault(k.user_slot(u), []).append(u)
        res = self._eval_all(self._slow, [self._apply_call(write, part, [], tokens, None, False, gens)
                                          for part in by_slot.values()])
        written, changed = [], []
        for part, r in zip(by_slot.values(), res):
            w, c = self._outcome(r, part, [], None, sizes)
            written += w
            changed += c
        return written, changed

    def _apply_call(self, write: IngestWrite, users: list[int], items: list[int], tokens: Mapping[int, bytes],
                    epoch: str | None, mark_items: bool, gens: dict[int, tuple[bytes, int]]
                    ) -> tuple[_Lua, list[str], list[Any], list[tuple]]:
        """(APPLY, keys, args, the SETs staging the users' new values: sent just before it)."""
        k = self.keys
        marks = write.marks
        groups = list(dict.fromkeys(k.item_group(i) for i in items))
        shard = {g: n for n, g in enumerate(groups, 1)}
        staged, stage = [], []
        for u in users:
            value = encode_user(write.users[u])
            gen = value[GEN_OFFSET:GEN_OFFSET + GEN_BYTES]
            gens[u] = (gen, len(value))
            key = k.staged(u, gen)
            staged.append(key)
            stage.append(("SET", key, value, "PX", STAGE_TTL_MS))
        keys = ([k.epoch] if epoch is not None else []) + [k.user(u) for u in users] + staged
        keys += [k.mark(u, e) for u in users for e in marks.get(u, ())]
        keys += [k.popularity(g) for g in groups] + [k.item_log(i) for i in items]
        args: list[Any] = [epoch or "", len(users), len(items), len(groups), self.cfg.user_ttl_s * 1000,
                           self.cfg.dedupe_ttl_s, "1" if mark_items else "0"]
        for u in users:
            args += [tokens.get(u, b""), len(marks.get(u, ()))]
        for i in items:
            w = write.items[i]
            g = k.item_group(i)
            args += [str(i), shard[g], w.log, w.behaviors, w.flags if mark_items else ""]
            if mark_items:
                keys += [k.item_mark(g, e) for e in w.event_ids]
        return APPLY, keys, args, stage

    @staticmethod
    def _outcome(res: list, users: list[int], items: list[int], epoch: str | None, sizes: dict[int, int]
                 ) -> tuple[list[int], list[int]]:
        """One APPLY_LUA answer -> (users written, users changed since read); item log sizes into `sizes`."""
        status = int(res[0])
        if status == -1:
            raise EpochChanged(f"redis no longer holds state epoch {epoch!r}: not writing until the state is rebuilt")
        if status == 0:
            return [], [users[int(i) - 1] for i in res[1:]]
        if status == -2:  # a staged value vanished before the script ran: nothing written, stage and write again
            return [], [users[int(res[1]) - 1]]
        sizes.update((i, int(n)) for i, n in zip(items, res[1:]) if int(n))
        return users, []

    def prune_item_logs(self, item_ids: Iterable[int], cutoff_ms: int) -> int:
        keys = {self.keys.item_log(i): i for i in item_ids}
        try:
            blobs = dict(zip(keys, self._mget(self._slow, list(keys))))
            pruned = {key: p for key, b in blobs.items() if b and (p := prune_item_log(b, cutoff_ms)) is not None}
            calls = [(PRUNE, part, [x for key in part for x in (_sha1(blobs[key]), pruned[key][0])])
                     for part in self._slot_groups(pruned).values()]
            res = self._eval_all(self._slow, calls)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis prune of {len(keys)} items' counters: {e}") from e
        # a log appended meanwhile kept its value: pruned next time
        return sum(pruned[key][1] for (_, part, _), r in zip(calls, res) for key, ok in zip(part, r) if int(ok))

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
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis bulk load of {len(items)} users: {e}") from e

    def put_item_logs(self, logs: Mapping[int, bytes], chunk: int = 1000) -> None:
        ids = list(logs)
        try:
            for s in range(0, len(ids), chunk):
                pipe = self._slow.pipeline(transaction=False)
                for i in ids[s:s + chunk]:
                    pipe.set(self.keys.item_log(i), logs[i])
                pipe.execute()
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis bulk load of {len(ids)} items' counters: {e}") from e

    def add_popularity(self, counts: Mapping[int, float], chunk: int = 5000) -> None:
        items = [(i, float(c)) for i, c in counts.items() if c]
        k = self.keys
        try:
            for s in range(0, len(items), chunk):
                pipe = self._slow.pipeline(transaction=False)
                for i, c in items[s:s + chunk]:
                    pipe.zincrby(k.popularity(k.item_group(i)), c, str(i))
                pipe.execute()
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis popularity load: {e}") from e

    def top_items(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n most popular items: each group's top n, merged (ties in ZREVRANGE's order: member descending)."""
        k = self.keys
        try:
            pipe = self._slow.pipeline(transaction=False)
            for g in range(k.item_groups):
                pipe.zrevrange(k.popularity(g), 0, n - 1, withscores=True)
            rows = [r for part in pipe.execute() for r in part]
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis ZREVRANGE of {k.popularity(0)} (and the other groups): {e}") from e
        if k.item_groups > 1:
            rows = sorted(rows, key=lambda r: (r[1], r[0]), reverse=True)[:n]
        ids = np.fromiter((int(m) for m, _ in rows), np.int64, len(rows))
        scores = np.fromiter((s for _, s in rows), np.float64, len(rows))
        return ids, scores

    def set_meta(self, meta: Mapping[str, str]) -> None:
        try:
            self._slow.hset(self.keys.meta, mapping=dict(meta))
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis HSET {self.keys.meta}: {e}") from e

    def get_meta(self) -> dict[str, str]:
        try:
            return {k.decode(): v.decode() for k, v in self._slow.hgetall(self.keys.meta).items()}
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis HGETALL {self.keys.meta}: {e}") from e

    def flush_prefix(self, keep: Iterable[str] = ()) -> int:
        """Deletes every key under the prefix but the state-wide keys named in `keep` (e.g. "rebuild_lock")
        (tests, `--bootstrap --fresh`, rebuilds). Returns the number deleted."""
        n = 0
        kept = {self.keys.named(k).encode() for k in keep}
        try:
            for batch in _chunks(self._slow.scan_iter(match=f"{self.keys.p}:*", count=1000), 1000):
                batch = [k for k in batch if k not in kept]
                n += self._slow.delete(*batch) if batch else 0  # a cluster: one DEL per slot
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis delete of {self.keys.p}:*: {e}") from e
        return n

    # ------------------------------------------------------------------ state epoch (serving.rebuild)
    def get_epoch(self) -> str | None:
        try:
            v = self._slow.get(self.keys.epoch)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis GET {self.keys.epoch}: {e}") from e
        return None if v is None else v.decode()

    def create_epoch(self, epoch_id: str, info: Mapping[str, str], replace: bool) -> bool:
        args = ["1" if replace else "0", epoch_id, *(x for kv in info.items() for x in kv)]
        try:
            return bool(self._eval_all(self._slow, [(EPOCH, [self.keys.epoch, self.keys.meta], args)])[0])
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis epoch write {self.keys.epoch}: {e}") from e

    def acquire_rebuild_lock(self, token: str, ttl_s: float) -> bool:
        try:
            return bool(self._slow.set(self.keys.rebuild_lock, token, nx=True, px=int(ttl_s * 1000)))
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis SET {self.keys.rebuild_lock} NX: {e}") from e

    def release_rebuild_lock(self, token: str) -> None:
        try:  # only our own lock (it may have expired and been taken over)
            self._slow.eval(RELEASE_LUA, 1, self.keys.rebuild_lock, token)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis release of {self.keys.rebuild_lock}: {e}") from e

    def put_marks(self, user_ids: Sequence[int], event_ids: Sequence[str], chunk: int = 5000) -> int:
        if len(user_ids) != len(event_ids):
            raise ValueError(f"put_marks: {len(user_ids)} user ids for {len(event_ids)} event ids (must be parallel)")
        n = 0
        ttl = [self.cfg.dedupe_ttl_s]
        try:  # one command per chunk and slot: the client's cost per key is the floor
            for s in range(0, len(event_ids), chunk):
                keys = [self.keys.mark(u, e) for u, e in zip(user_ids[s:s + chunk], event_ids[s:s + chunk])]
                self._eval_all(self._slow, [(MARKS, part, ttl) for part in self._slot_groups(keys).values()])
                n += len(keys)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis bulk load of dedupe marks ({n} written): {e}") from e
        return n

    def partition_epochs(self, partitions: list[str]) -> dict[str, str]:
        if not partitions:
            return {}
        try:
            vals = self._slow.hmget(self.keys.positions, partitions)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis HMGET {self.keys.positions}: {e}") from e
        return {p: v.decode() for p, v in zip(partitions, vals) if v is not None}

    def set_partition_epochs(self, epochs: Mapping[str, str]) -> None:
        if not epochs:
            return
        try:
            self._slow.hset(self.keys.positions, mapping=dict(epochs))
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis HSET {self.keys.positions}: {e}") from e

    def applied_offsets(self, partitions: list[str]) -> dict[str, int]:
        if not partitions:
            return {}
        try:
            vals = self._slow.hmget(self.keys.applied, partitions)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis HMGET {self.keys.applied}: {e}") from e
        return {p: int(v) for p, v in zip(partitions, vals) if v is not None}

    def set_applied_offsets(self, offsets: Mapping[str, tuple[int | None, int]]) -> dict[str, int | None]:
        if not offsets:
            return {}
        args = [x for k, (old, new) in offsets.items() for x in (k, "" if old is None else str(old), str(new))]
        try:
            res = self._slow.eval(CAS_APPLIED_LUA, 1, self.keys.applied, *args)
        except REDIS_ERRORS as e:
            raise StateUnavailable(f"redis compare-and-set of {self.keys.applied}: {e}") from e
        return {res[i].decode(): (int(res[i + 1]) if res[i + 1] else None) for i in range(0, len(res), 2)}

    def instance_id(self) -> str:
        """One Redis: its run_id; a cluster: the masters' run_ids (any restart or failover changes it)."""
        try:
            if not self.cluster:
                return str(self._slow.info("server")["run_id"])
            from redis.cluster import RedisCluster

            per_node = self._slow.info("server", target_nodes=RedisCluster.PRIMARIES)
            return ",".join(sorted(str(v["run_id"]) for v in per_node.values()))
        except (*REDIS_ERRORS, KeyError) as e:
            raise StateUnavailable(f"redis INFO server: {e}") from e

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


def _chunks(it: Iterable, n: int):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
