"""The `OnlineStore` contract, one suite run against every implementation: `InMemoryOnlineStore`, and
`RedisOnlineStore` on a real redis-server and on a real three-master Redis Cluster (tests/conftest.py).

What a store owes its callers (serving/state/base.py): ingest applies every event once under redelivery and
concurrent writers (compare-and-set, bounded retries), only within its state epoch; bulk loads, pruning, the
popularity ranking, the rebuild's lock, epoch, offsets and flush; TTLs. Unit tests of what runs over a store
use the in-memory one (`memory_store` in tests/conftest.py), because it passes this suite. What only the
cluster does (a crash between its per-slot writes) is in test_cluster.py."""
from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from features.schema import Event
from serving.state.base import BEHAVIOR, COUNTED, EpochChanged, IngestWrite, ItemWrite
from serving.state.codec import UserRecord, encode_item_log, encode_user
from tests.serving.conftest import applier as _applier, format1_value, kafka_records as _msgs

DAY = 86_400_000
BACKENDS = ["memory", "redis", "redis_cluster"]


@pytest.fixture(params=BACKENDS)
def make_store(request):
    """make_store(item_groups=None, **ttls) -> a fresh, empty store of the backend (a Redis one on its own key
    prefix); flushed and closed at teardown."""
    from serving.config import RedisConfig
    from serving.state.memory_store import InMemoryOnlineStore
    from serving.state.redis_store import RedisOnlineStore

    made = []

    def make(item_groups: int | None = None, user_ttl_s: int = 0, dedupe_ttl_s: int = 14 * 86_400):
        if request.param == "memory":
            s = InMemoryOnlineStore(user_ttl_s=user_ttl_s, dedupe_ttl_s=dedupe_ttl_s)
        else:
            cluster = request.param == "redis_cluster"
            node = request.getfixturevalue("redis_cluster" if cluster else "_single_redis")
            s = RedisOnlineStore(RedisConfig(url=node.address, key_prefix=f"t{uuid.uuid4().hex[:10]}", cluster=cluster,
                                             item_groups=item_groups or (8 if cluster else 1), user_ttl_s=user_ttl_s,
                                             dedupe_ttl_s=dedupe_ttl_s))
        made.append(s)
        return s

    yield make
    for s in made:
        s.flush_prefix()
        s.close()


@pytest.fixture()
def store(make_store):
    return make_store()


def _another_connection(store):
    """The same state as another process sees it (Redis: another client; in memory: the same object)."""
    from serving.state.redis_store import RedisOnlineStore

    return RedisOnlineStore(store.cfg) if isinstance(store, RedisOnlineStore) else store


# ---------------------------------------------------------------------------------------------------------------
# Events through the real consumer (EventApplier): what the store is for


def _stream(n: int, users: int = 7, items: int = 11, seed: int = 0, tag: str = "e"):
    """n events of a few users and items, in time order, stamped within the last hour."""
    rng = np.random.default_rng(seed)
    t0 = int(time.time() * 1000) - 3_600_000
    types = ["click", "impression", "rating", "purchase"]
    return [Event(f"{tag}{i:05d}", int(rng.integers(1, users + 1)), int(rng.integers(1, items + 1)), t0 + i * 1000,
                  types[int(rng.integers(0, len(types)))], float(rng.integers(0, 2))) for i in range(n)]


def _expected(events, state):
    """users' sequences, items' counted totals and popularity, from the events (each applied once)."""
    from collections import Counter, defaultdict

    counted = set(state.stats.counted_event_types())
    behaviors = set(state.sequence.behavior_event_types)
    seqs = defaultdict(list)
    for e in events:
        if e.event_type in behaviors:
            seqs[e.user_id].append(e.item_id)
    return (dict(seqs), Counter(e.item_id for e in events if e.event_type in counted),
            Counter(e.item_id for e in events if e.event_type in behaviors))


def _assert_state(store, events, state, any_order: bool = False):
    """The store holds exactly `events`' effects, each once (any_order: writers raced, so a user's sequence
    is compared as a set of behaviors)."""
    seqs, counts, pop = _expected(events, state)
    norm = sorted if any_order else list
    for u, items in seqs.items():
        assert norm(store.read_user(u).seq.item_ids.tolist()) == norm(items[-state.sequence.long_cap:]), f"user {u}"
    ids = np.array(sorted(counts), np.int64)
    assert dict(zip(ids.tolist(), store.read_item_stats(ids).total_cnt.tolist())) == dict(counts)
    top_ids, top_counts = store.top_items(1000)
    assert dict(zip(top_ids.tolist(), top_counts.tolist())) == dict(pop)


