"""The consumer's cache of the user records it wrote (serving/state/user_cache.py): the LRU itself, and
`RedisOnlineStore.ingest` over it on a real redis-server and a real three-master Redis Cluster: a user it
wrote is not read again, and whatever else writes the user meanwhile (another consumer, a bulk load, a flush,
an expiry) costs a re-read, never a wrong state. The property: any interleaving of two cached writers and
those other writes leaves exactly the state one uncached writer leaves, byte for byte, SDIM sums included."""
from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.schema import Event
from features.sequence import SequenceState
from serving.state.codec import BucketSums, CounterLog, UserRecord, encode_user
from serving.state.user_cache import ENTRY_OVERHEAD, UserCache, own_arrays
from tests.serving.conftest import applier as _applier, kafka_records as _msgs


def _rec(n: int) -> UserRecord:
    seq = SequenceState(*(np.arange(n, dtype=np.int64) for _ in range(4)))
    return UserRecord(seq, CounterLog.empty())


# ---------------------------------------------------------------------------------------------- the LRU


def test_the_least_recently_used_entries_leave_first_within_the_byte_bound():
    per = 100 + 7 * 10 + ENTRY_OVERHEAD
    cache = UserCache(3 * per)
    cache.put((u, bytes([u]) * 8, _rec(10), 100) for u in (1, 2, 3))
    assert len(cache) == 3 and cache.bytes == 3 * per
    assert set(cache.lookup([1, 9])) == {1}  # 1 is now the most recent; 9 was never here
    cache.put([(4, b"4" * 8, _rec(10), 100)])
    assert set(cache.lookup([1, 2, 3, 4])) == {1, 3, 4}  # 2 was the least recently used
    cache.put([(3, b"x" * 8, _rec(10), 100)])  # a user written again: replaced, not counted twice
    assert cache.lookup([3])[3][0] == b"x" * 8 and cache.bytes == 3 * per
    assert cache.drop([3, 7]) == 1 and cache.bytes == 2 * per and set(cache.lookup([1, 3, 4])) == {1, 4}
    cache.put([(5, b"5" * 8, _rec(10), 10 * per)])  # larger than the whole cache: not kept
    assert 5 not in cache.lookup([5]) and cache.bytes == 2 * per
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        UserCache(0)


def test_a_cached_record_does_not_keep_a_whole_batch_of_arrays_alive():
    batch_sums = np.ones((50, 2, 4, 8), np.float32)  # a batch's stacked SDIM sums; one user's is a view of it
    batch_counts = np.ones((500, 2, 4), np.int32)
    batch_sigs = np.arange(5000, dtype=np.int64)
    rec = UserRecord(_rec(10).seq, CounterLog.empty(), sigs=batch_sigs[10:20], sig_spec=3,
                     sdim=BucketSums(batch_sums[7], batch_counts[7], 3))
    own = own_arrays(rec)
    assert own.sdim.sums.base is None and own.sdim.counts.base is None and own.sigs.base is None
    assert encode_user(own, gen=bytes(8)) == encode_user(rec, gen=bytes(8))  # the same values
    small = UserRecord(_rec(3).seq, CounterLog.empty(), sdim=BucketSums(np.ones((2, 4, 8), np.float32),
                                                                        np.ones((2, 4), np.int32), 3))
    assert own_arrays(small) is small  # nothing to copy: the same object


def test_the_cache_size_is_configured_and_zero_turns_it_off():
    from serving.config import RedisConfig
    from serving.state.redis_store import RedisOnlineStore

    assert RedisOnlineStore(RedisConfig()).user_cache.max_bytes == 256 << 20
    assert RedisOnlineStore(RedisConfig(ingest_cache_mb=0)).user_cache is None
    with pytest.raises(ValueError, match="ingest_cache_mb"):
        RedisConfig(ingest_cache_mb=-1)


# ---------------------------------------------------------------------------------------------- on Redis


@pytest.fixture(params=["redis", "redis_cluster"])
def make_store(request):
    """make_store(prefix=None, **cfg) -> a Redis store (another on the same prefix: another consumer process)."""
    from serving.config import RedisConfig
    from serving.state.redis_store import RedisOnlineStore

    cluster = request.param == "redis_cluster"
    node = request.getfixturevalue("redis_cluster" if cluster else "_single_redis")
    made = []

    def make(prefix: str | None = None, **cfg):
        s = RedisOnlineStore(RedisConfig(url=node.address, key_prefix=prefix or f"t{uuid.uuid4().hex[:10]}",
                                         cluster=cluster, item_groups=8 if cluster else 1, **cfg))
        made.append(s)
        return s

    yield make
    if made:
        made[0].flush_prefix()
    for s in made:
        s.close()


@pytest.fixture(scope="module")
def sdim_parts(model_bundles, catalog):
    """(StateConfig, CatalogRef, ModelHolder) with a real SDIM bundle loaded: ingests keep bucket sums."""
    from features.config import load_config
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import CatalogRef

    cfg = load_config(ServingConfig, None, [])
    holder, cat = ModelHolder(), CatalogRef(catalog)
    path, checksum = model_bundles["v1"]
    bundle = ModelManager(holder, cat, cfg.state, cfg.models, ServingMetrics()).load(path, "v1", checksum)
    assert bundle.sums_window > 0
    return cfg.state, cat, holder


def _stream(n: int, users: int = 4, items: int = 30, seed: int = 0, tag: str = "e", t0: int | None = None):
    rng = np.random.default_rng(seed)
    t0 = int(time.time() * 1000) - 3_600_000 if t0 is None else t0
    types = ["click", "impression", "rating", "purchase"]
    return [Event(f"{tag}{i:05d}", int(rng.integers(1, users + 1)), int(rng.integers(1, items + 1)), t0 + i * 1000,
                  types[int(rng.integers(0, len(types)))], float(rng.integers(0, 2))) for i in range(n)]


