"""Load shedding, deadlines and configuration."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from serving.errors import DeadlineExceeded, InvalidRequest
from serving.interceptors import bounded_server
from serving.metrics import METRIC_NAMES, ServingMetrics


def test_requests_beyond_max_in_flight_are_shed_with_resource_exhausted():
    """A real bounded gRPC server (1 thread, 1 call accepted); the first request holds the only slot until released."""
    metrics = ServingMetrics()
    entered, release = threading.Event(), threading.Event()

    def block(request: bytes, context) -> bytes:
        entered.set()
        release.wait(10)
        return b"done"

    def fail(request: bytes, context) -> bytes:
        raise InvalidRequest("k=0 must be in [1, 200]")

    server = bounded_server(metrics, max_workers=1, max_in_flight=1)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Svc", {
        "Block": grpc.unary_unary_rpc_method_handler(block), "Fail": grpc.unary_unary_rpc_method_handler(fail)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/test.Svc/Block")
            first = call.future(b"", timeout=10)
            assert entered.wait(10)
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert metrics.registry.get_sample_value("cascade_requests_in_flight") == 1
            release.set()
            assert first.result() == b"done"
            with pytest.raises(grpc.RpcError) as err:  # domain errors map to their status, once
                ch.unary_unary("/test.Svc/Fail")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "k=0 must be in [1, 200]"
    finally:
        server.stop(0)
    r = metrics.registry
    assert r.get_sample_value("cascade_requests_shed_total") == 1
    assert r.get_sample_value("cascade_rank_requests_total", {"method": "Block", "status": "OK"}) == 1
    assert r.get_sample_value("cascade_rank_requests_total", {"method": "Block", "status": "RESOURCE_EXHAUSTED"}) == 1
    assert r.get_sample_value("cascade_rank_requests_total", {"method": "Fail", "status": "INVALID_ARGUMENT"}) == 1
    # the handler thread leaves the gauge after its answer went out: the client can read it first
    deadline = time.monotonic() + 10
    while r.get_sample_value("cascade_requests_in_flight") != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.get_sample_value("cascade_requests_in_flight") == 0


def test_a_passed_deadline_stops_the_request_between_stages():
    from serving.runtime import Deadline

    d = Deadline(0.0)  # long past
    with pytest.raises(DeadlineExceeded, match="deadline exceeded before stage 'ranker'"):
        d.check("ranker")
    Deadline(None).check("ranker")  # no deadline: never raises
    assert DeadlineExceeded("x").status == "DEADLINE_EXCEEDED"


@pytest.mark.integration
def test_rank_past_its_deadline_is_deadline_exceeded(make_server):
    from serving.runtime import Deadline, RankQuery

    h = make_server(consume=False)
    with pytest.raises(DeadlineExceeded, match="before stage 'state_read'"):
        h.app.runtime.rank(RankQuery(user_id=1, k=5), Deadline(0.0))


def test_config_layers_defaults_yaml_env_and_flags(tmp_path):
    from features.config import ConfigError
    from serving.app import load_serving_config

    y = tmp_path / "serving.yaml"
    y.write_text("grpc:\n  max_workers: 3\nredis:\n  url: redis://127.0.0.1:7000/0\nlimits:\n  max_k: 20\n")
    env = {"CASCADE_REDIS_URL": "redis://127.0.0.1:7001/0", "CASCADE_KAFKA_BOOTSTRAP": "127.0.0.1:9999"}
    cfg = load_serving_config(y, ["limits.max_k=30"], env=env)
    assert cfg.grpc.max_workers == 3  # yaml
    assert cfg.redis.url == "redis://127.0.0.1:7001/0" and cfg.kafka.bootstrap == "127.0.0.1:9999"  # env over yaml
    assert cfg.limits.max_k == 30  # flags over everything
    assert cfg.grpc.address.startswith("127.0.0.1:") and cfg.metrics.address.startswith("127.0.0.1:")
    with pytest.raises(ConfigError, match=r"grpc: unknown key\(s\) \['workers'\]"):
        load_serving_config(None, ["grpc.workers=2"], env={})
    with pytest.raises(ConfigError, match="grpc.address must look like HOST:PORT"):
        load_serving_config(None, ["grpc.address=nowhere"], env={})
    with pytest.raises(ConfigError, match="shorter than the longest stats window"):
        load_serving_config(None, ["state.stats_retention=7d"], env={})


def test_metric_names_follow_prometheus_conventions():
    import re

    m = ServingMetrics()
    families = {f.name: f.type for f in m.registry.collect()}
    exposed = {f"{n}_total" if t == "counter" else n for n, t in families.items()}
    assert exposed == set(METRIC_NAMES)  # one declaration per metric, and every one is listed
    for name in METRIC_NAMES:
        assert re.fullmatch(r"cascade_[a-z0-9_]+", name), name
    for n, t in families.items():
        assert t == "counter" or not n.endswith("_total"), f"{n}: only counters end in _total"
        assert "latency" not in n and "_ms" not in n, f"{n}: durations are in base units (_seconds)"
    assert not any(l in ("user_id", "item_id", "user", "item") for f in m.registry.collect() for s in f.samples
                   for l in s.labels)


def test_the_example_config_lists_every_key_with_its_default():
    from pathlib import Path

    from features.config import dump_config
    from serving.app import load_serving_config
    from serving.config import ServingConfig

    example = Path(__file__).resolve().parents[2] / "serving" / "serving.example.yaml"
    assert load_serving_config(example, env={}) == ServingConfig()
    assert dump_config(ServingConfig()) in example.read_text()  # regenerate it when a key is added
