"""Health that matches the degraded design, against a real redis-server and the real gRPC server.

Readiness ("" and cascade.v1.Ranking) = the server can answer; it stays SERVING while Redis is down because
the answers are degraded, not absent. Full health (cascade.v1.Ranking/full) = every dependency is healthy.
Liveness (cascade.v1.Ranking/live) = the process works."""
from __future__ import annotations

import grpc
import pytest

pytestmark = pytest.mark.integration

READY = ("", "cascade.v1.Ranking")
FULL = "cascade.v1.Ranking/full"
LIVE = "cascade.v1.Ranking/live"


def _statuses(channel: grpc.Channel) -> dict[str, str]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    hs = health_pb2_grpc.HealthStub(channel)
    return {s: health_pb2.HealthCheckResponse.ServingStatus.Name(
        hs.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status) for s in (*READY, FULL, LIVE)}


ALL_SERVING = {s: "SERVING" for s in (*READY, FULL, LIVE)}


def test_redis_down_keeps_readiness_and_degraded_answers_full_health_reports_it(make_server, wait_until, tmp_path):
    from jobs.services import start_redis, stop_pid

    info = start_redis(tmp_path / "redis", detach=False)
    h = make_server(**{"redis.url": info.address})
    assert _statuses(h.channel) == ALL_SERVING
    assert h.rank(1, k=5).fallback_reason == ""

    stop_pid(info.pid)
    degraded = {**ALL_SERVING, FULL: "NOT_SERVING"}
    wait_until(lambda: _statuses(h.channel) == degraded, what="full health NOT_SERVING, readiness still SERVING")
    r = h.rank(1, k=5)
    assert r.fallback_reason == "redis_unavailable" and len(r.items) == 5 and r.model_version == "v1"
    assert h.metric("cascade_degraded_answers_total", {"reason": "redis_unavailable"}) >= 1
    assert h.metric("cascade_health_serving", {"check": "ready"}) == 1
    assert h.metric("cascade_health_serving", {"check": "full"}) == 0
    assert h.metric("cascade_redis_up") == 0
    assert "redis does not answer PING" in h.app.health.problems

    info2 = start_redis(tmp_path / "redis", port=info.port, detach=False)
    try:
        wait_until(lambda: _statuses(h.channel) == ALL_SERVING, what="every health service SERVING again")
        assert h.rank(1, k=5).fallback_reason != "redis_unavailable"  # answered through Redis again
        assert h.metric("cascade_health_serving", {"check": "full"}) == 1 and h.app.health.problems == []
    finally:
        stop_pid(info2.pid)


def test_probe_server_answers_the_same_health_and_only_health(make_server):
    from serving.proto import ranking_pb2, ranking_pb2_grpc

    h = make_server(bootstrap=False, consume=False, **{"grpc.probe_address": "127.0.0.1:0"})
    assert h.app.addresses.probe and h.app.addresses.probe != h.app.addresses.grpc
    with grpc.insecure_channel(h.app.addresses.probe) as ch:
        assert _statuses(ch) == ALL_SERVING
        with pytest.raises(grpc.RpcError) as err:  # Rank is not served on the probe port
            ranking_pb2_grpc.RankingStub(ch).Rank(ranking_pb2.RankRequest(user_id=1, k=5), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_without_a_model_the_process_is_live_but_not_ready(make_server):
    h = make_server(bootstrap=False, bundle=None, consume=False)
    assert _statuses(h.channel) == {**{s: "NOT_SERVING" for s in (*READY, FULL)}, LIVE: "SERVING"}
    assert "no model loaded" in h.app.health.problems


def test_an_added_check_fails_full_health_only(make_server):
    h = make_server(bootstrap=False, consume=False)
    state = {"rebuilding": "state rebuild in progress"}
    h.app.health.add_check("state", lambda: state["rebuilding"])
    h.app.health.check_now()
    assert _statuses(h.channel) == {**ALL_SERVING, FULL: "NOT_SERVING"}
    assert h.app.health.problems == ["state: state rebuild in progress"]
    state["rebuilding"] = None
    h.app.health.check_now()
    assert _statuses(h.channel) == ALL_SERVING


def test_shutdown_drains_readiness_but_stays_live(make_server):
    h = make_server(bootstrap=False, consume=False)
    h.app.health.shutdown()
    assert _statuses(h.channel) == {**{s: "NOT_SERVING" for s in (*READY, FULL)}, LIVE: "SERVING"}
    assert h.app.health.check_now() is False  # a probe after shutdown changes nothing
    assert _statuses(h.channel)[""] == "NOT_SERVING"


def test_a_failing_index_fails_full_health_until_a_search_works_again(make_server):
    """The index raising is injected (a real faiss index does not fail on demand); the rest is the real server."""
    h = make_server(consume=False)
    index = h.app.models.current.index

    def broken(user_vecs, k):
        raise RuntimeError("index shard unreadable")

    index.search = broken  # instance attribute shadows the method
    r = h.rank(1, k=5)
    assert r.fallback_reason == "index_unavailable" and len(r.items) == 5
    h.app.health.check_now()
    assert _statuses(h.channel) == {**ALL_SERVING, FULL: "NOT_SERVING"}
    assert h.app.health.problems == ["the last ANN search failed (RuntimeError: index shard unreadable)"]

    del index.search
    assert h.rank(1, k=5).fallback_reason == ""
    h.app.health.check_now()
    assert _statuses(h.channel) == ALL_SERVING
