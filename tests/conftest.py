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


@pytest.fixture()
def memory_store():
    """An empty `InMemoryOnlineStore`: the online store for unit tests of what runs over one (runtime,
    consumers, rebuild); it passes the same contract suite as Redis (tests/serving/test_store_contract.py)."""
    from serving.state.memory_store import InMemoryOnlineStore

    store = InMemoryOnlineStore()
    yield store
    store.close()


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (moto's `moto_server` process) on a free loopback port, made the process's
    object store (`features.storage.configure`, credentials named by environment variable); always stopped."""
    import subprocess
    import sys

    import fsspec

    from features import storage
    from jobs.services import _wait_tcp, free_port, stop_pid

    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.fail(f"{exe} not found: install the dev extras (pip install -e .[dev], moto[server])")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_tcp(port, proc, "moto_server", log)
        cfg = storage.StorageConfig(endpoint_url=f"http://127.0.0.1:{port}",
                                    access_key_env="CASCADE_TEST_S3_KEY", secret_key_env="CASCADE_TEST_S3_SECRET")
        environ = {"CASCADE_TEST_S3_KEY": "test-key", "CASCADE_TEST_S3_SECRET": "test-secret"}
        storage.configure(cfg, environ)
        yield cfg, environ
    finally:
        fsspec.config.conf.pop("s3", None)
        stop_pid(proc.pid)


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh bucket on `s3_server`: its s3:// URI. The server's settings are applied again (a ServingApp started
    by an earlier test configures the process's object store from its own config)."""
    import uuid

    from features import storage

    storage.configure(*s3_server)
    uri = f"s3://test-{uuid.uuid4().hex[:12]}"
    fs, path = storage.filesystem(uri)
    fs.mkdir(path)
    return uri