def _values(store, users):
    return {u: None if (r := store.read_user(u)) is None else encode_user(r, gen=bytes(8)) for u in users}


def test_ingest_writes_users_items_and_popularity_and_a_redelivery_is_a_no_op(store, applier_parts):
    events = _stream(300)
    a = _applier(store, applier_parts)
    for s in range(0, len(events), 64):  # poll batches
        out = a.apply(_msgs(events[s:s + 64]))
        assert out.applied == len(events[s:s + 64]) and out.conflicts == 0
    _assert_state(store, events, applier_parts[0])
    before = _values(store, range(1, 8))
    out = a.apply(_msgs(events[100:250]))  # redelivered from an older offset
    assert (out.applied, out.deduplicated) == (0, 150)
    assert _values(store, range(1, 8)) == before
    _assert_state(store, events, applier_parts[0])


class _RacedOnce:
    """The store as one consumer sees it: between its first read and its write, `race` runs (another consumer
    writes the same users)."""

    def __init__(self, store, race) -> None:
        self.store, self.race, self.calls = store, race, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def ingest(self, events, fn, **kw):
        def fn_once_raced(states, seen):
            if not self.calls:
                self.race()
            self.calls += 1
            return fn(states, seen)
        return self.store.ingest(events, fn_once_raced, **kw)


def test_a_user_written_by_another_consumer_meanwhile_is_recomputed_not_overwritten(store, applier_parts):
    mine, theirs = _stream(40, users=3, tag="m"), _stream(10, users=3, seed=1, tag="o")
    other = _applier(_another_connection(store), applier_parts)
    raced = _RacedOnce(store, lambda: other.apply(_msgs(theirs)))
    out = _applier(raced, applier_parts).apply(_msgs(mine))
    assert out.conflicts >= 1 and out.applied == 40 and raced.calls == 1 + out.conflicts
    _assert_state(store, theirs + mine, applier_parts[0], any_order=True)  # both consumers' events, each once


@pytest.mark.parametrize("changed_meanwhile", [False, True])
def test_a_format_1_value_is_applied_to_and_its_change_meanwhile_is_a_conflict(store, applier_parts, changed_meanwhile):
    """Values written before format 2 (their compare-and-set token is their SHA-1): events are applied on top of
    them, the value is rewritten in format 2, and one replaced after the read is recomputed, not overwritten."""
    from serving.state.memory_store import InMemoryOnlineStore
    from serving.state.codec import decode_user

    if isinstance(store, InMemoryOnlineStore):
        pytest.skip("values are objects in memory: no stored format")
    old, later = _stream(12, users=2, tag="a"), _stream(6, users=2, seed=1, tag="b")
    seed = InMemoryOnlineStore()
    _applier(seed, applier_parts).apply(_msgs(old))
    client = store._slow
    for u in (1, 2):
        client.set(store.keys.user(u), format1_value(encode_user(seed.read_user(u))))
    assert decode_user(client.get(store.keys.user(1))).seq.equals(seed.read_user(1).seq)
    mine = _stream(20, users=2, seed=2, tag="c")
    if changed_meanwhile:  # between the read and the write, another writer puts a changed format-1 value
        other = InMemoryOnlineStore()
        _applier(other, applier_parts).apply(_msgs(old + later))
        target = _RacedOnce(store, lambda: [client.set(store.keys.user(u), format1_value(encode_user(other.read_user(u))))
                                            for u in (1, 2)])
    else:
        target = store
    out = _applier(target, applier_parts).apply(_msgs(mine))
    assert out.applied == 20 and out.conflicts == (1 if changed_meanwhile else 0)
    seqs = _expected(old + (later if changed_meanwhile else []) + mine, applier_parts[0])[0]
    for u in (1, 2):  # the users' state (the item counters were never seeded: only `mine` reached them)
        assert sorted(store.read_user(u).seq.item_ids.tolist()) == sorted(seqs[u]), f"user {u}"
    assert all(client.get(store.keys.user(u))[4] == 2 for u in (1, 2))  # rewritten in format 2


def _staged_keys(store) -> list[bytes]:
    return list(store._slow.scan_iter(match=f"{store.keys.p}:*:n:*", count=1000))


