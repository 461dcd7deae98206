"""`cascade serve` as a real process (graceful SIGTERM), `cascade query` against it, `cascade events replay`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from jobs.cli import main

pytestmark = pytest.mark.integration


def _free_port() -> int:
    from jobs.services import free_port

    return free_port()


def _free_port_pair() -> int:
    """A port p with p and p + 1 both free (process i of `cascade serve` puts /metrics on port + i)."""
    import socket

    for _ in range(50):
        p = _free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def test_serve_processes_answer_queries_and_drain_on_sigterm(services, model_bundles, ml100k_dataset, tmp_path,
                                                             capsys, wait_until):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from jobs.services import create_topics

    u = uuid.uuid4().hex[:8]
    topics = {f"events-{u}": 2, f"items-{u}": 1, f"models-{u}": 1, f"dlq-{u}": 1}
    create_topics(services.kafka.address, topics)
    port, mport = _free_port(), _free_port_pair()
    cfg = tmp_path / "serving.yaml"
    cfg.write_text(
        f"grpc:\n  address: 127.0.0.1:{port}\n  shutdown_grace_s: 5\n  processes: 2\n"
        f"metrics:\n  address: 127.0.0.1:{mport}\n"
        f"redis:\n  key_prefix: cli{u}\nkafka:\n  topics:\n    events: events-{u}\n    items: items-{u}\n"
        f"    models: models-{u}\n    dead_letter: dlq-{u}\n  events_group: g-{u}\n  session_timeout_ms: 2000\n"
        f"  heartbeat_interval_ms: 200\n")
    env = {**os.environ, "CASCADE_REDIS_URL": services.redis.address, "CASCADE_KAFKA_BOOTSTRAP": services.kafka.address}
    log = tmp_path / "serve.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "serve", "--dev", "--config", str(cfg), "--model-bundle",
             str(model_bundles["v1"][0]), "--catalog", str(ml100k_dataset), "--bootstrap", str(ml100k_dataset)],
            stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[2])
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        hs = health_pb2_grpc.HealthStub(ch)

        def serving() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return hs.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_until(serving, timeout_s=120, interval_s=0.3, what="`cascade serve` reporting SERVING")
        from serving.proto import ranking_pb2, ranking_pb2_grpc

        pids: set[str] = set()

        def both_processes_answer() -> bool:  # each new connection may land on either process (SO_REUSEPORT)
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as c:
                try:
                    info = ranking_pb2_grpc.RankingStub(c).GetModelInfo(ranking_pb2.GetModelInfoRequest(), timeout=2)
                except grpc.RpcError:
                    return False
                if info.model_version == "v1":
                    pids.add(info.metadata["pid"])
            return len(pids) == 2

        wait_until(both_processes_answer, timeout_s=120, interval_s=0.2, what="both server processes answering")
        assert main(["query", "--user", "1", "--k", "5", "--debug", "--exclude-seen", "--address", f"127.0.0.1:{port}",
                     "--catalog", str(ml100k_dataset)]) == 0
        out = capsys.readouterr().out
        assert "user 1   model v1   history 272" in out and out.count("\n") >= 8 and "stage timings: state_read" in out
        assert main(["query", "--user", "1", "--k", "0", "--address", f"127.0.0.1:{port}"]) == 1
        assert "INVALID_ARGUMENT: k=0 must be in [1, 200]" in capsys.readouterr().err
        import urllib.request

        text = "".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode()
                       for p in (mport, mport + 1))  # process i serves /metrics on the metrics port + i
        assert 'cascade_rank_requests_total{method="Rank",status="OK"} 1.0' in text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        ch.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert text.count("received SIGTERM: draining") == 2 and text.count("server stopped") == 2
    assert "health: NOT_SERVING" in text
    assert text.count("events consumer totals") == 2  # each consumer stopped after its last commit and said so


def test_events_replay_produces_each_users_events_in_order(services, ml100k_dataset, capsys):
    from kafka import KafkaConsumer

    from features.messages import decode_event

    topic = f"replay-{uuid.uuid4().hex[:8]}"
    assert main(["events", "replay", "--dataset", str(ml100k_dataset), "--users", "1,2", "--rate", "0",
                 "--kafka", services.kafka.address, "--topic", topic, "--id-prefix", "r1/"]) == 0
    assert "replayed     334 events for 2 users" in capsys.readouterr().out  # 272 + 62 ratings in ML-100K
    c = KafkaConsumer(topic, bootstrap_servers=services.kafka.address, auto_offset_reset="earliest",
                      consumer_timeout_ms=10_000)
    got = []
    for m in c:
        got.append((m.key, decode_event(m.value)))
        if len(got) == 334:
            break
    c.close()
    assert len(got) == 334 and all(k == str(e.user_id).encode() for k, e in got)
    for uid in (1, 2):
        evs = [e for _, e in got if e.user_id == uid]
        assert [(e.ts_ms, e.event_id) for e in evs] == sorted((e.ts_ms, e.event_id) for e in evs)
        assert all(e.event_id.startswith("r1/") for e in evs)


def test_serving_announce_publishes_the_bundle_checksum(services, model_bundles, capsys):
    from kafka import KafkaConsumer

    from features.messages import ModelAnnouncement

    topic = f"models-{uuid.uuid4().hex[:8]}"
    path, checksum = model_bundles["v2"]
    assert main(["serving", "announce", "--bundle", str(path), "--kafka", services.kafka.address, "--topic", topic]) == 0
    c = KafkaConsumer(topic, bootstrap_servers=services.kafka.address, auto_offset_reset="earliest",
                      consumer_timeout_ms=10_000)
    msgs = [m for _, m in zip(range(1), c)]
    c.close()
    ann = ModelAnnouncement.decode(msgs[0].value)
    assert (ann.version, ann.uri, ann.checksum) == ("v2", str(path.resolve()), checksum)
    assert main(["serving", "announce", "--bundle", str(path.parent), "--kafka", services.kafka.address]) == 1
    assert "manifest.json does not exist: is" in capsys.readouterr().err
