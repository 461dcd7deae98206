"""The operator-based jobs: the features job as a Spark operator ScheduledSparkApplication and the trainers
as Kubeflow training operator PyTorchJobs, validated against the operators' published CRD schemas, with
command lines the project's own parsers accept.

The schemas in tests/helm/crds/ are the `openAPIV3Schema` of the CRDs as published (Apache-2.0), with
their `description` strings removed (documentation only; see tests/helm/crds/README.md for the source
commits and the command that extracts them). As `kubectl apply` does with strict field validation, an
object with a key its schema does not list is rejected (objects that list properties are closed here).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pytest

CRDS = Path(__file__).resolve().parent / "crds"
REPO = Path(__file__).resolve().parents[2]
SCHEMAS = {
    ("sparkoperator.k8s.io/v1beta2", "ScheduledSparkApplication"):
        "sparkoperator.k8s.io_scheduledsparkapplications.v1beta2.schema.json",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.v1.schema.json",
}


def _closed(node: Any) -> Any:
    """Every object schema that lists properties rejects other keys (unless it keeps unknown fields)."""
    if isinstance(node, list):
        return [_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validate():
    import jsonschema

    validators = {key: jsonschema.Draft7Validator(_closed(json.loads((CRDS / name).read_text())))
                  for key, name in SCHEMAS.items()}

    def check(doc: dict[str, Any]) -> None:
        v = validators[(doc["apiVersion"], doc["kind"])]
        errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{doc['kind']}/{doc['metadata']['name']} at "
                                     f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])

    return check


@pytest.fixture(scope="module")
def operators(scenarios):
    return scenarios["operators"]


def test_operator_objects_are_valid_for_their_crds(scenarios, validate) -> None:
    seen = set()
    for docs in scenarios.values():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in SCHEMAS:
                validate(doc)
                seen.add(doc["kind"])
    assert seen == {"ScheduledSparkApplication", "PyTorchJob"}


def test_the_validator_rejects_what_the_api_server_would(operators, validate) -> None:
    ssa = copy.deepcopy(operators.one("ScheduledSparkApplication"))
    ssa["spec"]["template"]["executor"]["instances"] = "8"
    with pytest.raises(AssertionError, match="executor/instances"):
        validate(ssa)
    job = copy.deepcopy(operators.one("PyTorchJob", "-train-ranker"))
    job["spec"]["elasticPolicy"] = {"rdzvBackend": "c10d", "minReplica": 1}  # misspelled key
    with pytest.raises(AssertionError, match="minReplica"):
        validate(job)


def test_operators_are_off_by_default(scenarios) -> None:
    for name in ("default", "full", "minimal"):
        assert not scenarios[name].kinds() & {"ScheduledSparkApplication", "PyTorchJob"}, name


def test_operators_replace_the_cronjobs_they_take_over(operators) -> None:
    assert [cj["metadata"]["name"] for cj in operators.find("CronJob")] == ["cascade-pipeline"]
    assert operators.one("ScheduledSparkApplication")["metadata"]["name"] == "cascade-features"
    assert sorted(j["metadata"]["name"] for j in operators.find("PyTorchJob")) == [
        "cascade-train-ranker", "cascade-train-retriever"]
    # the operator's driver creates the executor pods with the chart's ServiceAccount
    ssa = operators.one("ScheduledSparkApplication")
    binding = operators.one("RoleBinding", "-spark")
    assert binding["subjects"][0]["name"] == ssa["spec"]["template"]["driver"]["serviceAccount"]


def test_spark_application_runs_build_features_with_its_flags(operators) -> None:
    from jobs.build_features import add_arguments

    ssa = operators.one("ScheduledSparkApplication")
    spec, app = ssa["spec"], ssa["spec"]["template"]
    assert (spec["schedule"], spec["concurrencyPolicy"], spec["timeZone"]) == ("0 1 * * *", "Forbid", "Europe/Berlin")
    assert (app["type"], app["mode"], app["pythonVersion"]) == ("Python", "cluster", "3")
    assert app["image"] == "registry.example.com/recsys/cascade-spark:0.1.0"
    assert app["mainApplicationFile"] == "local:///opt/cascade/jobs/build_features.py"
    assert (REPO / "jobs" / "build_features.py").is_file()  # the image holds the repository at /opt/cascade
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(app["arguments"])
    assert (args.dataset, args.out) == ("s3a://recsys-data/events", "s3a://recsys-features/current")
    assert str(args.config) == "/etc/cascade/features.yaml"
    # per-role resources; object storage instead of a shared volume
    assert (app["driver"]["cores"], app["driver"]["memory"]) == (1, "4g")
    assert (app["executor"]["instances"], app["executor"]["cores"], app["executor"]["memory"]) == (8, 4, "16g")
    assert app["hadoopConf"]["fs.s3a.endpoint"] == "https://s3.example.com"
    assert app["sparkConf"] == {"spark.hadoop.fs.s3a.fast.upload": "true", "spark.sql.shuffle.partitions": "400"}
    assert "volumeMounts" not in app["executor"] and [v["name"] for v in app["volumes"]] == ["config"]
    assert app["executor"]["envFrom"] == [{"secretRef": {"name": "cascade-artifacts-s3"}}]
    assert app["restartPolicy"]["type"] == "OnFailure" and app["imagePullSecrets"] == ["regcred"]


def test_spark_application_can_mount_the_artifacts_volume(render, values_of, validate) -> None:
    values = values_of("operators")
    values["pipeline"]["spark"]["operator"].update(mountArtifacts=True, retries=0)
    values["pipeline"]["features"]["out"] = ""
    app = render(values).one("ScheduledSparkApplication")["spec"]["template"]
    for role in ("driver", "executor"):
        mounts = {m["name"]: m["mountPath"] for m in app[role]["volumeMounts"]}
        assert mounts["artifacts"] == "/var/lib/cascade/artifacts"
    claim = {v["name"]: v for v in app["volumes"]}["artifacts"]["persistentVolumeClaim"]["claimName"]
    assert claim == "cascade-artifacts"
    assert app["arguments"][app["arguments"].index("--out") + 1] == "/var/lib/cascade/artifacts/features/current"
    assert app["restartPolicy"] == {"type": "Never"}


def _replica_specs(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return job["spec"]["pytorchReplicaSpecs"]


def _container(replica: dict[str, Any]) -> dict[str, Any]:
    (c,) = replica["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("suffix", ["-train-retriever", "-train-ranker"])
def test_pytorchjob_is_torchrun_of_the_cli_on_master_and_workers(operators, suffix: str) -> None:
    from jobs.cli import build_parser

    job = operators.one("PyTorchJob", suffix)
    specs = _replica_specs(job)
    assert {t: s["replicas"] for t, s in specs.items()} == {"Master": 1, "Worker": 2}
    assert job["spec"]["nprocPerNode"] == "1" and "elasticPolicy" not in job["spec"]
    for replica in specs.values():
        c = _container(replica)
        assert c["name"] == "pytorch" and c["ports"][0]["name"] == "pytorchjob-port"  # what the operator looks for
        assert c["image"] == "registry.example.com/recsys/cascade-cuda:0.1.0"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        argv = c["command"]
        # torchrun reads PET_NNODES / PET_NODE_RANK / PET_NPROC_PER_NODE, set by the operator
        assert argv[:5] == ["torchrun", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)", "-m", "jobs.cli"]
        args = build_parser().parse_args(argv[5:])
        assert args.command == suffix.removeprefix("-") and str(args.out).startswith("/var/lib/cascade/artifacts/runs/")


def test_pytorchjob_elastic_policy_uses_workers_only(render, values_of, validate) -> None:
    values = values_of("operators")
    values["pipeline"]["torchrun"]["operator"].update(nodes=4, gpusPerNode=0,
                                                      elastic={"enabled": True, "minNodes": 2, "maxRestarts": 5})
    job = render(values).one("PyTorchJob", "-train-ranker")
    validate(job)
    assert job["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 4, "maxRestarts": 5}
    specs = _replica_specs(job)
    assert list(specs) == ["Worker"] and specs["Worker"]["replicas"] == 4
    c = _container(specs["Worker"])
    assert c["command"][:3] == ["torchrun", "-m", "jobs.cli"]  # rendezvous, nnodes MIN:MAX from PET_* variables
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_elastic_min_nodes_above_nodes_is_refused(render, values_of) -> None:
    import helm_python as helm

    values = values_of("operators")
    values["pipeline"]["torchrun"]["operator"].update(nodes=2, elastic={"enabled": True, "minNodes": 3})
    with pytest.raises(helm.HelmRenderError, match=r"elastic.minNodes \(3\) must be <= .*nodes \(2\)"):
        render(values)
