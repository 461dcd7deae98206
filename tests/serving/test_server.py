"""The gRPC server end to end: real tansu, real redis-server, real gRPC server, bundles of the real exporters
(retriever + full ranker, randomly initialised) over ML-100K's catalog and histories."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from features.schema import Event

pytestmark = pytest.mark.integration


def _state(h, user_id: int) -> bytes | None:
    return h.app.store._slow.get(h.app.store.keys.user(user_id))


def test_rank_answers_with_model_version_timings_and_health(make_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from serving.proto import ranking_pb2

    h = make_server()
    r = h.rank(1, k=10, debug=True, exclude_seen=True)
    assert r.model_version == "v1" and r.fallback_reason == ""
    assert len(r.items) == 10 and r.history_length == 272  # user 1 rated 272 movies in ML-100K
    scores = [it.score for it in r.items]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    stages = [t.stage for t in r.timings]
    assert stages[:2] == ["state_read", "user_tower"] and stages[-1] == "total"
    seen = h.app.store.read_user(1).seq.item_ids
    assert not {it.item_id for it in r.items} & set(seen.tolist())

    hs = health_pb2_grpc.HealthStub(h.channel)
    for svc in ("", "cascade.v1.Ranking"):
        assert hs.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(h.channel).get_services()
    assert {"cascade.v1.Ranking", "grpc.health.v1.Health"} <= set(services)

    info = h.stub.GetModelInfo(ranking_pb2.GetModelInfoRequest())
    assert info.model_version == "v1" and info.num_items == 1682 and info.metadata["sdim"] == "yes"
    assert h.metric("cascade_rank_requests_total", {"method": "Rank", "status": "OK"}) == 1
    assert h.metric("cascade_rank_stage_seconds_count", {"stage": "ranker"}) == 1
    assert h.metric("cascade_model_info", {"version": "v1"}) == 1


def test_unknown_user_gets_a_cold_start_answer(make_server):
    h = make_server()
    r = h.rank(10_000_000, k=5)
    assert r.fallback_reason == "cold_start" and len(r.items) == 5 and r.history_length == 0
    assert h.metric("cascade_degraded_answers_total", {"reason": "cold_start"}) == 1


@pytest.mark.parametrize("fields, message", [
    (dict(k=0), "k=0 must be in [1, 200]"),
    (dict(k=201), "k=201 must be in [1, 200]"),
    (dict(k=5, num_candidates=5000), "num_candidates=5000 must be in [0, 2000]"),
    (dict(k=50, num_candidates=10), "k=50 exceeds num_candidates=10"),
    (dict(k=5, context={f"c{i}": "x" for i in range(40)}), "context has 40 entries, at most 32"),
    (dict(k=5, context={"surface": "x" * 300}), "context['surface'] has 300 characters"),
    (dict(k=5, candidate_item_ids=[1, 2, 1]), "candidate_item_ids has duplicates"),
    (dict(k=5, as_of_ms=-1), "as_of_ms=-1 must be >= 0"),
])
def test_malformed_requests_get_invalid_argument_naming_the_field(make_server, fields, message):
    h = make_server(bootstrap=False, consume=False)
    with pytest.raises(grpc.RpcError) as err:
        h.rank(1, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_oversized_request_is_rejected_by_the_size_limit(make_server):
    h = make_server(bootstrap=False, consume=False, **{"grpc.max_receive_message_bytes": 4096})
    with pytest.raises(grpc.RpcError) as err:
        h.rank(1, k=5, candidate_item_ids=list(range(10**6, 10**6 + 2000)))  # ~6 KB > 4 KB
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_events_on_kafka_show_up_in_the_next_rank(make_server, wait_until):
    """query -> events for that user -> the next Rank uses the new history and excludes the newly seen items."""
    h = make_server()
    before = h.rank(1, k=10, exclude_seen=True)
    top = [it.item_id for it in before.items[:3]]
    now = 893_286_700_000  # just after the last ML-100K event
    events = [Event(f"live-1-{i}", 1, item, now + i, "click", 1.0) for i, item in enumerate(top)]
    h.send_events(events)
    after = wait_until(lambda: (r := h.rank(1, k=10, exclude_seen=True)).history_length == before.history_length + 3 and r,
                       what="the 3 clicks becoming visible to Rank")
    assert not set(top) & {it.item_id for it in after.items}
    rec = h.app.store.read_user(1)
    assert rec.seq.item_ids[-3:].tolist() == top and rec.seq.ts_ms[-1] == now + 2
    assert rec.sig_spec == h.app.models.current.sig_spec and rec.sigs is not None  # SDIM signatures stored at ingest
    assert np.array_equal(rec.sigs, h.app.models.current.signatures(rec.seq.item_ids))
    assert h.metric("cascade_events_applied_total") == 3
    assert h.metric("cascade_event_freshness_seconds_count") == 3
    lag = lambda p: h.app.metrics.registry.get_sample_value(  # noqa: E731
        "cascade_consumer_lag", {"topic": h.topics.events, "partition": p})
    wait_until(lambda: lag("0") == 0 and lag("1") == 0, what="consumer lag reported as 0 on both partitions")


def test_redelivered_events_leave_the_state_unchanged(make_server, wait_until):
    h = make_server()
    now = 893_286_700_000
    events = [Event(f"dup-2-{i}", 2, 100 + i, now + i, "rating", float(i % 2)) for i in range(5)]
    h.send_events(events)
    wait_until(lambda: h.metric("cascade_events_applied_total") == 5, what="5 events applied")
    state = _state(h, 2)
    item_logs = [h.app.store._slow.get(h.app.store.keys.item_log(100 + i)) for i in range(5)]
    popularity = h.app.store.top_items(2000)

    h.send_events(events)  # the same event ids again: a redelivery
    wait_until(lambda: h.metric("cascade_events_deduplicated_total") == 5, what="5 redeliveries deduplicated")
    assert h.metric("cascade_events_applied_total") == 5
    assert _state(h, 2) == state
    assert [h.app.store._slow.get(h.app.store.keys.item_log(100 + i)) for i in range(5)] == item_logs
    assert all(np.array_equal(a, b) for a, b in zip(h.app.store.top_items(2000), popularity))

    # a consumer of another group re-reads the whole topic from offset 0 (a full redelivery): no change
    from serving.stream.events import EventApplier, EventsConsumer

    cfg = h.app.cfg
    from dataclasses import replace

    kcfg = replace(cfg.kafka, events_group=cfg.kafka.events_group + "-replay")
    applier = EventApplier(cfg.state, h.app.store, h.app.catalog, h.app.models, h.app.metrics, None)
    c = EventsConsumer(kcfg, applier, h.app.metrics, None)
    c.start()
    try:
        wait_until(lambda: c.totals.messages == 10, what="the replaying consumer reading all 10 messages")
    finally:
        c.stop()
        c.join(10)
    assert c.totals.applied == 0 and c.totals.deduplicated == 10
    assert _state(h, 2) == state


def test_malformed_events_go_to_the_dead_letter_topic_with_the_reason(make_server, wait_until):
    from kafka import KafkaConsumer

    h = make_server()
    h.send_raw(h.topics.events, b"{not json", key=b"3")
    h.send_raw(h.topics.events, b'{"event_id":"x","user_id":3,"item_id":1,"ts_ms":5,"event_type":"teleport","label":1}', key=b"3")
    good = Event("ok-3", 3, 50, 893_286_700_000, "click", 1.0)
    h.send_events([good])
    wait_until(lambda: h.metric("cascade_events_applied_total") == 1, what="the good event applied")
    c = KafkaConsumer(h.topics.dead_letter, bootstrap_servers=h.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=10_000)
    got = []
    for m in c:
        got.append({k: v.decode() for k, v in m.headers} | {"value": m.value})
        if len(got) == 2:
            break
    c.close()
    assert [g["reason"] for g in got] == ["not_json", "unknown_event_type"]
    assert "teleport" in got[1]["detail"] and got[1]["source_topic"] == h.topics.events
    assert {g["source_partition"] for g in got} <= {"0", "1"} and all(g["source_offset"].isdigit() for g in got)
    assert got[0]["value"] == b"{not json"
    assert h.metric("cascade_events_dead_lettered_total", {"topic": h.topics.events, "reason": "not_json"}) == 1


def test_hot_swap_under_concurrent_queries_has_zero_failed_requests(make_server, wait_until, model_bundles):
    from features.messages import ModelAnnouncement

    # 4 clients with no think time: room for all of them, so every failure would be the swap's
    h = make_server(**{"grpc.max_workers": 4, "grpc.max_in_flight": 8})
    stop = threading.Event()
    results: list[str] = []
    failures: list[BaseException] = []

    def client(uid: int) -> None:
        while not stop.is_set():
            try:
                results.append(h.rank(uid, k=10, exclude_seen=True).model_version)
            except BaseException as e:  # noqa: BLE001 - every failure counts
                failures.append(e)

    threads = [threading.Thread(target=client, args=(u,)) for u in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 20, what="queries flowing before the swap")
        path, checksum = model_bundles["v2"]
        h.send_raw(h.topics.models, ModelAnnouncement("v2", str(path), checksum).encode())
        wait_until(lambda: results[-1] == "v2" and results.count("v2") >= 20, what="queries answered by v2")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    first_v2 = results.index("v2")
    assert set(results[:first_v2]) == {"v1"} and results.count("v1") >= 20
    # the initial bundle, then v2 (counted once the loader returns, after the heap is settled for v2)
    wait_until(lambda: h.metric("cascade_model_swaps_total") == 2, what="the swap counted")
    assert h.metric("cascade_model_info", {"version": "v2"}) == 1
    assert h.metric("cascade_model_info", {"version": "v1"}) == 0  # the old version's series is removed


def test_bad_model_artifacts_are_rejected_and_never_replace_the_served_one(make_server, wait_until, model_bundles, tmp_path):
    import json
    import shutil

    import torch
    from kafka import KafkaConsumer

    from features.messages import ModelAnnouncement
    from features.transforms import DenseLayout
    from ranking.export import export_ranker, load_ranker
    from serving.models import MANIFEST, sha256_file, write_bundle

    h = make_server()
    path, checksum = model_bundles["v2"]
    # 1. the announcement's checksum does not match the manifest
    h.send_raw(h.topics.models, ModelAnnouncement("v2", str(path), "0" * 64).encode())
    # 2. a weights file corrupted after the manifest was written
    bad = tmp_path / "v3"
    shutil.copytree(path, bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["version"] = "v3"
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with open(bad / "ranker" / "weights.pt", "r+b") as f:
        f.seek(200)
        f.write(b"\x00" * 64)
    h.send_raw(h.topics.models, ModelAnnouncement("v3", str(bad), sha256_file(bad / MANIFEST)).encode())
    # 3. every checksum right (a proper export), but the ranker outputs NaN: the smoke inference rejects it
    model = load_ranker(path / "ranker").model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("embedding."):  # everything above the tables: the output is NaN
                p.fill_(float("nan"))
    src = export_ranker(model, tmp_path / "nan-ranker")
    c4 = write_bundle(tmp_path / "v4", "v4", ("retrieval.export", path / "retriever"), ("ranking.export", src),
                      DenseLayout.from_manifest(manifest["features"]))
    h.send_raw(h.topics.models, ModelAnnouncement("v4", str(tmp_path / "v4"), c4).encode())
    # 4. not an announcement at all
    h.send_raw(h.topics.models, b'{"version": "v5"}')

    wait_until(lambda: h.metric("cascade_model_rejections_total", {"reason": "smoke_failed"}) == 1
               and h.metric("cascade_model_rejections_total", {"reason": "missing_field"}) == 1,
               what="all four bad announcements handled")
    assert h.metric("cascade_model_rejections_total", {"reason": "checksum_mismatch"}) == 2
    assert h.rank(1, k=5).model_version == "v1" and h.app.models.current.version == "v1"
    c = KafkaConsumer(h.topics.dead_letter, bootstrap_servers=h.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=10_000)
    reasons = []
    for m in c:
        reasons.append(dict(m.headers)["reason"].decode())
        if len(reasons) == 4:
            break
    c.close()
    assert reasons == ["rejected_artifact:checksum_mismatch", "rejected_artifact:checksum_mismatch",
                       "rejected_artifact:smoke_failed", "missing_field"]


def test_new_items_from_the_items_topic_become_rankable(make_server, wait_until):
    from features.messages import encode_item
    from features.schema import Item
    from serving.proto import ranking_pb2

    h = make_server()
    n0 = h.stub.GetModelInfo(ranking_pb2.GetModelInfoRequest()).num_items
    h.send_raw(h.topics.items, encode_item(Item(5000, "A New Movie (2026)", ("Sci-Fi", "Drama"), (), {}, {"year": 2026.0})))
    h.send_raw(h.topics.items, b'{"title": "no id"}')
    wait_until(lambda: h.stub.GetModelInfo(ranking_pb2.GetModelInfoRequest()).num_items == n0 + 1,
               what="the new item in the index")
    assert h.app.models.current.index.contains(np.array([5000]))[0]
    r = h.rank(1, k=3, candidate_item_ids=[5000, 1, 2])
    assert 5000 in [it.item_id for it in r.items]
    assert h.metric("cascade_items_rejected_total", {"reason": "missing_field"}) == 1


def test_redis_outage_gives_degraded_answers_and_recovers(make_server, wait_until, tmp_path):
    """Redis killed -> popularity answers flagged redis_unavailable, full health NOT_SERVING (readiness stays
    SERVING: tests/serving/test_health_semantics.py); restarted -> full answers."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from jobs.services import start_redis, stop_pid

    info = start_redis(tmp_path / "redis", detach=False)
    h = make_server(**{"redis.url": info.address})
    assert h.rank(1, k=5).fallback_reason == ""
    hs = health_pb2_grpc.HealthStub(h.channel)
    stop_pid(info.pid)
    r = h.rank(1, k=5)
    assert r.fallback_reason == "redis_unavailable" and len(r.items) == 5 and r.model_version == "v1"
    full = health_pb2.HealthCheckRequest(service="cascade.v1.Ranking/full")
    wait_until(lambda: hs.Check(full).status == health_pb2.HealthCheckResponse.NOT_SERVING,
               what="full health NOT_SERVING")
    assert h.metric("cascade_degraded_answers_total", {"reason": "redis_unavailable"}) >= 1
    assert h.metric("cascade_redis_up") == 0

    info2 = start_redis(tmp_path / "redis", port=info.port, detach=False)  # empty: state lost, server recovers
    try:
        wait_until(lambda: hs.Check(full).status == health_pb2.HealthCheckResponse.SERVING,
                   what="full health SERVING again")
        r = h.rank(1, k=5)
        assert r.fallback_reason == "cold_start"  # answered through Redis again (which lost user 1's state)
        assert h.metric("cascade_redis_up") == 1
    finally:
        stop_pid(info2.pid)


