"""Overload against the real server: calls beyond grpc.max_in_flight are answered RESOURCE_EXHAUSTED at once
(while the accepted ones are still running), the server answers afterwards, and work whose deadline has passed
is dropped before the stage it would have computed.

The accepted calls are held in their first stage deterministically: the server's own redis-server is paused
(CLIENT PAUSE), so `state_read` waits until the pause ends."""
from __future__ import annotations

import grpc
import pytest
import redis

pytestmark = pytest.mark.integration

PAUSE_MS = 3000


@pytest.fixture()
def own_redis(tmp_path):
    from jobs.services import start_redis, stop_pid

    info = start_redis(tmp_path / "redis", detach=False)
    yield info
    stop_pid(info.pid)


def _pause(info, ms: int = PAUSE_MS) -> None:
    with redis.Redis.from_url(info.address) as r:
        r.execute_command("CLIENT", "PAUSE", ms, "ALL")


def _server(make_server, info, workers: int, in_flight: int):
    # a long socket timeout: a paused Redis is slow, not down (the calls wait instead of answering degraded)
    return make_server(bootstrap=False, consume=False, **{
        "redis.url": info.address, "redis.socket_timeout_s": 30, "redis.health_interval_s": 60,
        "grpc.max_workers": workers, "grpc.max_in_flight": in_flight, "runtime.item_stats": "request"})


def test_a_flood_beyond_max_in_flight_is_shed_at_once_and_the_server_answers_afterwards(make_server, own_redis,
                                                                                          wait_until):
    from serving.proto import ranking_pb2

    h = _server(make_server, own_redis, workers=2, in_flight=3)
    assert h.rank(1, k=5).model_version == "v1"
    _pause(own_redis)
    held = [h.stub.Rank.future(ranking_pb2.RankRequest(user_id=u, k=5), timeout=60) for u in (1, 2, 3)]
    wait_until(lambda: h.metric("cascade_requests_in_flight") == 3, what="3 calls accepted (2 running, 1 queued)")

    flood = [h.stub.Rank.future(ranking_pb2.RankRequest(user_id=100 + i, k=5), timeout=60) for i in range(30)]
    codes = [f.exception().code() if f.exception() else grpc.StatusCode.OK for f in flood]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 30
    assert not any(f.done() for f in held)  # answered while every accepted call still waited: nothing queued
    assert h.metric("cascade_requests_shed_total") == 30
    assert h.metric("cascade_rank_requests_total", {"method": "Rank", "status": "RESOURCE_EXHAUSTED"}) == 30

    assert all(f.result().model_version == "v1" for f in held)  # the accepted ones finish normally
    assert len(h.rank(4, k=5).items) == 5  # and the server still answers
    wait_until(lambda: h.metric("cascade_requests_in_flight") == 0, what="nothing left in flight")
    assert h.metric("cascade_rank_requests_total", {"method": "Rank", "status": "OK"}) == 5


def test_a_call_whose_deadline_passes_in_the_queue_is_not_computed(make_server, own_redis, wait_until):
    from serving.proto import ranking_pb2

    h = _server(make_server, own_redis, workers=1, in_flight=2)
    _pause(own_redis)
    held = h.stub.Rank.future(ranking_pb2.RankRequest(user_id=1, k=5), timeout=60)
    wait_until(lambda: h.metric("cascade_requests_in_flight") == 1, what="the only handler thread busy")
    queued = h.stub.Rank.future(ranking_pb2.RankRequest(user_id=2, k=5), timeout=0.5)
    assert queued.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert held.result().model_version == "v1"
    wait_until(lambda: h.metric("cascade_requests_in_flight") == 0, what="the queued call leaving the server")
    # the expired call never reached a stage: only the held call was timed
    assert h.metric("cascade_rank_stage_seconds_count", {"stage": "total"}) == 1
    assert h.metric("cascade_rank_stage_seconds_count", {"stage": "state_read"}) == 1


def test_an_expired_deadline_skips_the_remaining_stages(make_server):
    """The runtime checks the deadline before every stage; the skipped stage is counted and named."""
    from serving.errors import DeadlineExceeded
    from serving.runtime import Deadline, RankQuery

    class ExpiresAfter(Deadline):  # passes the first `n` checks, then is expired: a stage-exact deadline
        def __init__(self, n: int) -> None:
            super().__init__(None)
            self.left = n

        def expired(self) -> bool:
            self.left -= 1
            return self.left < 0

    h = make_server(consume=False)
    rt = h.app.runtime
    stages = ["state_read", "user_tower", "ann", "filter_seen", "item_stats", "features", "ranker", "topk"]
    for n, stage in enumerate(stages):
        with pytest.raises(DeadlineExceeded, match=f"before stage '{stage}'"):
            rt.rank(RankQuery(user_id=1, k=5), ExpiresAfter(n))
        assert h.metric("cascade_deadline_dropped_total", {"stage": stage}) == 1
    assert rt.rank(RankQuery(user_id=1, k=5), ExpiresAfter(len(stages))).fallback_reason == ""  # in time: answered
    assert h.metric("cascade_rank_stage_seconds_count", {"stage": "ranker"}) == 1  # only the answered one ranked
