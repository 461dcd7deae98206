"""Faults mid-stream against real tansu, redis-server and the gRPC server: each ends with every produced event
applied exactly once in effect and no user cold.

"Exactly once in effect" is checked on Redis itself: every event id is marked, and every user's sequence,
counters and every item's counters and popularity equal what bootstrapping all produced events at once
gives (a lost event is missing there, a double-applied one is counted twice).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.serving.conftest import Harness, serving_overrides, unique_topics

pytestmark = pytest.mark.integration

N_USERS = 12  # ~1.3k ML-100K events: enough for many batches, small enough to stay fast


def _events(dataset: Path, n_users: int = N_USERS) -> pa.Table:
    """The events of `n_users` mid-sized users, in the order a replay produces them: (ts_ms, event_id)."""
    from features.datasets.common import read_table

    t = read_table(dataset, "events")
    uid, cnt = np.unique(t.column("user_id").to_numpy(), return_counts=True)
    users = uid[(cnt >= 60) & (cnt <= 160)][:n_users]
    t = t.filter(pc.is_in(t.column("user_id"), value_set=pa.array(users)))
    return t.take(pc.sort_indices(t, sort_keys=[("ts_ms", "ascending"), ("event_id", "ascending")]))


def _split(t: pa.Table, *fractions: float) -> list[pa.Table]:
    """Consecutive slices of `t` cut at these fractions of its rows."""
    cuts = [0, *(int(t.num_rows * f) for f in fractions), t.num_rows]
    return [t.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]


def _write_dataset(t: pa.Table, out: Path, offsets: dict[int, int] | None = None, topic: str = "") -> Path:
    (out / "events").mkdir(parents=True)
    pq.write_table(t, out / "events" / "part-0.parquet")
    if offsets is not None:
        (out / "kafka_offsets.json").write_text(json.dumps({"topic": topic, "offsets": offsets}))
    return out


def _produce(bootstrap: str, topic: str, t: pa.Table) -> dict[int, int]:
    """Produces the events keyed by user (each user's events in order on one partition); returns, per
    partition, the offset after the last one written."""
    from kafka import KafkaProducer

    from features.messages import encode_event, event_key
    from features.schema import Event

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    futs = []
    for row in t.to_pylist():
        e = Event.from_dict(row)
        futs.append(p.send(topic, key=event_key(e), value=encode_event(e)))
    p.flush()
    ends: dict[int, int] = {}
    for f in futs:
        md = f.get(timeout=10)
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    p.close(timeout=5)
    return ends


def _marked(store, t: pa.Table) -> int:
    keys = [store.keys.mark(u, e) for u, e in zip(t.column("user_id").to_pylist(), t.column("event_id").to_pylist())]
    r = store._slow
    return sum(r.exists(*keys[i:i + 500]) for i in range(0, len(keys), 500))


def _assert_exactly_once(store, produced: pa.Table, state, catalog, tmp: Path) -> None:
    """Redis equals a bootstrap of every produced event: nothing lost, nothing applied twice."""
    from serving.bootstrap import build_records

    assert _marked(store, produced) == produced.num_rows
    ref, _, pop, _ = build_records(_write_dataset(produced, tmp / f"ref-{uuid.uuid4().hex[:6]}"), state, catalog)
    for uid, want in ref.items():
        got = store.read_user(uid)
        assert got is not None, f"user {uid} is cold"
        assert sorted(zip(got.seq.ts_ms.tolist(), got.seq.item_ids.tolist(), got.seq.actions.tolist())) == sorted(
            zip(want.seq.ts_ms.tolist(), want.seq.item_ids.tolist(), want.seq.actions.tolist())), f"user {uid} sequence"
        assert (got.log.total_cnt, got.log.total_pos) == (want.log.total_cnt, want.log.total_pos), f"user {uid} counters"
    counted = set(state.stats.counted_event_types())
    et = produced.column("event_type").to_pylist()
    want_items = Counter(i for i, e in zip(produced.column("item_id").to_pylist(), et) if e in counted)
    ids = np.array(sorted(want_items), np.int64)
    stats = store.read_item_stats(ids)
    assert dict(zip(ids.tolist(), stats.total_cnt.tolist())) == dict(want_items)
    top_ids, top_counts = store.top_items(100_000)
    assert dict(zip(top_ids.tolist(), top_counts.tolist())) == pop


def _no_user_cold(h: Harness, users) -> None:
    for u in users:
        r = h.rank(int(u), k=5)
        assert r.fallback_reason == "" and r.history_length > 0 and len(r.items) == 5, (u, r.fallback_reason)


def _config(services, topics, prefix: str, bundle: Path, **extra):
    from serving.app import load_serving_config

    ov = {"models.initial_bundle": str(bundle), "rebuild.check_interval_s": 0.2, "kafka.consume_items": False,
          "kafka.consume_models": False, "kafka.max_poll_records": 100, **extra}
    return load_serving_config(None, serving_overrides(services, topics, prefix, **ov), env={})


def _topics(services):
    from jobs.services import create_topics

    topics = unique_topics()
    create_topics(services.kafka.address, {topics.events: 2, topics.items: 1, topics.models: 1, topics.dead_letter: 1})
    return topics


def test_redis_restart_without_persistence_is_rebuilt_from_the_snapshot_and_the_stream(
        services, model_bundles, catalog, ml100k_dataset, tmp_path, wait_until):
    from jobs.services import start_redis, stop_pid
    from serving.app import ServingApp

    ev = _events(ml100k_dataset)
    n = ev.num_rows
    a1, a2, b1, b2 = _split(ev, 0.3, 0.6, 0.8)
    topics = _topics(services)
    offsets = _produce(services.kafka.address, topics.events, a1)
    _produce(services.kafka.address, topics.events, a2)
    # the snapshot holds A1 + A2 but its offsets only cover A1: A2 is delivered again and must be a no-op
    snap = _write_dataset(pa.concat_tables([a1, a2]), tmp_path / "snapshot", offsets, topics.events)
    prefix = f"f{uuid.uuid4().hex[:10]}"
    cfg = _config(services, topics, prefix, model_bundles["v1"][0], **{"rebuild.snapshot": str(snap)})
    h = Harness(ServingApp(cfg, catalog).start(wait_for_partitions_s=15.0), topics, services.kafka.address)
    try:
        assert h.metric("cascade_state_rebuilds_total", {"outcome": "done"}) == 1  # Redis was empty at start
        wait_until(lambda: h.metric("cascade_events_deduplicated_total") == a2.num_rows, timeout_s=60,
                   what="the snapshot's events delivered again skipped")
        _produce(services.kafka.address, topics.events, b1)
        wait_until(lambda: _marked(h.app.store, b1) == b1.num_rows, timeout_s=60, what="B1 applied")
        # the marks land inside the write, the counters after it returns: wait for them, then exactly B1
        wait_until(lambda: h.metric("cascade_events_applied_total") >= b1.num_rows, timeout_s=10,
                   what="B1 counted applied")
        assert h.metric("cascade_events_applied_total") == b1.num_rows

        port = services.redis.port  # Redis restarts empty on the same port: no RDB, no AOF
        stop_pid(services.redis.pid)
        services.redis = start_redis(Path(services.redis.log).parent, port=port, detach=False)
        _produce(services.kafka.address, topics.events, b2)  # while the server finds out
        wait_until(lambda: h.metric("cascade_state_rebuilds_total", {"outcome": "done"}) == 2, timeout_s=60,
                   what="the server rebuilding the state")
        wait_until(lambda: _marked(h.app.store, ev) == n, timeout_s=90, what="every event applied after the rebuild")
        assert h.metric("cascade_consumer_rewinds_total") >= 2  # both partitions, at start and after the rebuild
        _assert_exactly_once(h.app.store, ev, cfg.state, catalog, tmp_path)
        _no_user_cold(h, np.unique(ev.column("user_id").to_numpy()))
        assert h.metric("cascade_state_rebuilding") == 0
    finally:
        h.close()


def test_consumer_group_rebalance_mid_stream_applies_every_event_once(
        services, model_bundles, catalog, ml100k_dataset, tmp_path, wait_until):
    from serving.app import ServingApp

    ev = _events(ml100k_dataset)
    n = ev.num_rows
    a, *b_parts = _split(ev, 0.34, 0.56, 0.78)
    topics = _topics(services)
    snap = _write_dataset(a, tmp_path / "snapshot", _produce(services.kafka.address, topics.events, a), topics.events)
    prefix = f"f{uuid.uuid4().hex[:10]}"
    cfg = _config(services, topics, prefix, model_bundles["v1"][0], **{"rebuild.snapshot": str(snap)})
    h1 = Harness(ServingApp(cfg, catalog).start(wait_for_partitions_s=15.0), topics, services.kafka.address)
    h2 = None
    try:
        _produce(services.kafka.address, topics.events, b_parts[0])
        h2 = Harness(ServingApp(cfg, catalog).start(), topics, services.kafka.address)  # joins mid-stream: a rebalance
        events2 = next(c for c in h2.app.consumers if c.name == "events-consumer")
        wait_until(events2.ready.is_set, timeout_s=30, what="the second server taking partitions")
        _produce(services.kafka.address, topics.events, b_parts[1])
        wait_until(lambda: _marked(h1.app.store, b_parts[1]) == b_parts[1].num_rows, timeout_s=60,
                   what="the second part applied by the two servers")
        assert events2.totals.applied > 0  # the second server did own partitions and apply events
        _produce(services.kafka.address, topics.events, b_parts[2])
        h2.close()  # leaves mid-stream: another rebalance
        h2 = None
        wait_until(lambda: _marked(h1.app.store, ev) == n, timeout_s=90, what="every event applied")
        assert h1.metric("cascade_state_rebuilds_total", {"outcome": "done"}) == 1  # only the empty Redis at start
        _assert_exactly_once(h1.app.store, ev, cfg.state, catalog, tmp_path)
        _no_user_cold(h1, np.unique(ev.column("user_id").to_numpy()))
        assert all(c.is_alive() for c in h1.app.consumers)
    finally:
        if h2 is not None:
            h2.close()
        h1.close()


def _serve(services, topics, prefix: str, bundle: Path, snapshot: Path, catalog_dir: Path, tmp_path: Path,
           name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    from jobs.services import free_port

    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"grpc:\n  address: 127.0.0.1:{free_port()}\nmetrics:\n  address: 127.0.0.1:{free_port()}\n"
        f"redis:\n  key_prefix: {prefix}\nmodels:\n  allow_any_root: true\n"
        f"rebuild:\n  snapshot: {snapshot}\n  check_interval_s: 0.2\n"
        f"kafka:\n  topics:\n    events: {topics.events}\n    items: {topics.items}\n    models: {topics.models}\n"
        f"    dead_letter: {topics.dead_letter}\n  events_group: g-{prefix}\n  session_timeout_ms: 2000\n"
        f"  heartbeat_interval_ms: 200\n  max_poll_records: 50\n  consume_items: false\n  consume_models: false\n")
    env = {**os.environ, "CASCADE_REDIS_URL": services.redis.address, "CASCADE_KAFKA_BOOTSTRAP": services.kafka.address}
    log = tmp_path / f"{name}.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--config", str(cfg), "--model-bundle",
                                 str(bundle), "--catalog", str(catalog_dir), *extra], stdout=lf, stderr=subprocess.STDOUT,
                                env=env, cwd=Path(__file__).resolve().parents[2])
    return proc, log


def test_kill_9_mid_stream_then_restart_applies_every_event_once(
        services, model_bundles, catalog, ml100k_dataset, tmp_path, wait_until):
    from serving.app import load_serving_config
    from serving.state.redis_store import RedisOnlineStore

    ev = _events(ml100k_dataset)
    n = ev.num_rows
    a, b1, b2 = _split(ev, 0.34, 0.67)
    topics = _topics(services)
    _produce(services.kafka.address, topics.events, a)
    snap = _write_dataset(a, tmp_path / "snapshot")  # no offsets: replayed from the start, deduped by the marks
    prefix = f"f{uuid.uuid4().hex[:10]}"
    store = RedisOnlineStore(load_serving_config(None, [f"redis.url={services.redis.address}",
                                                        f"redis.key_prefix={prefix}"], env={}).redis)
    procs = []
    try:
        proc, log = _serve(services, topics, prefix, model_bundles["v1"][0], snap, ml100k_dataset, tmp_path, "first")
        procs.append(proc)

        def alive(p=proc, lg=log):
            assert p.poll() is None, lg.read_text()[-3000:]
            return True

        wait_until(lambda: alive() and store.get_epoch() is not None and _marked(store, a) == a.num_rows,
                   timeout_s=180, interval_s=0.2, what="the first server rebuilding the empty state")
        _produce(services.kafka.address, topics.events, b1)
        wait_until(lambda: alive() and _marked(store, b1) > 0, timeout_s=60, interval_s=0.01,
                   what="the first server applying the stream")
        proc.send_signal(signal.SIGKILL)  # mid-stream: batches of 50, some applied, maybe one uncommitted
        proc.wait(timeout=30)
        applied_before = _marked(store, b1)
        _produce(services.kafka.address, topics.events, b2)  # while no server runs

        # restarted as the docs start it, with --bootstrap: the state exists, so it must not be reloaded over
        # what the stream applied (that would drop events whose dedupe marks remain)
        proc, log = _serve(services, topics, prefix, model_bundles["v1"][0], snap, ml100k_dataset, tmp_path, "second",
                           "--bootstrap", str(snap))
        procs.append(proc)
        wait_until(lambda: alive(proc, log) and _marked(store, ev) == n, timeout_s=180, interval_s=0.2,
                   what="the restarted server applying the rest")
        cfg = load_serving_config(None, [], env={})
        _assert_exactly_once(store, ev, cfg.state, catalog, tmp_path)
        assert "online state rebuilt" in (tmp_path / "first.log").read_text()
        assert "online state rebuilt" not in log.read_text()  # the epoch survived the kill: no rebuild
        assert "bootstrap    skipped: the online state" in log.read_text()
        assert 0 < applied_before  # the kill did land after the stream started
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        store.close()


def test_while_another_replica_rebuilds_nothing_is_written_and_full_health_says_so(
        services, model_bundles, catalog, ml100k_dataset, tmp_path, wait_until):
    from serving.app import ServingApp

    ev = _events(ml100k_dataset, n_users=4)
    a, b = _split(ev, 0.5)
    topics = _topics(services)
    _produce(services.kafka.address, topics.events, a)
    prefix = f"f{uuid.uuid4().hex[:10]}"
    cfg = _config(services, topics, prefix, model_bundles["v1"][0])  # no snapshot: rebuilt from the topic alone
    h = Harness(ServingApp(cfg, catalog).start(wait_for_partitions_s=15.0), topics, services.kafka.address)
    try:
        store = h.app.store
        wait_until(lambda: _marked(store, a) == a.num_rows, timeout_s=60, what="the topic applied")
        assert store.acquire_rebuild_lock("another-replica", 120)
        store.flush_prefix(keep=("rebuild_lock",))  # Redis lost the state; another replica is rebuilding it
        wait_until(lambda: h.metric("cascade_state_rebuilding") == 1, timeout_s=30, what="the loss noticed")
        _produce(services.kafka.address, topics.events, b)
        assert "state: being rebuilt after Redis came back empty" in (h.app.health.check_now() and h.app.health.problems)
        assert _marked(store, ev) == 0 and store.read_user(int(a.column("user_id")[0].as_py())) is None

        store.release_rebuild_lock("another-replica")  # that replica died: this one takes over
        wait_until(lambda: _marked(store, ev) == ev.num_rows, timeout_s=60, what="every event applied after the rebuild")
        _assert_exactly_once(store, ev, cfg.state, catalog, tmp_path)
        wait_until(lambda: h.app.health.check_now() and h.app.health.problems == [], timeout_s=10, what="full health")
    finally:
        h.close()


def _features_dir(root: Path, dataset: Path | str, end_ms: int) -> Path:
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"input": {"path": str(dataset)},
                                                    "time_range": {"snapshot_end_ms": end_ms}}))
    return root


def test_the_snapshot_is_the_published_versions_features_dataset(tmp_path):
    from serving.rebuild import resolve_snapshot

    t = pa.table({"event_id": ["e1"], "user_id": [1], "item_id": [2], "ts_ms": [3]})
    data = _write_dataset(t, tmp_path / "data", {0: 7, 1: 9}, "events-x")
    fdir = _features_dir(tmp_path / "art" / "versions" / "v2" / "features", data, 1234)
    (tmp_path / "art" / "versions" / "v2" / "manifest.json").write_text(
        json.dumps({"stages": {"features": {"dir": str(fdir)}}}))
    (tmp_path / "art" / "published.json").write_text(json.dumps({"version": "v2"}))

    s = resolve_snapshot(tmp_path / "art")
    assert (s.dataset, s.as_of_ms, s.topic, s.offsets) == (data, 1234, "events-x", {0: 7, 1: 9})
    assert "published version v2" in s.described
    assert resolve_snapshot(fdir).dataset == data
    plain = resolve_snapshot(data)
    assert (plain.as_of_ms, plain.offsets) == (None, {0: 7, 1: 9})


def test_a_bad_snapshot_is_refused_naming_what_is_wrong(tmp_path):
    from serving.rebuild import resolve_snapshot

    with pytest.raises(FileNotFoundError, match="neither a pipeline artifacts directory"):
        resolve_snapshot(tmp_path)
    (tmp_path / "published.json").write_text(json.dumps({"version": "v9"}))
    with pytest.raises(FileNotFoundError, match="published version v9 has no"):
        resolve_snapshot(tmp_path)
    data = _write_dataset(pa.table({"event_id": ["e1"]}), tmp_path / "data")
    (data / "kafka_offsets.json").write_text('{"offsets": [1, 2]}')
    with pytest.raises(ValueError, match="kafka_offsets.json: expected"):
        resolve_snapshot(data)
    with pytest.raises(ValueError, match="not a local dataset directory"):
        resolve_snapshot(_features_dir(tmp_path / "f", "s3://bucket/data", 1))


def test_a_state_written_before_epochs_existed_is_adopted_not_rebuilt(
        services, model_bundles, catalog, ml100k_dataset, tmp_path, wait_until):
    from serving.app import ServingApp
    from serving.bootstrap import bootstrap_dataset
    from serving.state.redis_store import RedisOnlineStore

    ev = _events(ml100k_dataset, n_users=3)
    a, b = _split(ev, 0.5)
    topics = _topics(services)
    cfg = _config(services, topics, f"f{uuid.uuid4().hex[:10]}", model_bundles["v1"][0])
    old = RedisOnlineStore(cfg.redis)  # an upgrade: the state is there, its epoch key is not
    bootstrap_dataset(old, _write_dataset(a, tmp_path / "a"), cfg.state, catalog, marks=True, set_epoch=False)
    old.close()
    _produce(services.kafka.address, topics.events, ev)  # A again (deduped by its marks) and B
    h = Harness(ServingApp(cfg, catalog).start(wait_for_partitions_s=15.0), topics, services.kafka.address)
    try:
        assert h.app.store.get_epoch() is not None and h.metric("cascade_state_rebuilds_total", {"outcome": "done"}) == 0
        wait_until(lambda: _marked(h.app.store, b) == b.num_rows, timeout_s=60, what="B applied")
        wait_until(lambda: h.metric("cascade_events_deduplicated_total") >= a.num_rows, timeout_s=10,
                   what="A counted deduplicated")  # counted after the write that marked B returned
        assert h.metric("cascade_events_deduplicated_total") == a.num_rows
        _assert_exactly_once(h.app.store, ev, cfg.state, catalog, tmp_path)
    finally:
        h.close()


def test_a_server_starting_on_an_emptied_redis_rebuilds_and_rewinds_past_its_groups_commits(
        services, model_bundles, catalog, ml100k_dataset, tmp_path, wait_until):
    from jobs.services import start_redis, stop_pid
    from serving.app import ServingApp

    ev = _events(ml100k_dataset, n_users=4)
    a, b1, b2 = _split(ev, 0.4, 0.7)
    topics = _topics(services)
    snap = _write_dataset(a, tmp_path / "snapshot", _produce(services.kafka.address, topics.events, a), topics.events)
    cfg = _config(services, topics, f"f{uuid.uuid4().hex[:10]}", model_bundles["v1"][0],
                  **{"rebuild.snapshot": str(snap)})
    h = Harness(ServingApp(cfg, catalog).start(wait_for_partitions_s=15.0), topics, services.kafka.address)
    _produce(services.kafka.address, topics.events, b1)
    wait_until(lambda: _marked(h.app.store, b1) == b1.num_rows, timeout_s=60, what="B1 applied and committed")
    h.close()  # the group's commits are now past B1; then Redis loses everything while no server runs
    port = services.redis.port
    stop_pid(services.redis.pid)
    services.redis = start_redis(Path(services.redis.log).parent, port=port, detach=False)
    _produce(services.kafka.address, topics.events, b2)
    h = Harness(ServingApp(cfg, catalog).start(wait_for_partitions_s=15.0), topics, services.kafka.address)
    try:
        assert h.metric("cascade_state_rebuilds_total", {"outcome": "done"}) == 1
        wait_until(lambda: _marked(h.app.store, ev) == ev.num_rows, timeout_s=60, what="B1 again and B2 applied")
        _assert_exactly_once(h.app.store, ev, cfg.state, catalog, tmp_path)
    finally:
        h.close()


def test_an_unreadable_snapshot_stops_the_start_naming_it(services, model_bundles, catalog, tmp_path):
    from serving.app import ServingApp

    topics = _topics(services)
    cfg = _config(services, topics, f"f{uuid.uuid4().hex[:10]}", model_bundles["v1"][0],
                  **{"rebuild.snapshot": str(tmp_path / "missing")})
    app = ServingApp(cfg, catalog)
    try:
        with pytest.raises(FileNotFoundError, match=r"rebuild.snapshot .*missing is neither"):
            app.start()
        assert app.metrics.registry.get_sample_value("cascade_state_rebuilds_total", {"outcome": "failed"}) == 1
        assert app.store.get_epoch() is None  # nothing half-built is passed off as a state
        assert app.store.acquire_rebuild_lock("next", 5)  # and the lock was released
    finally:
        app.stop(grace_s=0.1)


def test_redis_restarted_from_an_older_snapshot_resumes_where_its_state_ends(
        services, model_bundles, catalog, ml100k_dataset, tmp_path, wait_until):
    """Redis comes back with its epoch but without its last writes (an RDB older than the crash, or a lagging
    replica promoted): the consumers go back to where the restored state recorded applying events."""
    from jobs.services import start_redis
    from serving.app import ServingApp

    ev = _events(ml100k_dataset, n_users=4)
    a, b1, b2, b3 = _split(ev, 0.3, 0.55, 0.8)
    topics = _topics(services)
    snap = _write_dataset(a, tmp_path / "snapshot", _produce(services.kafka.address, topics.events, a), topics.events)
    cfg = _config(services, topics, f"f{uuid.uuid4().hex[:10]}", model_bundles["v1"][0],
                  **{"rebuild.snapshot": str(snap)})
    h = Harness(ServingApp(cfg, catalog).start(wait_for_partitions_s=15.0), topics, services.kafka.address)
    rdb = Path(services.redis.log).parent / "dump.rdb"
    try:
        store = h.app.store
        ends = _produce(services.kafka.address, topics.events, pa.concat_tables([a, b1]))  # A again: deduped
        keys = [f"{topics.events}:{p}" for p in sorted(ends)]
        wait_until(lambda: _marked(store, b1) == b1.num_rows and store.applied_offsets(keys) ==
                   {f"{topics.events}:{p}": o for p, o in ends.items()}, timeout_s=60, what="B1 applied and recorded")
        store._slow.save()  # the snapshot Redis will restart from
        _produce(services.kafka.address, topics.events, b2)
        wait_until(lambda: _marked(store, b2) == b2.num_rows, timeout_s=60, what="B2 applied")
        port = services.redis.port
        os.kill(services.redis.pid, signal.SIGKILL)  # B2 was written only after the RDB
        os.waitpid(services.redis.pid, 0)
        services.redis = start_redis(rdb.parent, port=port, detach=False)
        assert _marked(store, b2) == 0 and store.get_epoch() is not None  # the epoch survived, B2 did not
        _produce(services.kafka.address, topics.events, b3)
        wait_until(lambda: _marked(store, ev) == ev.num_rows, timeout_s=60, what="B2 applied again, and B3")
        assert h.metric("cascade_state_rebuilds_total", {"outcome": "done"}) == 1  # only at start: not empty now
        _assert_exactly_once(store, pa.concat_tables([a, b1, b2, b3]), cfg.state, catalog, tmp_path)
    finally:
        h.close()
        rdb.unlink(missing_ok=True)  # later restarts in this module start empty


class _FakeConsumer:
    """The few KafkaConsumer calls EpochPositions makes (a unit test of its logic; the tests above use tansu)."""

    def __init__(self, tps, refuse: dict[int, int] | None = None) -> None:
        self.tps, self.refuse, self.seeks, self.commits = set(tps), dict(refuse or {}), [], []

    def assignment(self):
        return set(self.tps)

    def seek(self, tp, off):
        self.seeks.append((tp.partition, off))

    def commit(self, offsets):
        from kafka.errors import CommitFailedError

        for tp in offsets:
            if self.refuse.get(tp.partition):  # this many commits of that partition are refused
                self.refuse[tp.partition] -= 1
                raise CommitFailedError("rebalancing")
        self.commits.append({tp.partition: om.offset for tp, om in offsets.items()})

    def beginning_offsets(self, tps):
        return {tp: 0 for tp in tps}

    def position(self, tp, timeout_ms=None):
        return 50


def _positions(epoch, store):
    from types import SimpleNamespace

    from serving.metrics import ServingMetrics
    from serving.rebuild import EpochPositions

    rebuilder = SimpleNamespace(current=epoch, rebuilding=False, resyncs=0, store=store)
    return EpochPositions(rebuilder, SimpleNamespace(epoch=None), ServingMetrics()), rebuilder


def test_a_rewind_whose_commit_is_refused_applies_nothing_of_that_partition_until_it_succeeds(memory_store):
    from types import SimpleNamespace

    from kafka.structs import TopicPartition

    from serving.rebuild import Epoch

    tp0, tp1 = TopicPartition("ev", 0), TopicPartition("ev", 1)
    store = memory_store
    pos, _ = _positions(Epoch("E2", rewind=True, topic="ev", offsets={0: 7}), store)
    c = _FakeConsumer([tp0, tp1], refuse={0: 1})
    rec = [SimpleNamespace(offset=40)]
    out = pos.after_poll(c, {tp0: rec, tp1: rec})
    assert out == {}  # p0's commit refused: not recorded, records dropped
    assert store.partition_epochs(["ev:0", "ev:1"]) == {"ev:1": "E2"}
    assert (0, 7) in c.seeks and (1, 0) in c.seeks and pos.applier.epoch == "E2"
    out = pos.after_poll(c, {tp0: rec})  # the next poll tries p0 again before applying anything of it
    assert out == {} and store.partition_epochs(["ev:0", "ev:1"]) == {"ev:0": "E2", "ev:1": "E2"}
    assert c.commits[-1] == {0: 7}
    assert pos.after_poll(c, {tp0: rec}) == {tp0: rec}  # positioned: its records apply


def test_a_redis_that_lost_its_last_applied_record_sends_the_partition_back_there(memory_store):
    from types import SimpleNamespace

    from kafka.structs import TopicPartition

    from serving.rebuild import Epoch

    tp = TopicPartition("ev", 0)
    store = memory_store
    store.set_partition_epochs({"ev:0": "E1"})
    pos, rebuilder = _positions(Epoch("E1", rewind=True, topic="ev"), store)
    c = _FakeConsumer([tp])
    rec = [SimpleNamespace(offset=50)]
    assert pos.after_poll(c, {tp: rec}) == {tp: rec}
    pos.after_commit({tp: 51})
    pos.after_commit({tp: 60})
    assert store.applied_offsets(["ev:0"]) == {"ev:0": 60}
    store.set_applied_offsets({"ev:0": (60, 51)})  # Redis restarted from an older snapshot
    pos.after_commit({tp: 70})  # noticed at the next commit, not overwritten
    assert store.applied_offsets(["ev:0"]) == {"ev:0": 51}
    assert pos.after_poll(c, {tp: [SimpleNamespace(offset=70)]}) == {} and c.seeks[-1] == (0, 51)
    assert c.commits[-1] == {0: 51}
    rebuilder.resyncs += 1  # a new Redis instance: every partition is checked against its record
    store.set_applied_offsets({"ev:0": (51, 45)})
    assert pos.after_poll(c, {}) == {} and c.seeks[-1] == (0, 45)
