"""The chart lints, renders every ci/ scenario into valid Kubernetes objects, and documents its values."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

KUBE_VERSIONS = ("1.25.0", "1.37.0")  # Chart.yaml kubeVersion >=1.25 .. the newest kubernetes-validate knows
CRD_KINDS = {"ServiceMonitor", "PrometheusRule",  # Prometheus Operator CRDs: checked structurally below
             "ScheduledSparkApplication", "PyTorchJob"}  # against the operators' CRD schemas: test_chart_operators


def test_lint_is_clean(chart_dir: Path, values_of, scenario: str) -> None:
    import helm_python as helm

    report = helm.lint(chart_dir, values_of(scenario), strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # no warnings either (strict)


def test_every_object_is_valid_for_kubernetes(scenarios, scenario: str) -> None:
    import kubernetes_validate

    docs = [d for d in scenarios[scenario] if d["kind"] not in CRD_KINDS]
    assert docs
    for version in KUBE_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {e}")


def test_object_names_are_unique_and_labelled(scenarios, scenario: str) -> None:
    docs = scenarios[scenario]
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys))
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "cascade"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_optional_objects_follow_their_enabled_flags(scenarios) -> None:
    always = {"Deployment", "Service", "ConfigMap"}
    optional = {"HorizontalPodAutoscaler", "PodDisruptionBudget", "CronJob", "ServiceMonitor", "PrometheusRule",
                "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding"}
    assert scenarios["minimal"].kinds() == always
    assert scenarios["full"].kinds() == always | optional
    assert len(scenarios["full"].find("CronJob")) == 4  # pipeline, features, train-retriever, train-ranker
    assert scenarios["default"].kinds() == always | {"PodDisruptionBudget", "CronJob", "PersistentVolumeClaim",
                                                     "ServiceAccount"}


def test_service_monitor_scrapes_every_metrics_port(scenarios) -> None:
    docs = scenarios["full"]  # two server processes per pod: two metrics ports
    sm, svc = docs.one("ServiceMonitor"), docs.one("Service", "-metrics")
    public = docs.one("Service", "cascade")
    assert not sm["spec"]["selector"]["matchLabels"].items() <= public["metadata"]["labels"].items()
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["recsys"]
    metrics_ports = {p["name"] for p in svc["spec"]["ports"] if p["name"].startswith("metrics")}
    assert metrics_ports == {"metrics", "metrics-1"}
    assert {e["port"] for e in sm["spec"]["endpoints"]} == metrics_ports
    for e in sm["spec"]["endpoints"]:
        assert e["path"] == "/metrics" and re.fullmatch(r"\d+[smh]", e["interval"])


def test_prometheus_rule_is_well_formed(scenarios) -> None:
    rule = scenarios["full"].one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for r in group["rules"]:
            assert set(r) == {"alert", "expr", "for", "labels", "annotations"}
            assert r["labels"]["severity"] in {"critical", "warning", "info"}
            assert {"summary", "description"} <= set(r["annotations"])


def test_disabled_alerts_are_left_out(render) -> None:
    streaming = {"consumerLag", "eventFreshness", "consumerRestarts", "skippedRecords"}
    pipeline = {"pipeline", "gateRefused", "pipelineJobFailed"}
    names = ("latency", "errorRate", "shedRate", "degradedAnswers", "modelAge", "redisDown", *streaming, *pipeline)
    off = {name: {"enabled": False} for name in names if name not in streaming}
    rule = render({"prometheusRule": {"enabled": True, "alerts": off}}).one("PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["cascade-streaming"]
    off.update({name: {"enabled": False} for name in streaming})
    assert not render({"prometheusRule": {"enabled": True, "alerts": off}}).find("PrometheusRule")


def _alert_names(docs) -> list[str]:
    return [r["alert"] for g in docs.one("PrometheusRule")["spec"]["groups"] for r in g["rules"]]


def test_pipeline_outcome_alerts_need_a_pushgateway(render) -> None:
    """Without pipeline.run.pushgateway nothing is pushed: only the kube-state-metrics Job alert is rendered."""
    pushed = ("CascadePipelineFailed", "CascadeGateRefused")
    names = _alert_names(render({"prometheusRule": {"enabled": True}}))
    assert "CascadePipelineJobFailed" in names and not set(pushed) & set(names)
    names = _alert_names(render({"prometheusRule": {"enabled": True},
                                 "pipeline": {"run": {"pushgateway": "http://pgw:9091"}}}))
    assert [n for n in names if n.startswith(("CascadePipeline", "CascadeGate"))] == [*pushed, "CascadePipelineJobFailed"]


def test_no_pipeline_alerts_without_the_pipeline_cronjob(render) -> None:
    names = _alert_names(render({"prometheusRule": {"enabled": True},
                                 "pipeline": {"run": {"enabled": False, "pushgateway": "http://pgw:9091"}}}))
    assert not [n for n in names if n.startswith(("CascadePipeline", "CascadeGate"))]


def test_dashboards_are_configmaps_for_the_grafana_sidecar(scenarios, chart_dir: Path) -> None:
    sources = {p.name: json.loads(p.read_text()) for p in (chart_dir / "dashboards").glob("*.json")}
    assert len(sources) >= 2
    cms = scenarios["full"].find("ConfigMap")
    loaded = {}
    for cm in cms:
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1":
            assert cm["metadata"]["namespace"] == "monitoring"
            assert cm["metadata"]["annotations"] == {"grafana_folder": "Cascade"}
            loaded.update({name: json.loads(text) for name, text in cm["data"].items()})
    assert loaded == sources


# ----------------------------------------------------------------------------------------- values and schema
def _schema(chart_dir: Path) -> dict[str, Any]:
    return json.loads((chart_dir / "values.schema.json").read_text())


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _closed(node: dict[str, Any]) -> bool:
    return "properties" in node


def test_schema_is_draft07_and_closed_where_it_lists_keys(chart_dir: Path) -> None:
    schema = _schema(chart_dir)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def walk(node: dict[str, Any], path: str) -> None:
        node = _resolve(schema, node)
        if _closed(node):
            assert node.get("additionalProperties") is False, f"{path or '<root>'} lists keys but allows others"
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}" if path else key)

    walk(schema, "")


def test_schema_and_values_yaml_list_the_same_keys(chart_dir: Path) -> None:
    """server.config is the exception: values.yaml sets a few ServingConfig sections, the schema lists all of
    them (test_chart_server checks those against serving.config.ServingConfig)."""
    schema = _schema(chart_dir)
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        node = _resolve(schema, node)
        if not _closed(node):
            return
        assert isinstance(value, dict), path
        if path == "server.config":
            assert set(value) <= set(node["properties"])
            return
        assert set(value) == set(node["properties"]), f"{path or '<root>'}: values.yaml and the schema differ"
        for key, sub in node["properties"].items():
            walk(sub, value[key], f"{path}.{key}" if path else key)

    walk(schema, values, "")


def _keys_with_comments(text: str) -> Iterator[tuple[str, bool]]:
    """Yields (dotted key, has a comment) for every mapping key of values.yaml outside lists."""
    stack: list[tuple[int, str]] = []
    prev = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        m = re.match(r"^( *)([A-Za-z_][\w.-]*):(\s|$)", line)
        if m and not stripped.startswith("#"):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = ".".join([k for _, k in stack] + [m.group(2)])
            yield path, prev.startswith("#") or " # " in line
            stack.append((indent, m.group(2)))
        prev = stripped


def test_every_values_key_is_commented(chart_dir: Path) -> None:
    """Keys the schema lists need a comment; inside pass-through objects (securityContext, probes...) they don't."""
    schema = _schema(chart_dir)

    def listed(path: str) -> bool:
        node = schema
        for key in path.split("."):
            node = _resolve(schema, node)
            if not _closed(node) or key not in node["properties"]:
                return False
            node = node["properties"][key]
        return True

    missing = [path for path, commented in _keys_with_comments((chart_dir / "values.yaml").read_text())
               if listed(path) and not commented]
    assert missing == []


@pytest.mark.parametrize(("values", "message"), [
    ({"server": {"replicaCount": "two"}}, "at '/server/replicaCount': got string, want integer"),
    ({"server": {"replicas": 2}}, "additional properties 'replicas' not allowed"),
    ({"server": {"config": {"grpcc": {}}}}, "at '/server/config': additional properties 'grpcc' not allowed"),
    ({"pipeline": {"run": {"schedule": "daily"}}}, "/pipeline/run/schedule"),
    ({"pipeline": {"jobDefaults": {"concurrencyPolicy": "Sometimes"}}}, "/pipeline/jobDefaults/concurrencyPolicy"),
    ({"prometheusRule": {"alerts": {"consumerLag": {"for": "ten minutes"}}}}, "/prometheusRule/alerts/consumerLag/for"),
    ({"pipeline": {"run": {"pushgateway": "pgw:9091"}}}, "/pipeline/run/pushgateway"),
    ({"prometheusRule": {"alerts": {"pipeline": {"maxSuccessAgeHours": 0}}}},
     "/prometheusRule/alerts/pipeline/maxSuccessAgeHours"),
])
def test_schema_rejects_bad_values_naming_the_key(render, values: dict[str, Any], message: str) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(values)
