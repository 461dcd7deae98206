"""The pipeline CronJobs: schedule policy, and command lines the project's own parsers accept."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _pod(cronjob: dict[str, Any]) -> dict[str, Any]:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _command(cronjob: dict[str, Any]) -> list[str]:
    (container,) = _pod(cronjob)["containers"]
    return container["command"] + container.get("args", [])


def _after(argv: list[str], token: str) -> list[str]:
    return argv[argv.index(token) + 1:]


def _repo_path(path: str) -> Path:
    """A path in the image's working directory (the repository) -> the same file in this checkout."""
    return REPO / path


def test_cronjobs_never_overlap_and_are_bounded(scenarios, scenario: str) -> None:
    for cj in scenarios[scenario].find("CronJob"):
        spec, job = cj["spec"], cj["spec"]["jobTemplate"]["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        assert len(spec["schedule"].split()) == 5
        assert job["backoffLimit"] >= 0 and job["activeDeadlineSeconds"] > 0 and job["ttlSecondsAfterFinished"] > 0
        pod = _pod(cj)
        assert pod["restartPolicy"] == "Never"
        (container,) = pod["containers"]
        assert container["resources"]["requests"]["cpu"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["artifacts"]["readOnly"] is False and mounts["config"]["mountPath"] == "/etc/cascade"


def test_run_id_comes_from_the_job_name(scenarios) -> None:
    for cj in scenarios["full"].find("CronJob"):
        (container,) = _pod(cj)["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["CASCADE_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['job-name']"
        for arg in _command(cj):
            if "$(" in arg:  # Kubernetes expands $(VAR) from the container's env
                assert arg.count("$(") == 1 and arg.split("$(")[1].split(")")[0] in env


@pytest.mark.parametrize("name", ["default", "full"])  # (minimal has no CronJobs)
def test_pipeline_job_runs_cascade_pipeline_run(scenarios, name: str, tmp_path: Path) -> None:
    """The CronJob's command line and ConfigMap, parsed and loaded by jobs/pipeline.py itself."""
    from jobs.cli import build_parser

    docs = scenarios[name]
    argv = _command(docs.one("CronJob", "-pipeline"))
    assert argv[:5] == ["cascade", "pipeline", "run", "--config", "/etc/cascade/pipeline.yaml"]
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "pipeline" in commands, "jobs.cli does not register jobs.pipeline: `cascade pipeline run` would fail"
    args = parser.parse_args(argv[1:])

    from jobs.pipeline import load_pipeline_config

    config = tmp_path / "pipeline.yaml"
    config.write_text(docs.one("ConfigMap", "-jobs")["data"]["pipeline.yaml"])
    assert Path(args.config) == Path("/etc/cascade/pipeline.yaml")
    cfg = load_pipeline_config(config, args.overrides)
    assert cfg.artifacts == "/var/lib/cascade/artifacts"  # the servers' allowed model root
    (container,) = _pod(docs.one("CronJob", "-pipeline"))["containers"]
    kafka = next(e["value"] for e in container["env"] if e["name"] == "CASCADE_KAFKA_BOOTSTRAP")
    assert cfg.publish.kafka_bootstrap == kafka
    if name == "full":
        assert cfg.ranker.world_size == 2 and cfg.features.spark_master == "local[4]"
        assert "train.epochs=2" in cfg.ranker.overrides
        # the run pushes its outcome to the group the pipeline alerts select
        assert cfg.metrics.pushgateway == "http://prometheus-pushgateway.monitoring:9091"
        assert (cfg.metrics.job, dict(cfg.metrics.grouping)) == ("cascade-pipeline", {"namespace": "recsys"})
        rules = docs.one("PrometheusRule")["spec"]["groups"]
        (failed,) = [r for g in rules for r in g["rules"] if r["alert"] == "CascadePipelineFailed"]
        assert 'job="cascade-pipeline",namespace="recsys"' in failed["expr"]
    else:
        assert not cfg.metrics.pushgateway  # nothing pushed by default


def test_pipeline_job_needs_a_dataset(render) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match="pipeline.run.config needs dataset"):
        render({"pipeline": {"run": {"config": {"dataset": ""}}}})
    docs = render({"pipeline": {"run": {"config": {"dataset": None, "features": {"dir": "/prebuilt"}}}}})
    assert docs.one("CronJob", "-pipeline")


def test_features_job_is_a_spark_submit_of_build_features(scenarios) -> None:
    from jobs.build_features import add_arguments

    docs = scenarios["full"]
    argv = _command(docs.one("CronJob", "-features"))
    assert argv[:3] == ["spark-submit", "--master", "k8s://https://kubernetes.default.svc:443"]
    script = next(a for a in argv if a.endswith(".py"))
    assert script == "/opt/cascade/jobs/build_features.py" and _repo_path("jobs/build_features.py").is_file()
    submit = argv[1:argv.index(script)]
    confs = dict(submit[i + 1].split("=", 1) for i, a in enumerate(submit) if a == "--conf")
    assert confs["spark.driver.host"] == "$(POD_IP)" and confs["spark.executor.instances"] == "4"
    assert confs["spark.kubernetes.container.image"] == "registry.example.com/recsys/cascade:0.1.0"

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(_after(argv, script))
    assert (args.dataset, args.out) == ("s3a://recsys-data/events", "/var/lib/cascade/artifacts/features")
    assert str(args.config) == "/etc/cascade/features.yaml"
    assert args.versioned and args.keep_versions == 3 and not args.overwrite  # a new version per run
    assert args.overrides == ["sequence.long_cap=2000"]


def test_trainers_read_the_versioned_root_the_features_job_writes(scenarios) -> None:
    """Clock-scheduled jobs share a versioned root: features commit versions, trainers pin the current one."""
    from jobs.build_features import add_arguments
    from jobs.cli import build_parser

    docs = scenarios["full"]
    argv = _command(docs.one("CronJob", "-features"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = parser.parse_args(_after(argv, next(a for a in argv if a.endswith(".py")))).out
    retriever = build_parser().parse_args(_command(docs.one("CronJob", "-train-retriever"))[6:])
    ranker = build_parser().parse_args(_command(docs.one("CronJob", "-train-ranker"))[6:])
    assert str(retriever.features) == out
    assert f"data.features_dir={out}" in ranker.overrides


def test_unversioned_features_are_replaced_in_place_only_when_asked(render) -> None:
    docs = render({"pipeline": {"features": {"enabled": True, "dataset": "/data/events", "versioned": False},
                                "trainRanker": {"enabled": True}}})
    argv = _command(docs.one("CronJob", "-features"))
    assert argv[argv.index("--out") + 1] == "/var/lib/cascade/artifacts/features/current"
    assert "--overwrite" in argv and "--versioned" not in argv
    assert "data.features_dir=/var/lib/cascade/artifacts/features/current" in _command(docs.one("CronJob", "-train-ranker"))


def test_a_versioned_root_on_object_storage_is_refused(render) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match="pipeline.features.out s3a://b/f is a URI: a versioned features root"):
        render({"pipeline": {"features": {"enabled": True, "dataset": "/data/events", "out": "s3a://b/f"}}})


def test_features_config_loads_through_its_loader(scenarios, tmp_path: Path) -> None:
    from features.config import load_config
    from features.spark.config import FeatureBuildConfig

    path = tmp_path / "features.yaml"
    path.write_text(scenarios["full"].one("ConfigMap", "-jobs")["data"]["features.yaml"])
    assert load_config(FeatureBuildConfig, path).spark.shuffle_partitions == 400


def test_spark_on_kubernetes_gets_its_token_and_rbac(scenarios) -> None:
    docs = scenarios["full"]
    pod = _pod(docs.one("CronJob", "-features"))
    assert pod["automountServiceAccountToken"] is True
    assert all(_pod(cj)["automountServiceAccountToken"] is False for cj in docs.find("CronJob")
               if not cj["metadata"]["name"].endswith("-features"))
    binding = docs.one("RoleBinding", "-spark")
    assert binding["roleRef"]["name"] == docs.one("Role", "-spark")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    (container,) = pod["containers"]
    assert {e["name"] for e in container["env"]} >= {"POD_IP", "POD_NAME"}


def test_local_spark_master_needs_no_token(render) -> None:
    docs = render({"pipeline": {"features": {"enabled": True, "dataset": "/data/events"}}})
    argv = _command(docs.one("CronJob", "-features"))
    assert argv[argv.index("--master") + 1] == "local[*]"
    assert not any(a.startswith("spark.kubernetes.") for a in argv)
    assert _pod(docs.one("CronJob", "-features"))["automountServiceAccountToken"] is False
    assert not docs.find("Role")


def test_features_job_requires_a_dataset(render) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match="pipeline.features.dataset is required"):
        render({"pipeline": {"features": {"enabled": True}}})


@pytest.mark.parametrize(("suffix", "command"), [("-train-retriever", "train-retriever"),
                                                  ("-train-ranker", "train-ranker")])
def test_training_jobs_are_torchrun_of_the_cli(scenarios, suffix: str, command: str) -> None:
    from jobs.cli import build_parser

    cj = scenarios["full"].one("CronJob", suffix)
    argv = _command(cj)
    assert argv[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=4"]
    assert argv[4:7] == ["-m", "jobs.cli", command]
    args = build_parser().parse_args(argv[6:])
    assert args.command == command and str(args.out).startswith("/var/lib/cascade/artifacts/runs/")
    configs = args.config if isinstance(args.config, list) else [args.config]
    for config in configs:  # shipped in the image's working directory: the repository
        assert _repo_path(str(config)).is_file(), config
    features = "/var/lib/cascade/artifacts/features"  # the versioned root: the trainer pins its current version
    assert str(getattr(args, "features", "")) == features or f"data.features_dir={features}" in args.overrides
    shm = {v["name"]: v for v in _pod(cj)["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"


def test_pipeline_config_is_rendered_verbatim(render) -> None:
    config = {"dataset": "/data/ml-1m", "gate": {"min_auc": 0.6}}
    docs = render({"pipeline": {"run": {"config": config}}})
    assert yaml.safe_load(docs.one("ConfigMap", "-jobs")["data"]["pipeline.yaml"]) == config
