"""Multi-node training for real: `torchrun` on two "nodes" (two launcher processes, one rank each, c10d
rendezvous on loopback) trains the ranker exactly as the loopback launcher does at world size 2.

Both runs are the unchanged `jobs/train_ranker.py` on the same tiny Spark-built features, same seed, one
thread per rank; the summaries and the exported weights must be identical. Nothing listens beyond
loopback: the rendezvous store is hosted here, bound to 127.0.0.1 (`bound_tcp_store`; every launcher gets
``--rdzv-conf is_host=false``), and with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` rank 0 hosts the ranks'
store on the loopback master address (`init_from_torchrun_env`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from features.train.launch import TorchrunEnv, bound_tcp_store

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

RANKER_STAGES = "items,users,timelines,popularity,ranking_samples"  # what the ranker's reader opens
TINY_RANKER = [
    "model.embedding.dim=8", "model.embedding.attention_dim=8", "model.embedding.pooled_dim=8",
    "model.sequence.short_len=10", "model.sequence.long=dare", "model.sequence.long_len=50", "model.sequence.top_k=8",
    "model.moe.num_experts=2", "model.moe.expert_hidden=[16]", "model.moe.gate_hidden=8",
    "data.batch_size=256", "data.eval_batch_size=128", "train.epochs=2", "train.max_steps_per_epoch=3", "train.seed=5",
    "train.sharding.constraints={item_rep: [row_wise], user_id: [table_wise]}",
]


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic log (40 users, 4,000 events) through `cascade build-features` (the ranker's stages)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from features.datasets.synthetic import SynthConfig, generate
    from jobs.cli import main

    tmp = tmp_path_factory.mktemp("multinode")
    generate(SynthConfig(events=4000, users=40, items=300, heavy_users=0, seed=0), tmp / "dataset")
    out = tmp / "features"
    rc = main(["build-features", "--dataset", str(tmp / "dataset"), "--out", str(out), "--master", "local[2]",
               "--only", RANKER_STAGES, "spark.shuffle_partitions=2", "report.plot=false",
               "output.max_records_per_file=100"])  # several files per split: every rank gets evaluation rows
    assert rc == 0
    return out


def _env() -> dict[str, str]:
    # one thread per rank in both runs (the loopback launcher gives each of 2 ranks cpu_count // 2 = 1 here)
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}


def _ranker_args(features: Path, out: Path) -> list[str]:
    return ["--out", str(out), f"data.features_dir={features}", *TINY_RANKER]


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def loopback_run(tiny_features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m jobs.train_ranker --world-size 2`: two spawned ranks in one process group (file rendezvous)."""
    out = tmp_path_factory.mktemp("loopback") / "run"
    proc = subprocess.run([sys.executable, "-m", "jobs.train_ranker", "--world-size", "2",
                           *_ranker_args(tiny_features, out)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=480)
    _check(proc, "train_ranker --world-size 2")
    return out


@pytest.fixture(scope="module")
def torchrun_run(tiny_features: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two `torchrun --nnodes 2 --nproc-per-node 1` launchers meeting at a c10d rendezvous; (run dir, logs)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    out = tmp / "run"  # one run directory both nodes write (a shared volume on a cluster)
    store = bound_tcp_store("127.0.0.1", 0)  # the c10d rendezvous store, on loopback only
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    rdzv_id = f"cascade-{uuid.uuid4().hex[:8]}"
    procs = []
    for node in range(2):
        log = open(tmp / f"node{node}.log", "w")
        cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-id", rdzv_id, "--rdzv-conf", "is_host=false",
               "--local-addr", "127.0.0.1", "--max-restarts", "0", "--monitor-interval", "0.5",
               "-m", "jobs.train_ranker", *_ranker_args(tiny_features, out)]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for p, _ in procs:
            p.wait(timeout=480)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = [(tmp / f"node{n}.log").read_text() for n in range(2)]
    for (p, _), text in zip(procs, logs):
        assert p.returncode == 0, f"torchrun node failed ({p.returncode}):\n{text[-8000:]}"
    rendezvous_used = store.check([f"torch.rendezvous.{rdzv_id}"])  # the c10d backend's state key of this run
    return out, rendezvous_used


def test_torchrun_two_nodes_form_one_world_of_two(torchrun_run):
    out, rendezvous_used = torchrun_run
    assert rendezvous_used  # the launchers met at the c10d rendezvous hosted here
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["item_rep"].startswith("row_wise on ranks [0, 1]")  # sharded across the two nodes


def test_two_nodes_under_torchrun_train_what_world_size_two_trains(loopback_run, torchrun_run):
    out, _ = torchrun_run
    a = json.loads((loopback_run / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    for key in ("best_valid", "test", "best_epoch", "epochs_run", "plan"):
        assert b[key] == a[key], key
    wa = torch.load(loopback_run / "export" / "weights.pt", map_location="cpu", weights_only=True)
    wb = torch.load(out / "export" / "weights.pt", map_location="cpu", weights_only=True)
    assert sorted(wb) == sorted(wa)
    for name in wa:
        assert torch.equal(wb[name], wa[name]), name


def test_torchrun_env_is_parsed_and_checked():
    assert TorchrunEnv.parse({"PATH": "/bin"}) is None
    env = TorchrunEnv.parse({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.7",
                             "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert env == TorchrunEnv(rank=1, world_size=2, local_rank=0, master_addr="10.0.0.7", master_port=29500,
                              agent_store=True)
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        TorchrunEnv.parse({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="MASTER_PORT='http'"):
        TorchrunEnv.parse({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"})


def test_bound_store_listens_on_loopback_only():
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    store = bound_tcp_store("127.0.0.1", 0)
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{store.port}"], capture_output=True, text=True).stdout
    local_addresses = [line.split()[3] for line in listening.splitlines()]  # State Recv-Q Send-Q Local Peer
    assert local_addresses == [f"127.0.0.1:{store.port}"]
    client = torch.distributed.TCPStore("127.0.0.1", store.port, is_master=False)
    client.set("k", "v")
    assert store.get("k") == b"v"