def test_no_model_loaded_is_unavailable_and_not_serving(make_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = make_server(bootstrap=False, bundle=None, consume=False)
    with pytest.raises(grpc.RpcError) as err:
        h.rank(1, k=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no model version is loaded" in err.value.details()
    hs = health_pb2_grpc.HealthStub(h.channel)
    assert hs.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_cached_item_features_equal_a_fresh_redis_read(make_server):
    """The background snapshot of every item's dense features == computing them from Redis at the same time."""
    from serving.batching import candidate_dense

    h = make_server(consume=False)
    app = h.app
    bundle, catalog = app.models.current, app.catalog.current
    now = 893_286_700_000  # within the bootstrapped data, so every window has counts
    snap = app.item_dense.refresh(catalog, bundle.dense, now)
    ids = catalog.item_ids[::7]
    fresh = candidate_dense(catalog, ids, app.store.read_item_stats(ids), now, bundle.dense)
    assert np.array_equal(snap.dense[catalog.rows(ids)], fresh) and np.count_nonzero(fresh[:, 0]) > 10
    got = app.item_dense.lookup(catalog, bundle.dense, ids, now + 1000, 5000)
    assert np.array_equal(got, fresh)
    assert app.item_dense.lookup(catalog, bundle.dense, ids, now + 60_000, 5000) is None  # too old: read Redis
    assert app.item_dense.lookup(catalog, bundle.dense, np.array([10**9]), now, 5000) is None  # not in the catalog
