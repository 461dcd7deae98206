"""The operator commands: `cascade --version`, `cascade config show|validate`, `cascade pipeline promote|rollback`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import main

REPO = Path(__file__).resolve().parents[2]


def _cascade(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=120)


# ---------------------------------------------------------------------------------------------- --version


def test_version_names_the_package_version_and_the_commit() -> None:
    from importlib.metadata import version

    res = _cascade("--version")
    assert res.returncode == 0, res.stderr
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    line = res.stdout.strip()
    assert line.startswith(f"cascade {version('cascade')} (git {commit}")


# ---------------------------------------------------------------------------------------------- config


def test_config_show_prints_the_config_the_job_would_run_with(capsys) -> None:
    from jobs.train_ranker import load_ranker_config

    files = ["ranking/configs/ml-100k.yaml", "ranking/configs/ablations/din.yaml"]
    argv = ["config", "show", "ranker", *[a for f in files for a in ("--config", str(REPO / f))], "train.epochs=7"]
    assert main(argv) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    from features.config import to_dict

    assert shown == to_dict(load_ranker_config([REPO / f for f in files], ["train.epochs=7"]))
    assert shown["train"]["epochs"] == 7


def test_config_show_serve_takes_the_environment_and_masks_passwords() -> None:
    res = _cascade("config", "show", "serve", "--config", "serving/serving.example.yaml", "grpc.max_workers=3",
                   env={"CASCADE_REDIS_PASSWORD": "s3cret-value", "CASCADE_REDIS_URL": "redis://10.0.0.5:6379/1"})
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["grpc"]["max_workers"] == 3 and shown["redis"]["url"] == "redis://10.0.0.5:6379/1"
    assert shown["redis"]["password"] == "***" and "s3cret-value" not in res.stdout


@pytest.mark.parametrize("kind, config", [("serve", "serving/serving.example.yaml"),
                                          ("retriever", "retrieval/configs/ml-1m.yaml"),
                                          ("ranker", "ranking/configs/two-stage.yaml")])
def test_config_validate_accepts_the_shipped_configs(kind: str, config: str, capsys) -> None:
    assert main(["config", "validate", kind, "--config", str(REPO / config)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {kind} config")


def test_config_validate_accepts_the_readme_pipeline_example(tmp_path, capsys) -> None:
    readme = (REPO / "README.md").read_text()
    example = readme.split("Example `pipeline.yaml`")[1].split("```yaml\n")[1].split("```")[0]
    (tmp_path / "pipeline.yaml").write_text(example)
    assert main(["config", "validate", "pipeline", "--config", str(tmp_path / "pipeline.yaml")]) == 0
    assert capsys.readouterr().out.startswith("ok: pipeline config")


def test_config_validate_names_the_file_and_key_of_an_unknown_key(tmp_path, capsys) -> None:
    bad = tmp_path / "ablation.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    rc = main(["config", "validate", "ranker", "--config", str(REPO / "ranking/configs/ml-100k.yaml"),
               "--config", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{bad}: train: unknown key(s) ['epochz']" in err


def test_config_validate_names_a_bad_value(tmp_path, capsys) -> None:
    bad = tmp_path / "features.yaml"
    bad.write_text("sequence:\n  long_cap: many\n")
    assert main(["config", "validate", "features", "--config", str(bad)]) == 1
    assert f"{bad}: sequence.long_cap: expected an integer, got 'many'" in capsys.readouterr().err


def test_config_validate_blames_an_override_when_the_files_are_fine(capsys) -> None:
    rc = main(["config", "validate", "retriever", "--config", str(REPO / "retrieval/configs/ml-1m.yaml"),
               "train.lr=fast"])
    assert rc == 1
    assert "overrides train.lr=fast: train.lr: expected a number, got 'fast'" in capsys.readouterr().err


def test_config_validate_refuses_a_second_file_for_a_single_file_job(capsys) -> None:
    f = str(REPO / "serving/serving.example.yaml")
    assert main(["config", "validate", "serve", "--config", f, "--config", f]) == 1
    assert "serve takes one --config file, got 2" in capsys.readouterr().err


def test_config_validate_reports_a_missing_file(tmp_path, capsys) -> None:
    assert main(["config", "validate", "serve", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert f"config file {tmp_path / 'nope.yaml'} does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- promote / rollback


def _bundle(root: Path, version: str) -> tuple[Path, str]:
    """A bundle as `write_bundle` writes it, over stand-in export directories (checksums are what is tested)."""
    from features.transforms import DenseLayout, StatsConfig
    from serving.models import write_bundle

    for part in ("retriever", "ranker"):
        d = root / f"{part}-{version}"
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(f"{part} {version}".encode())
    bundle = root / "versions" / version / "bundle"
    checksum = write_bundle(bundle, version, ("retrieval.export", root / f"retriever-{version}"),
                            ("ranking.export", root / f"ranker-{version}"), DenseLayout(StatsConfig(), 0.5, ()))
    return bundle, checksum


def _publish(artifacts: Path, version: str, bundle: Path, checksum: str) -> None:
    from jobs.pipeline import record_published

    record_published(artifacts, {"version": version, "bundle": str(bundle.resolve()), "checksum": checksum,
                                 "published_at": "2026-12-01T00:00:00+00:00", "metrics": {"ranker": {"auc": 0.7}}})


@pytest.fixture()
def artifacts(tmp_path: Path) -> Path:
    """v1, v2, v3 published in that order (v3 current)."""
    for v in ("v1", "v2", "v3"):
        _publish(tmp_path, v, *_bundle(tmp_path, v))
    return tmp_path


def _pipeline(artifacts: Path, *argv: str) -> int:
    return main(["pipeline", *argv, f"artifacts={artifacts}", "publish.announce=false"])


def _published(artifacts: Path) -> dict:
    return json.loads((artifacts / "published.json").read_text())


def _history(artifacts: Path) -> list[dict]:
    return [json.loads(line) for line in (artifacts / "history.jsonl").read_text().splitlines()]


def test_rollback_goes_to_the_previous_version_and_records_it(artifacts) -> None:
    assert _pipeline(artifacts, "rollback") == 0
    pub = _published(artifacts)
    assert (pub["version"], pub["action"], pub["rolled_back_from"]) == ("v2", "rollback", "v3")
    assert pub["checksum"] == _history(artifacts)[1]["checksum"]
    assert _history(artifacts)[-1] == pub and len(_history(artifacts)) == 4


def test_repeated_rollbacks_walk_back_instead_of_alternating(artifacts) -> None:
    assert _pipeline(artifacts, "rollback") == 0
    assert _pipeline(artifacts, "rollback") == 0
    assert _published(artifacts)["version"] == "v1"
    assert _pipeline(artifacts, "rollback") == 1  # nothing before v1


def test_rollback_to_a_named_version_and_promote_forward_again(artifacts) -> None:
    assert _pipeline(artifacts, "rollback", "--to", "v1") == 0
    assert _published(artifacts)["version"] == "v1"
    assert _pipeline(artifacts, "promote", "v3") == 0
    pub = _published(artifacts)
    assert (pub["version"], pub["action"]) == ("v3", "promote")
    assert [r["version"] for r in _history(artifacts)] == ["v1", "v2", "v3", "v1", "v3"]


def test_promote_refuses_a_version_that_was_never_published(artifacts, capsys) -> None:
    before = (artifacts / "published.json").read_bytes()
    assert _pipeline(artifacts, "promote", "v9") == 1
    assert "version 'v9' was never published" in capsys.readouterr().err
    assert (artifacts / "published.json").read_bytes() == before


def test_promote_refuses_a_bundle_whose_files_fail_their_checksum(artifacts, capsys) -> None:
    weights = artifacts / "versions" / "v1" / "bundle" / "ranker" / "weights.bin"
    weights.write_bytes(b"tampered")
    before = (artifacts / "history.jsonl").read_bytes()
    assert _pipeline(artifacts, "promote", "v1") == 1
    err = capsys.readouterr().err
    assert "fails verification, not promoted" in err and "checksum_mismatch" in err
    assert (artifacts / "history.jsonl").read_bytes() == before and _published(artifacts)["version"] == "v3"


def test_promote_refuses_a_bundle_that_is_gone(artifacts, capsys) -> None:
    shutil.rmtree(artifacts / "versions" / "v2" / "bundle")
    assert _pipeline(artifacts, "promote", "v2") == 1
    assert "fails verification" in capsys.readouterr().err


@pytest.mark.integration
def test_a_rollback_is_announced_and_the_running_server_swaps_to_it(services, model_bundles, make_server,
                                                                    wait_until, tmp_path) -> None:
    """Through the server's normal path: the models topic, checksum verification, smoke test, hot swap."""
    h = make_server(bundle="v2")
    assert h.rank(1, k=5).model_version == "v2"
    for v in ("v1", "v2"):
        _publish(tmp_path, v, *model_bundles[v])
    rc = main(["pipeline", "rollback", f"artifacts={tmp_path}", f"publish.kafka_bootstrap={services.kafka.address}",
               f"publish.models_topic={h.topics.models}"])
    assert rc == 0 and _published(tmp_path)["version"] == "v1"
    wait_until(lambda: h.rank(1, k=5).model_version == "v1", timeout_s=60, what="hot swap to the rolled-back v1")


# the serving fixtures (real tansu + redis-server, real bundles, an in-process server)
from tests.serving.conftest import catalog, make_server, model_bundles, services, wait_until  # noqa: E402,F401
