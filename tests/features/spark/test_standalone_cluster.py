"""The feature jobs on a real Spark standalone cluster: executors in other JVMs write what `local[*]` writes.

A master and two workers (1 core, 1 GiB each) are started on loopback with the
pinned pyspark's own launcher (`bin/spark-class ...deploy.master.Master` /
`...deploy.worker.Worker`; the pip package ships no `sbin/start-master.sh`).
`jobs/build_features.py` is submitted to it unchanged with `bin/spark-submit`
(client mode), on the same small dataset the `small_features` fixture builds
with `local[2]` in the test process, and every output is compared with that
build as a sorted table, row for row. Executors share the driver's filesystem
here (loopback); on a real cluster the dataset and output are an object store
or a mounted volume (see the chart's `spark.operator` values).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from features import layout

from tests.features.conftest import SMALL_OVERRIDES

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration

# C1-only JIT in every JVM: the inputs are tiny (see SparkConfig.driver_java_options)
JIT = "-XX:TieredStopAtLevel=1"


def _spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandaloneCluster:
    """A Spark standalone master and workers on 127.0.0.1, each in its own process group; always stopped."""

    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "1g") -> None:
        self.root, self.workers, self.cores, self.memory = root, workers, cores, memory
        self.port = _free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.env = {
            **os.environ,
            "SPARK_HOME": str(_spark_home()),
            "SPARK_LOCAL_IP": "127.0.0.1",  # RPC, block manager and web UIs bind to loopback only
            "SPARK_DAEMON_MEMORY": "256m",
            "SPARK_DAEMON_JAVA_OPTS": JIT,
            "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",  # no REST submission server (fixed port 6066)
            "PYSPARK_PYTHON": sys.executable,
        }

    def work_dir(self, i: int) -> Path:
        return self.root / f"worker-{i}"

    def _start(self, name: str, cls: str, *args: str) -> Path:
        log = self.root / f"{name}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen([str(_spark_home() / "bin" / "spark-class"), cls, *args], stdout=f,
                                 stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append((p, log))
        return log

    def _wait_for(self, log: Path, text: str, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in log.read_text(errors="replace"):
                return
            for p, plog in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{plog.stem} exited with {p.returncode}:\n{plog.read_text()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"no {text!r} in {log} after {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")

    def __enter__(self) -> "StandaloneCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            master = self._start("master", "org.apache.spark.deploy.master.Master",
                                 "--host", "127.0.0.1", "--port", str(self.port), "--webui-port", "0")
            self._wait_for(master, "I have been elected leader")
            logs = [self._start(f"worker-{i}", "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                "--cores", str(self.cores), "--memory", self.memory, "--webui-port", "0",
                                "--work-dir", str(self.work_dir(i)), self.url)
                    for i in range(self.workers)]
            for log in logs:
                self._wait_for(log, "Successfully registered with master")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p, _ in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the worker's executors are in its process group
        for p, _ in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with StandaloneCluster(tmp_path_factory.mktemp("spark-standalone")) as c:
        yield c


@pytest.fixture(scope="module")
def cluster_features(cluster: StandaloneCluster, small_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """`spark-submit --master spark://... jobs/build_features.py` on the small dataset; (features dir, stdout)."""
    out = tmp_path_factory.mktemp("cluster_features") / "features"
    cmd = [
        str(_spark_home() / "bin" / "spark-submit"), "--master", cluster.url, "--deploy-mode", "client",
        "--driver-memory", "1g", "--executor-memory", "512m", "--conf", "spark.executor.cores=1",
        "--conf", "spark.cores.max=2", "--conf", "spark.ui.enabled=false",
        "--conf", f"spark.driver.extraJavaOptions={JIT}", "--conf", f"spark.executor.extraJavaOptions={JIT}",
        str(REPO / "jobs" / "build_features.py"), "--dataset", str(small_dataset), "--out", str(out),
        *SMALL_OVERRIDES,
    ]
    env = {**cluster.env, "PYSPARK_DRIVER_PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out, proc.stdout


def _rows(path: Path) -> list[str]:
    """Every row as canonical JSON (floats rounded to 12 significant digits), sorted: a table compared as a set
    with multiplicity, independent of files, partitions and row order."""
    def canon(v):
        if isinstance(v, float):
            return v if not math.isfinite(v) else float(f"{v:.12g}")
        if isinstance(v, dict):
            return {k: canon(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        return v

    table = pq.read_table(path)  # hive partitions (split=...) come back as a column
    return sorted(json.dumps(canon(r), sort_keys=True, default=str) for r in table.to_pylist())


def test_the_job_ran_on_the_cluster_with_executors_on_both_workers(cluster, cluster_features):
    out, stdout = cluster_features
    assert f"on {cluster.url} ready" in stdout
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["spark"]["master"] == cluster.url
    for i in range(cluster.workers):  # each worker launched an executor JVM that ran tasks
        stderr = list(cluster.work_dir(i).glob("app-*/*/stderr"))
        assert stderr, f"worker {i} launched no executor"
        assert any("Running task" in p.read_text(errors="replace") for p in stderr), f"worker {i}'s executor ran no task"


def test_cluster_outputs_equal_local_outputs_row_for_row(cluster_features, small_features):
    out, _ = cluster_features
    for output in layout.OUTPUTS:
        local, remote = _rows(small_features / output), _rows(out / output)
        assert len(remote) == len(local), output
        assert remote == local, output


def test_cluster_manifest_and_report_equal_local(cluster_features, small_features):
    out, _ = cluster_features

    def stable(m: dict) -> dict:
        m = {k: v for k, v in m.items() if k not in ("timings_s", "updated_at", "spark")}
        m["config"] = {k: v for k, v in m["config"].items() if k != "spark"}
        return m

    local = json.loads((small_features / layout.MANIFEST).read_text())
    remote = json.loads((out / layout.MANIFEST).read_text())
    assert stable(remote) == stable(local)
    assert remote["config_sha256"] == local["config_sha256"]  # the master is not part of the config digest
    report = "report/validation.json"
    local_report, remote_report = (json.loads((d / report).read_text()) for d in (small_features, out))
    local_report.pop("created_at"), remote_report.pop("created_at")
    assert remote_report == local_report
