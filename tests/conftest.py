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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real Redis Cluster: three redis-server masters in cluster mode on free loopback ports, joined by
    `redis-cli --cluster create` (jobs.services.start_redis_cluster); yields the first node's ServiceInfo
    (its address is a startup node). Stopped at the end of the session."""
    from jobs.services import start_redis_cluster, stop_pid

    nodes = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
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
