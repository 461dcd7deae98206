"""Shared fixtures. TRITON_INTERPRET must be set before any kernel module is imported."""
from __future__ import annotations

import logging
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
logging.getLogger("kafka").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $CASCADE_SHARED_DATA): the real public datasets, read in place."""
    path = Path(os.environ.get("CASCADE_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "ml-100k" / "u.data").exists():
        pytest.fail(f"real datasets not found at {path}: put ../shared beside the repo or set CASCADE_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def ml100k_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ML-100K imported into canonical Parquet once per session."""
    from features.datasets import import_dataset

    out = tmp_path_factory.mktemp("ml100k")
    import_dataset(shared_data / "ml-100k", out, overwrite=True)
    return out


@pytest.fixture()
def local_services(tmp_path: Path):
    """Isolated tansu (Kafka protocol) + redis-server on free loopback ports; always stopped."""
    from jobs.services import LocalServices

    with LocalServices(tmp_path / "services") as svc:
        yield svc


@pytest.fixture()
def redis_server(tmp_path: Path):
    from jobs.services import LocalServices

    with LocalServices(tmp_path / "redis", kafka=False) as svc:
        yield svc.redis


def _cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too (so at most 55535)."""
    import socket

    from jobs.services import free_port

    for _ in range(1000):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    pytest.fail("no free port pair (P, P + 10000) below 65536 for a redis cluster node")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis Cluster: three redis-server masters in cluster mode on free loopback ports, joined by
    `redis-cli --cluster create`; yields the first node's ServiceInfo (its address is a startup node)."""
    import shutil
    import subprocess
    import time

    import redis

    from jobs.services import start_redis, stop_pid

    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli not found on PATH: install it with `apt-get install redis-tools` (it ships with redis-server)")
    root = tmp_path_factory.mktemp("redis-cluster")
    nodes = []
    try:
        for i in range(3):
            nodes.append(start_redis(root / f"node{i}", port=_cluster_port(), detach=False, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000")))
        made = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                               "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed ({made.returncode}):\n{made.stdout}\n{made.stderr}")
        deadline = time.monotonic() + 30
        for n in nodes:
            with redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=2) as r:
                while r.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > deadline:
                        pytest.fail(f"redis cluster node {n.port} not cluster_state:ok after 30 s")
                    time.sleep(0.05)
        yield nodes[0]
    finally:
        for n in nodes:
            stop_pid(n.pid)


@pytest.fixture(scope="module")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory):
    from jobs.services import LocalServices

    with LocalServices(tmp_path_factory.mktemp("kafka"), redis=False) as svc:
        yield svc.kafka


@pytest.fixture(autouse=True, scope="session")
def _quiet_library_logs():
    """TorchRec's planner and DCP log every call at INFO/DEBUG; keep test output readable."""
    for name in ("torchrec", "torch.distributed", "c10d-NullHandler-dcp_logger", "MethodLogger-NullHandler", "py4j"):
        logging.getLogger(name).setLevel(logging.WARNING)
    yield


# the stages the retriever and the second stage read (`ranking_samples` records dense.prior_rate, which
# FeatureStore requires)
RETRIEVAL_STAGES = "items,users,timelines,popularity,retrieval_samples,ranking_samples"


@pytest.fixture(scope="session")
def retrieval_features(ml100k_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ML-100K through `cascade build-features` (only the stages the retriever reads), once per session."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from jobs.cli import main

    out = tmp_path_factory.mktemp("retrieval_features") / "features"
    rc = main(["build-features", "--dataset", str(ml100k_dataset), "--out", str(out), "--master", "local[2]",
               "--only", RETRIEVAL_STAGES, "spark.shuffle_partitions=4"])
    assert rc == 0
    return out