def test_staged_values_are_installed_or_removed_never_left_behind(store, applier_parts):
    """Redis stages each user's new value under its own key and the script renames it in place: after plain
    batches and after a conflict (the loser's staged values deleted) no staged key remains."""
    from serving.state.memory_store import InMemoryOnlineStore

    if isinstance(store, InMemoryOnlineStore):
        pytest.skip("no staged values in memory")
    _applier(store, applier_parts).apply(_msgs(_stream(50, users=4, tag="s")))
    assert _staged_keys(store) == []
    other = _applier(_another_connection(store), applier_parts)
    raced = _RacedOnce(store, lambda: other.apply(_msgs(_stream(10, users=4, seed=1, tag="o"))))
    assert _applier(raced, applier_parts).apply(_msgs(_stream(30, users=4, seed=2, tag="m"))).conflicts >= 1
    assert _staged_keys(store) == []


def test_a_staged_value_gone_before_the_script_writes_nothing_and_is_retried(store, applier_parts):
    """A staged value that expired or was evicted before APPLY ran (here: its SET never sent): the script
    writes nothing of the batch (single Redis: no user, mark or counter; cluster: nothing in that slot), the
    ingest stages again and every event lands once."""
    from serving.state.memory_store import InMemoryOnlineStore

    if isinstance(store, InMemoryOnlineStore):
        pytest.skip("no staged values in memory")
    first = _stream(30, users=4, tag="f")
    _applier(store, applier_parts).apply(_msgs(first))
    inner, dropped = store._eval_all, []

    def drop_first_stage(client, calls):
        if not dropped and any(len(c) == 4 and c[3] for c in calls):
            dropped.append(True)
            calls = [(*c[:3], c[3][1:]) if len(c) == 4 and c[3] else c for c in calls]  # one staged SET lost
        return inner(client, calls)

    store._eval_all = drop_first_stage
    try:
        later = _stream(40, users=4, seed=3, tag="l")
        out = _applier(store, applier_parts).apply(_msgs(later))
    finally:
        del store._eval_all
    assert dropped and out.applied == 40 and out.conflicts == 1
    _assert_state(store, first + later, applier_parts[0], any_order=True)  # (the two streams' times interleave)
    assert _staged_keys(store) == []


