"""Versioned features (features/versions.py): no job reads a features directory another job may be rewriting.

The unit tests drive the pointer, leases and collection on hand-made version directories; the integration
tests run the real `cascade build-features --versioned` (Spark, local[2]) while another process — a reader
holding a lease, then the real `cascade train-ranker` — reads a version.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from features import versions

REPO = Path(__file__).resolve().parents[2]


def _fake_version(root: Path, name: str, complete: bool = True) -> Path:
    d = root / name
    (d / "items").mkdir(parents=True)
    (d / "items" / "part-0.parquet").write_bytes(name.encode())
    if complete:
        (d / "manifest.json").write_text(json.dumps({"name": name}))
    return d


def _tree_digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


# ---------------------------------------------------------------------------------------------- unit


def test_commit_points_current_at_the_version_atomically(tmp_path):
    _fake_version(tmp_path, "v-20260101T000000Z-aaaa")
    pointer = versions.commit_version(tmp_path, "v-20260101T000000Z-aaaa")
    assert versions.read_pointer(tmp_path)["version"] == "v-20260101T000000Z-aaaa" == pointer["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "current.json", "v-20260101T000000Z-aaaa"]


def test_commit_refuses_an_unfinished_version(tmp_path):
    _fake_version(tmp_path, "v-20260101T000000Z-aaaa", complete=False)
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        versions.commit_version(tmp_path, "v-20260101T000000Z-aaaa")
    assert versions.read_pointer(tmp_path) is None


def test_a_corrupt_pointer_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "current.json").write_text("{not json")
    with pytest.raises(ValueError, match="current.json: not a features pointer"):
        versions.read_pointer(tmp_path)


def test_pin_resolves_once_and_holds_the_version_while_a_newer_one_is_committed(tmp_path):
    _fake_version(tmp_path, "v-1")
    versions.commit_version(tmp_path, "v-1")
    with versions.pin(tmp_path, job="reader", ttl_s=60) as fv:
        assert fv.path == tmp_path / "v-1" and fv.version == "v-1"
        _fake_version(tmp_path, "v-2")
        versions.commit_version(tmp_path, "v-2")
        assert versions.collect_garbage(tmp_path, keep=1) == []
        assert (tmp_path / "v-1" / "manifest.json").is_file()
        assert [lease["version"] for lease in versions.read_leases(tmp_path)] == ["v-1"]
    assert versions.read_leases(tmp_path) == []
    assert versions.collect_garbage(tmp_path, keep=1) == ["v-1"]
    assert versions.list_versions(tmp_path) == ["v-2"]


def test_a_plain_features_directory_is_read_as_is(tmp_path):
    d = _fake_version(tmp_path, "plain")
    with versions.pin(d) as fv:
        assert fv.path == d and fv.version is None
    with versions.pin("s3://bucket/features") as fv:
        assert fv.path == "s3://bucket/features"


def test_gc_keeps_the_newest_n_and_the_current_one(tmp_path):
    for n in range(1, 6):
        _fake_version(tmp_path, f"v-{n}")
    versions.commit_version(tmp_path, "v-2")  # rolled back by hand to an older version
    assert versions.collect_garbage(tmp_path, keep=2) == ["v-1", "v-3"]
    assert versions.list_versions(tmp_path) == ["v-2", "v-4", "v-5"]


def test_gc_removes_unfinished_builds_older_than_the_newest_n(tmp_path):
    _fake_version(tmp_path, "v-1", complete=False)  # a crashed build
    _fake_version(tmp_path, "v-2")
    versions.commit_version(tmp_path, "v-2")
    assert versions.collect_garbage(tmp_path, keep=1) == ["v-1"]
    assert not any(p.name.startswith(".trash") for p in tmp_path.iterdir())


def test_a_build_in_progress_is_leased_and_survives_a_concurrent_collection(tmp_path):
    fv, lease = versions.reserve(tmp_path, job="build", ttl_s=60)
    _fake_version(tmp_path, fv.version, complete=False)
    _fake_version(tmp_path, "v-99991231T000000Z-ffff")  # a later build finished first
    versions.commit_version(tmp_path, "v-99991231T000000Z-ffff")
    assert versions.collect_garbage(tmp_path, keep=1) == []
    lease.release()
    assert versions.collect_garbage(tmp_path, keep=1) == [fv.version]


def test_the_lease_of_a_dead_process_does_not_pin(tmp_path):
    _fake_version(tmp_path, "v-1")
    _fake_version(tmp_path, "v-2")
    versions.commit_version(tmp_path, "v-2")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "leases").mkdir()
    import socket

    (tmp_path / "leases" / "v-1.x.json").write_text(json.dumps(
        {"version": "v-1", "pid": int(dead.stdout), "host": socket.gethostname(), "expires_at": time.time() + 3600}))
    (tmp_path / "leases" / "v-2.y.json").write_text(json.dumps(
        {"version": "v-2", "pid": os.getpid(), "host": "elsewhere", "expires_at": time.time() - 1}))  # expired
    assert versions.collect_garbage(tmp_path, keep=1) == ["v-1"]
    assert versions.read_leases(tmp_path) == []


def test_a_lease_on_another_host_pins_until_it_expires(tmp_path):
    _fake_version(tmp_path, "v-1")
    _fake_version(tmp_path, "v-2")
    versions.commit_version(tmp_path, "v-2")
    (tmp_path / "leases").mkdir()
    (tmp_path / "leases" / "v-1.x.json").write_text(json.dumps(
        {"version": "v-1", "pid": 1, "host": "trainer-pod-0", "expires_at": time.time() + 3600}))
    assert versions.collect_garbage(tmp_path, keep=1) == []


def test_pinning_a_root_without_a_pointer_says_how_to_make_one(tmp_path):
    (tmp_path / "current.json").write_text(json.dumps({"version": "v-1"}))
    with pytest.raises(FileNotFoundError, match="points at v-1, which has no manifest.json"):
        with versions.pin(tmp_path):
            pass


def test_a_training_run_records_its_version_and_a_resume_pins_it_again(tmp_path):
    import contextlib

    root, run = tmp_path / "features", tmp_path / "run"
    run.mkdir()
    _fake_version(root, "v-1")
    versions.commit_version(root, "v-1")
    with contextlib.ExitStack() as held:
        assert versions.pin_on_rank0(held, root, "train", 0, run) == str(root / "v-1")
    assert json.loads((run / versions.RUN_RECORD).read_text())["version"] == "v-1"
    _fake_version(root, "v-2")
    versions.commit_version(root, "v-2")
    with contextlib.ExitStack() as held:  # --resume: the version it started on, not the current one
        assert versions.pin_on_rank0(held, root, "train", 0, run, resume=True) == str(root / "v-1")
        assert [lease["version"] for lease in versions.read_leases(root)] == ["v-1"]
    with contextlib.ExitStack() as held:  # a new run (no --resume) reads the current version
        assert versions.pin_on_rank0(held, root, "train", 0, run) == str(root / "v-2")


def test_a_resume_whose_version_was_collected_is_refused(tmp_path):
    import contextlib

    root, run = tmp_path / "features", tmp_path / "run"
    run.mkdir()
    _fake_version(root, "v-1")
    versions.commit_version(root, "v-1")
    with contextlib.ExitStack() as held:
        versions.pin_on_rank0(held, root, "train", 0, run)
    _fake_version(root, "v-2")
    versions.commit_version(root, "v-2")
    assert versions.collect_garbage(root, keep=1) == ["v-1"]
    with pytest.raises(FileNotFoundError, match="v-1 is gone .collected. or incomplete: a run that read it cannot "
                                                "resume"):
        with contextlib.ExitStack() as held:
            versions.pin_on_rank0(held, root, "train", 0, run, resume=True)


# ---------------------------------------------------------------------------------------------- integration

RANKER_STAGES = "items,users,timelines,popularity,ranking_samples"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "SPARK_LOCAL_IP": "127.0.0.1", "OMP_NUM_THREADS": "1"}


def _build(dataset: Path, root: Path, only: str, keep: int) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "build-features", "--dataset", str(dataset), "--out", str(root),
         "--versioned", "--keep-versions", str(keep), "--master", "local[2]", "--only", only,
         "spark.shuffle_partitions=2", "report.plot=false"], cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from features.datasets.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("versioned") / "dataset"
    generate(SynthConfig(events=4000, users=40, items=300, heavy_users=0, seed=0), out)
    return out


@pytest.mark.integration
def test_a_features_rewrite_while_a_reader_holds_version_n_neither_deletes_nor_modifies_it(dataset, tmp_path):
    root = tmp_path / "features"
    _build(dataset, root, "items,users", keep=1)
    n = versions.read_pointer(root)["version"]
    before = _tree_digest(root / n)
    # a reader in another process pins the current version (what a trainer does at start) and holds it
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from features.versions import pin
            with pin({str(root)!r}, job="test-reader", ttl_s=30) as fv:
                print(fv.version, flush=True)
                sys.stdin.read()   # hold until the test closes stdin
        """)], cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == n
        _build(dataset, root, "items,users", keep=1)   # N+1: committed, then collected (unpinned, not newest)
        _build(dataset, root, "items,users", keep=1)   # N+2
        current = versions.read_pointer(root)["version"]
        assert current != n
        assert versions.list_versions(root) == [n, current]
        assert _tree_digest(root / n) == before
    finally:
        reader.stdin.close()
        assert reader.wait(timeout=60) == 0
    assert versions.collect_garbage(root, keep=1) == [n]
    assert versions.list_versions(root) == [current]


TINY_RANKER = [
    "model.embedding.dim=8", "model.embedding.attention_dim=8", "model.embedding.pooled_dim=8",
    "model.sequence.short_len=10", "model.sequence.long=dare", "model.sequence.long_len=50", "model.sequence.top_k=8",
    "model.moe.num_experts=2", "model.moe.expert_hidden=[16]", "model.moe.gate_hidden=8",
    "data.batch_size=256", "data.eval_batch_size=128", "train.epochs=1", "train.max_steps_per_epoch=2", "train.seed=5",
]


@pytest.mark.integration
def test_train_ranker_on_a_versioned_root_reads_the_current_version_and_releases_its_lease(dataset, tmp_path):
    root = tmp_path / "features"
    _build(dataset, root, RANKER_STAGES, keep=2)
    n = versions.read_pointer(root)["version"]
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "jobs.cli", "train-ranker",
                          "--out", str(out), "--no-export", f"data.features_dir={root}", *TINY_RANKER], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["features_dir"] == str(root / n)
    assert f"reading version {n}" in res.stderr
    assert versions.read_leases(root) == []
