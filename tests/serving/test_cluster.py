"""The online state on a real three-master Redis Cluster (tests/conftest.py `redis_cluster`): a crash between
an ingest's per-slot writes loses and double-counts nothing, and the whole server runs on it. The store's
contract on a cluster, on one Redis and in memory is tested side by side in test_store_contract.py."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis

from tests.serving.test_store_contract import _applier, _assert_state, _expected, _msgs, _stream


@pytest.fixture()
def cluster_store(redis_cluster):
    from serving.config import RedisConfig
    from serving.state.redis_store import RedisOnlineStore

    s = RedisOnlineStore(RedisConfig(url=redis_cluster.address, key_prefix=f"t{uuid.uuid4().hex[:10]}", cluster=True,
                                     item_groups=8))
    yield s
    s.flush_prefix()
    s.close()


class _DiesAfter:
    """Lets the store's first `n` pipelines of script calls through, then fails like a lost connection
    (a consumer killed between two of an ingest's per-slot writes)."""

    def __init__(self, store, n: int) -> None:
        self.store, self.n, self.inner = store, n, store._eval_all

    def __call__(self, client, calls):
        if self.n == 0:
            raise redis.ConnectionError("connection lost (test: the consumer dies here)")
        self.n -= 1
        return self.inner(client, calls)


@pytest.mark.parametrize("survives", [0, 1], ids=["before-the-items", "between-items-and-users"])
def test_a_consumer_dying_between_slot_writes_then_redelivered_applies_every_event_once(
        cluster_store, applier_parts, survives):
    from serving.errors import StateUnavailable

    events = _stream(200, users=9, items=13)
    first, rest = events[:120], events[120:]
    a = _applier(cluster_store, applier_parts)
    assert a.apply(_msgs(first)).applied == 120
    cluster_store._eval_all = _DiesAfter(cluster_store, survives)
    with pytest.raises(StateUnavailable, match="connection lost"):
        a.apply(_msgs(rest))
    del cluster_store._eval_all
    # survives=1: the failed batch's item counters landed, none of its users (so none of its events is marked)
    _, counts, _ = _expected(first + rest if survives else first, applier_parts[0])
    ids = np.array(sorted(counts), np.int64)
    assert dict(zip(ids.tolist(), cluster_store.read_item_stats(ids).total_cnt.tolist())) == dict(counts)
    seqs, _, _ = _expected(first, applier_parts[0])
    assert all(cluster_store.read_user(u).seq.item_ids.tolist() == seqs[u] for u in seqs)
    out = a.apply(_msgs(events[60:]))  # redelivered from the last commit, which is older than the batch
    assert (out.applied, out.deduplicated) == (80, 60)
    _assert_state(cluster_store, events, applier_parts[0])


def test_the_item_effect_of_an_event_is_applied_once_whatever_is_replayed(cluster_store, applier_parts):
    """Phase 1 alone, twice (two consumers racing on a rebalanced partition): item counters and popularity once."""
    from serving.errors import StateUnavailable

    events = _stream(50, users=4, items=6)
    a = _applier(cluster_store, applier_parts)
    cluster_store._eval_all = _DiesAfter(cluster_store, 1)
    for _ in range(2):
        with pytest.raises(StateUnavailable, match="connection lost"):
            a.apply(_msgs(events))
        cluster_store._eval_all.n = 1
    del cluster_store._eval_all
    assert a.apply(_msgs(events)).applied == 50
    _assert_state(cluster_store, events, applier_parts[0])


def test_server_and_consumer_on_a_redis_cluster_apply_events_that_rank_then_sees(
        make_server, redis_cluster, wait_until):
    from features.schema import Event

    h = make_server(**{"redis.url": redis_cluster.address, "redis.cluster": "true", "redis.item_groups": 8})
    assert h.app.store.cluster and h.app.store.read_user(1).seq.item_ids.size == 272  # bootstrapped across masters
    before = h.rank(1, k=5).history_length
    ts = int(h.app.store.read_user(1).seq.ts_ms[-1]) + 1000
    h.send_events([Event(f"cl-{uuid.uuid4().hex[:8]}-{i}", 1, 100 + i, ts + i, "click", 1.0) for i in range(5)])
    wait_until(lambda: h.rank(1, k=5).history_length == before + 5, what="five clicks in user 1's history")
    tail = h.app.store.read_user(1).seq.item_ids[-5:].tolist()
    assert tail == [100, 101, 102, 103, 104]
    stats = h.app.store.read_item_stats(np.array([100, 101], np.int64))
    assert stats.total_cnt.min() >= 1


@pytest.mark.parametrize("kw, message", [
    (dict(cluster_nodes=("127.0.0.1:7001",)), "redis.cluster_nodes is set but redis.cluster is false"),
    (dict(cluster=True, cluster_nodes=("nohost",)), r"redis.cluster_nodes\[0\] must look like HOST:PORT"),
    (dict(cluster=True, url="redis://127.0.0.1:7000/2"), "a Redis Cluster has only database 0"),
    (dict(cluster=True, url="unix:///tmp/r.sock"), "needs a redis:// or rediss:// url"),
    (dict(user_groups=0), r"redis.user_groups must be in \[1, 16384\]"),
    (dict(item_groups=20_000), r"redis.item_groups must be in \[1, 16384\]"),
])
def test_a_bad_cluster_config_is_refused_naming_the_key(kw, message):
    from serving.config import RedisConfig

    with pytest.raises(ValueError, match=message):
        RedisConfig(**kw)


def test_a_cluster_that_cannot_be_reached_is_state_unavailable_not_a_crash():
    from jobs.services import free_port
    from serving.config import RedisConfig
    from serving.errors import StateUnavailable
    from serving.state.redis_store import RedisOnlineStore

    store = RedisOnlineStore(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", cluster=True))  # nothing there
    assert not store.ping()
    with pytest.raises(StateUnavailable, match="redis"):
        store.read_user(1)


def test_an_empty_cluster_state_is_rebuilt_from_the_snapshot_with_its_marks(cluster_store, ml100k_dataset,
                                                                          applier_parts):
    import pyarrow.parquet as pq

    from serving.config import RebuildConfig
    from serving.metrics import ServingMetrics
    from serving.rebuild import StateRebuilder

    state, catalog, models = applier_parts
    rb = StateRebuilder(RebuildConfig(snapshot=ml100k_dataset, dedupe_marks=True), cluster_store, state, catalog,
                        models, ServingMetrics())
    rb.check()  # no epoch: this is the rebuild (lock, flush, bootstrap with marks, epoch), across the masters
    assert cluster_store.get_epoch() is not None and cluster_store.acquire_rebuild_lock("t", 5)  # released
    assert cluster_store.read_user(1).seq.item_ids.size == 272
    ev = pq.read_table(next((ml100k_dataset / "events").rglob("*.parquet")), columns=["event_id", "user_id"])
    row = ev.slice(0, 1).to_pylist()[0]
    assert cluster_store._slow.exists(cluster_store.keys.mark(row["user_id"], row["event_id"])) == 1