def test_consumers_in_threads_writing_the_same_users_apply_every_event_once(store, applier_parts):
    streams = [_stream(60, users=5, items=9, seed=s, tag=f"t{s}-") for s in range(3)]
    errors = []

    def consume(events):
        conn = _another_connection(store)
        try:
            a = _applier(conn, applier_parts)
            for s in range(0, len(events), 20):
                assert a.apply(_msgs(events[s:s + 20])).applied == 20
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
        finally:
            if conn is not store:
                conn.close()

    threads = [threading.Thread(target=consume, args=(ev,)) for ev in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    _assert_state(store, [e for ev in streams for e in ev], applier_parts[0], any_order=True)


def test_ingest_for_another_epoch_writes_nothing(store, applier_parts):
    assert store.create_epoch("e1", {"snapshot": "s"}, replace=False)
    a = _applier(store, applier_parts)
    a.epoch = "e0"
    with pytest.raises(EpochChanged, match="e0"):
        a.apply(_msgs(_stream(20)))
    assert all(store.read_user(u) is None for u in range(1, 8))
    assert store.top_items(10)[0].size == 0 and store.read_item_stats(np.arange(1, 12)).total_cnt.sum() == 0
    a.epoch = "e1"
    assert a.apply(_msgs(_stream(20))).applied == 20


def test_bulk_loaded_marks_make_those_events_redeliveries(store, applier_parts):
    events = _stream(50)
    store.put_users({u: UserRecord.empty() for u in range(1, 8)})
    assert store.put_marks([e.user_id for e in events[:30]], [e.event_id for e in events[:30]]) == 30
    out = _applier(store, applier_parts).apply(_msgs(events))
    assert (out.applied, out.deduplicated) == (20, 30)
    with pytest.raises(ValueError, match="parallel"):
        store.put_marks([1], ["a", "b"])


# ---------------------------------------------------------------------------------------------------------------
# ingest with a hand-written IngestFn: exactly what the store reads, calls and writes


def _user(items: list[int]) -> UserRecord:
    from features.sequence import SequenceState

    n = len(items)
    seq = SequenceState(np.array(items, np.int64), np.arange(n, dtype=np.int64), np.ones(n, np.int64),
                        np.zeros(n, np.int64))
    return UserRecord(seq, UserRecord.empty().log)


def _item(event_ids: list[str], flags: list[int], counted_ts: list[int]) -> ItemWrite:
    """One item's share of an ingest: per event its flags; the counted events' timestamps (positives)."""
    assert len(counted_ts) == sum(f & COUNTED for f in flags)
    return ItemWrite(event_ids, bytes(flags), encode_item_log(np.array(counted_ts, np.int64),
                                                              np.ones(len(counted_ts), np.uint8)))


def test_ingest_passes_fn_the_users_read_and_the_applied_events_and_reports_what_it_wrote(store):
    calls = []

    def fn(write):
        def f(states, seen):
            calls.append(({u: None if r is None else r.seq.item_ids.tolist() for u, r in states.items()}, seen))
            return write
        return f

    first = IngestWrite(users={1: _user([5, 6])}, marks={1: ["a", "b"]},
                        items={5: _item(["a"], [COUNTED | BEHAVIOR], [10])})
    res = store.ingest({1: ["a", "b", "a"]}, fn(first))  # an event id twice in the batch: read once
    assert calls[-1] == ({1: None}, set()) and res.conflicts == 0
    assert res.write.applied == 2 and res.item_log_bytes == {5: 9}
    second = IngestWrite(users={1: _user([5, 6, 7]), 2: _user([7])}, marks={1: ["c"], 2: ["d"]},
                         items={5: _item(["c", "d"], [COUNTED | BEHAVIOR, COUNTED], [20, 30]),
                                6: _item(["x"], [BEHAVIOR], [])})
    res = store.ingest({1: ["b", "c"], 2: ["d"]}, fn(second))
    assert calls[-1] == ({1: [5, 6], 2: None}, {"b"})
    assert res.write.applied == 2 and res.item_log_bytes == {5: 27}  # item 6: nothing counted, no log size
    assert store.read_user(1).seq.item_ids.tolist() == [5, 6, 7] and store.read_user(2).seq.item_ids.tolist() == [7]
    stats = store.read_item_stats(np.array([5, 6, 7], np.int64))
    assert stats.total_cnt.tolist() == [3, 0, 0] and stats.ts_ms.tolist() == [10, 20, 30]
    assert dict(zip(*(a.tolist() for a in store.top_items(10)))) == {5: 2.0, 6: 1.0}  # behaviors only
    store.ingest({1: ["a", "c", "z"]}, fn(IngestWrite()))  # writes nothing
    assert calls[-1] == ({1: [5, 6, 7]}, {"a", "c"})


def test_ingest_gives_up_after_max_retries_conflicts_and_writes_nothing_of_fn(store):
    from serving.errors import StateUnavailable

    meddler = _another_connection(store)
    calls = []

    def fn(states, seen):  # every time: someone else writes the user between our read and our write
        calls.append(1)
        meddler.put_users({1: _user([len(calls)])})
        return IngestWrite(users={1: _user([99])}, marks={1: ["a"]})

    with pytest.raises(StateUnavailable, match="4 conflicting writes in a row"):
        store.ingest({1: ["a"]}, fn, max_retries=3)
    assert len(calls) == 4 and store.read_user(1).seq.item_ids.tolist() == [4]
    assert store.ingest({1: ["a"]}, lambda states, seen: IngestWrite()).conflicts == 0
    seen = []
    store.ingest({1: ["a"]}, lambda states, s: seen.append(s) or IngestWrite())
    assert seen == [set()]  # the event was never marked applied


def test_users_and_dedupe_marks_expire_after_their_ttls(make_store):
    ttl = 3  # seconds; a loaded machine can take over a second between two calls, so not 1
    store = make_store(user_ttl_s=ttl, dedupe_ttl_s=ttl)
    seen = []

    def fn(states, s):
        seen.append(s)
        return IngestWrite(users={1: _user([3])}, marks={1: ["a"]})

    t0 = time.monotonic()
    store.ingest({1: ["a"]}, fn)
    store.put_users({2: _user([4])})
    store.ingest({1: ["a"]}, fn)
    last_write = time.monotonic()
    present = store.read_user(2) is not None
    if time.monotonic() - t0 < ttl - 0.5:  # still inside both TTLs (a stalled machine may not be: expiry is below)
        assert seen[-1] == {"a"} and present
    time.sleep(max(0.0, last_write + ttl + 0.3 - time.monotonic()))
    assert store.read_user(1) is None and store.read_user(2) is None
    store.ingest({1: ["a"]}, fn)
    assert seen[-1] == set()  # older than the dedupe TTL: applied again


# ---------------------------------------------------------------------------------------------------------------
# bulk loads, pruning, popularity


def test_unknown_users_and_items_read_as_empty(store):
    assert store.read_user(404) is None
    stats = store.read_item_stats(np.array([1, 2], np.int64))
    assert stats.ts_ms.size == 0 and stats.total_cnt.tolist() == [0, 0] and stats.total_pos.tolist() == [0, 0]
    assert store.top_items(5)[0].size == 0 and store.get_meta() == {} and store.get_epoch() is None
    assert store.partition_epochs(["t:0"]) == {} and store.applied_offsets(["t:0"]) == {}


def test_bulk_loads_overwrite_users_and_logs_and_add_to_popularity(store):
    store.put_users({1: _user([1, 2]), 2: _user([3])})
    store.put_users({1: _user([9])})
    assert store.read_user(1).seq.item_ids.tolist() == [9] and store.read_user(2).seq.item_ids.tolist() == [3]
    store.put_item_logs({7: encode_item_log(np.array([1, 2]), np.array([1, 0]))})
    store.put_item_logs({7: encode_item_log(np.array([5]), np.array([1]))})
    stats = store.read_item_stats(np.array([7], np.int64))
    assert stats.ts_ms.tolist() == [5] and (stats.total_cnt[0], stats.total_pos[0]) == (1, 1)
    store.add_popularity({7: 2.0, 8: 0.0})
    store.add_popularity({7: 1.5})
    assert [a.tolist() for a in store.top_items(10)] == [[7], [3.5]]  # a zero count adds no member
    store.set_meta({"source": "a", "events": "1"})
    store.set_meta({"events": "2"})
    assert store.get_meta() == {"source": "a", "events": "2"}


def test_pruning_folds_old_item_records_and_keeps_the_totals(store):
    logs = {i: encode_item_log(np.array([1, 2, 40 * DAY, 41 * DAY], np.int64), np.array([1, 0, 1, 1], np.uint8))
            for i in range(1, 20)}
    store.put_item_logs(logs)
    ids = np.arange(1, 20)
    before = store.read_item_stats(ids)
    assert store.prune_item_logs(ids.tolist(), 35 * DAY) == 2 * 19
    after = store.read_item_stats(ids)
    assert after.total_cnt.tolist() == before.total_cnt.tolist() == [4] * 19 and len(after.ts_ms) == 2 * 19
    assert store.prune_item_logs(ids.tolist(), 35 * DAY) == 0


@pytest.mark.parametrize("groups", [1, 5])
def test_top_items_merges_the_item_groups_in_popularity_order(make_store, groups):
    s = make_store(item_groups=groups)
    s.add_popularity({i: float(i % 7 + (i == 3) * 100) for i in range(1, 40)})
    ids, counts = s.top_items(10)
    assert ids[0] == 3 and counts[0] == 103 and counts.tolist() == sorted(counts.tolist(), reverse=True)
    assert ids.tolist()[1:4] == [6, 34, 27]  # count 6: ties by member descending (as strings), like ZREVRANGE


# ---------------------------------------------------------------------------------------------------------------
# what a rebuild needs (serving.rebuild)


def test_epoch_lock_offsets_and_flush_keep_what_a_rebuild_needs(store):
    assert store.get_epoch() is None and store.create_epoch("a", {"k": "v"}, replace=False)
    assert not store.create_epoch("b", {}, replace=False) and store.get_epoch() == "a"
    assert store.create_epoch("c", {"k": "w"}, replace=True) and store.get_epoch() == "c"
    assert store.get_meta()["k"] == "w"
    assert store.acquire_rebuild_lock("tok", 30) and not store.acquire_rebuild_lock("other", 30)
    assert store.set_applied_offsets({"t:0": (None, 5)}) == {}
    assert store.set_applied_offsets({"t:0": (4, 9), "t:1": (3, 4)}) == {"t:0": 5, "t:1": None}
    store.set_partition_epochs({"t:0": "c"})
    assert store.partition_epochs(["t:0", "t:1"]) == {"t:0": "c"} and store.applied_offsets(["t:0"]) == {"t:0": 5}
    store.put_users({u: UserRecord.empty() for u in range(100)})
    assert store.flush_prefix(keep=("rebuild_lock",)) >= 100 + 4
    assert store.get_epoch() is None and store.read_user(1) is None and store.get_meta() == {}
    assert store.applied_offsets(["t:0"]) == {} and store.partition_epochs(["t:0"]) == {}
    assert not store.acquire_rebuild_lock("other", 30)  # kept
    store.release_rebuild_lock("other")  # not its lock: a no-op
    assert not store.acquire_rebuild_lock("other", 30)
    store.release_rebuild_lock("tok")
    assert store.acquire_rebuild_lock("other", 30)
    assert store.ping() and store.instance_id() == store.instance_id()


def test_a_rebuild_lock_expires_after_its_ttl(store):
    assert store.acquire_rebuild_lock("a", 0.3) and not store.acquire_rebuild_lock("b", 30)
    time.sleep(0.5)
    assert store.acquire_rebuild_lock("b", 30)
    store.release_rebuild_lock("a")  # expired and taken over: not released
    assert not store.acquire_rebuild_lock("c", 30)