def _stored(store, users) -> dict:
    return {u: None if (r := store.read_user(u)) is None else encode_user(r, gen=bytes(8)) for u in users}


def test_a_user_written_before_is_folded_from_the_cache_not_read(make_store, sdim_parts):
    from serving.state.codec import cas_token, decode_user

    store = make_store()
    a = _applier(store, sdim_parts)
    events = _stream(120)
    first = a.apply(_msgs(events[:60]))
    assert (first.users, first.cached_users, first.conflicts) == (4, 0, 0)
    reads = []
    inner = store._mget
    store._mget = lambda client, keys: reads.append(list(keys)) or inner(client, keys)
    try:
        second = a.apply(_msgs(events[60:]))
    finally:
        del store._mget
    assert (second.applied, second.cached_users, second.stale_cached_users, second.conflicts) == (60, 4, 0, 0)
    assert not [k for k in reads[0] if k in {store.keys.user(u) for u in range(1, 5)}]  # no user value read
    for u, (gen, rec) in store.user_cache.lookup(range(1, 5)).items():  # the cache holds what Redis holds
        blob = store._slow.get(store.keys.user(u))
        assert cas_token(blob) == gen
        assert encode_user(rec, gen=bytes(8)) == encode_user(decode_user(blob), gen=bytes(8))
        assert rec.sdim is not None
    # the same events through a writer without a cache: the same values, byte for byte
    plain = make_store(ingest_cache_mb=0)
    b = _applier(plain, sdim_parts)
    b.apply(_msgs(events[:60]))
    b.apply(_msgs(events[60:]))
    assert _stored(plain, range(1, 5)) == _stored(store, range(1, 5))
    assert b.store.user_cache is None


def test_a_user_another_writer_changed_is_read_again_and_nothing_is_lost(make_store, sdim_parts):
    store = make_store()
    other = make_store(store.cfg.key_prefix)  # another consumer process on the same state
    mine, theirs = _applier(store, sdim_parts), _applier(other, sdim_parts)
    events = _stream(90, users=3)
    mine.apply(_msgs(events[:30]))
    theirs.apply(_msgs(events[30:60]))  # (a rebalance moved the partition, then back)
    out = mine.apply(_msgs(events[60:]))
    assert out.applied == 30 and out.cached_users == 3 and out.stale_cached_users == 3 and out.conflicts >= 1
    want = make_store(ingest_cache_mb=0)
    _applier(want, sdim_parts).apply(_msgs(events[:30]))
    _applier(want, sdim_parts).apply(_msgs(events[30:60]))
    _applier(want, sdim_parts).apply(_msgs(events[60:]))
    assert _stored(store, range(1, 4)) == _stored(want, range(1, 4))


def test_a_flushed_or_expired_user_starts_empty_not_from_the_cache(make_store, sdim_parts):
    store = make_store(user_ttl_s=2)
    a = _applier(store, sdim_parts)
    a.apply(_msgs(_stream(40, users=2, tag="a")))
    store.flush_prefix()
    later = _stream(10, users=2, seed=1, tag="b")
    out = a.apply(_msgs(later))
    assert out.stale_cached_users == 2 and out.applied == 10
    behaviors = set(sdim_parts[0].sequence.behavior_event_types)
    for u in (1, 2):
        assert store.read_user(u).seq.item_ids.tolist() == [e.item_id for e in later
                                                            if e.user_id == u and e.event_type in behaviors]
    time.sleep(2.3)  # both users expire (user_ttl_s)
    last = _stream(6, users=2, seed=2, tag="c", t0=int(time.time() * 1000) - 60_000)
    out = a.apply(_msgs(last))
    assert out.stale_cached_users == 2
    for u in (1, 2):
        assert store.read_user(u).seq.item_ids.tolist() == [e.item_id for e in last
                                                            if e.user_id == u and e.event_type in behaviors]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["a", "b", "put", "flush"]), st.integers(1, 12)),
                      min_size=1, max_size=8),
       seed=st.integers(0, 2**16))
def test_any_interleaving_of_cached_writers_and_other_writes_equals_one_uncached_writer(make_store, sdim_parts,
                                                                                          steps, seed):
    """Writers "a" and "b" (two processes, each with its cache) apply consecutive batches of one stream;
    "put" bulk-loads a user over whatever is there, "flush" deletes the state. One writer without a cache
    doing the same writes in the same order is the reference."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    ref_prefix = f"t{uuid.uuid4().hex[:10]}"
    a_store, b_store = make_store(prefix), make_store(prefix)
    ref_store = make_store(ref_prefix, ingest_cache_mb=0)
    a, b, ref = (_applier(s, sdim_parts) for s in (a_store, b_store, ref_store))
    events = _stream(100, users=3, seed=seed)
    at = 0
    for kind, n in steps:
        if kind in ("a", "b"):
            batch = events[at:at + n]
            at += n
            if batch:
                got = (a if kind == "a" else b).apply(_msgs(batch))
                assert got.applied == ref.apply(_msgs(batch)).applied == len(batch)
        elif kind == "put":
            rec = UserRecord(_rec(n).seq, CounterLog.empty())
            a_store.put_users({1 + n % 3: rec})
            ref_store.put_users({1 + n % 3: rec})
        else:
            a_store.flush_prefix()
            ref_store.flush_prefix()
    assert _stored(a_store, range(1, 4)) == _stored(ref_store, range(1, 4))
    ids = np.arange(1, 31, dtype=np.int64)
    assert (a_store.read_item_stats(ids).total_cnt.tolist() == ref_store.read_item_stats(ids).total_cnt.tolist())
    a_store.flush_prefix()
    ref_store.flush_prefix()
