"""The ranking server's Deployment: a config the server accepts, its environment, probes, shutdown and security."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml


def _container(docs) -> dict[str, Any]:
    (container,) = docs.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_rendered_serving_config_loads_through_the_servers_loader(scenarios, scenario: str, tmp_path: Path) -> None:
    """The ConfigMap plus the container's environment is what `cascade serve` will read: it must load."""
    from serving.app import ENV_OVERRIDES, SECRET_ENV, load_serving_config

    docs = scenarios[scenario]
    config = tmp_path / "serving.yaml"
    config.write_text(docs.one("ConfigMap", "-server")["data"]["serving.yaml"])
    container = _container(docs)
    env = _plain_env(container)
    secret_env = {e["name"] for e in container["env"] if "valueFrom" in e}
    assert "CASCADE_REDIS_URL" in secret_env and secret_env <= {"CASCADE_REDIS_URL", *SECRET_ENV}
    env["CASCADE_REDIS_URL"] = "redis://:secret@redis-master:6379/0"  # what the Secret would hold
    if scenario == "secure":
        env["CASCADE_REDIS_URL"] = "rediss://redis-master:6379/0"
    env.update({name: "from-a-secret" for name in secret_env & set(SECRET_ENV)})

    cfg = load_serving_config(config, env=env)

    assert {k for k in env if k.startswith("CASCADE_")} <= set(ENV_OVERRIDES) | set(SECRET_ENV)
    assert cfg.grpc.address == "0.0.0.0:50051" and cfg.grpc.probe_address == "0.0.0.0:50052"
    assert cfg.metrics.address == "0.0.0.0:9464"
    assert cfg.redis.url == env["CASCADE_REDIS_URL"]
    assert cfg.kafka.bootstrap == env["CASCADE_KAFKA_BOOTSTRAP"]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "artifacts")
    assert cfg.models.allowed_roots == (Path(mount),)
    if cfg.models.initial_bundle is not None:
        assert cfg.models.initial_bundle.is_relative_to(mount)


def test_full_scenario_config_reaches_the_server(scenarios, tmp_path: Path) -> None:
    from serving.app import load_serving_config

    docs = scenarios["full"]
    config = tmp_path / "serving.yaml"
    config.write_text(docs.one("ConfigMap", "-server")["data"]["serving.yaml"])
    env = _plain_env(_container(docs)) | {"CASCADE_REDIS_URL": "redis://r:6379/0"}
    cfg = load_serving_config(config, env=env)
    assert (cfg.grpc.processes, cfg.grpc.max_in_flight, cfg.grpc.shutdown_grace_s) == (2, 64, 10.0)
    assert cfg.kafka.fetch_max_bytes == 33554432 and cfg.kafka.events_group == "cascade-prod-events"
    assert str(cfg.models.initial_bundle) == "/var/lib/cascade/artifacts/models/v1"
    assert cfg.labels == {"environment": "production"}


def test_server_config_sections_in_the_schema_are_servingconfig_fields(chart_dir: Path) -> None:
    from serving.config import ServingConfig

    schema = json.loads((chart_dir / "values.schema.json").read_text())
    sections = schema["properties"]["server"]["properties"]["config"]["properties"]
    assert set(sections) == {f.name for f in dataclasses.fields(ServingConfig)}


def test_server_runs_cascade_serve_with_the_mounted_config(scenarios, scenario: str) -> None:
    docs = scenarios[scenario]
    container = _container(docs)
    assert container["command"] + container["args"] == ["cascade", "serve", "--config", "/etc/cascade/serving.yaml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/cascade"]["readOnly"] is True
    volumes = {v["name"]: v for v in docs.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    config_map = docs.one("ConfigMap", "-server")["metadata"]["name"]
    assert volumes[mounts["/etc/cascade"]["name"]]["configMap"]["name"] == config_map


def test_redis_url_comes_from_the_referenced_secret_only(render_files) -> None:
    files = render_files({"redis": {"existingSecret": "my-redis", "urlKey": "the-url"}})
    deployment = next(text for path, text in files.items() if path.endswith("deployment.yaml"))
    assert "secretKeyRef:\n                  name: my-redis\n                  key: the-url" in deployment
    assert "redis://" not in "".join(files.values())  # no URL (or password) in any object


def test_ports_and_service(scenarios) -> None:
    docs = scenarios["full"]  # two server processes per pod
    ports = {p["name"]: p["containerPort"] for p in _container(docs)["ports"]}
    assert ports == {"grpc": 50051, "probe": 50052, "metrics": 9464, "metrics-1": 9465}
    svc = {p["name"]: (p["port"], p["targetPort"]) for p in docs.one("Service", "cascade")["spec"]["ports"]}
    assert svc == {"grpc": (50051, "grpc")}  # the public Service: no /metrics
    metrics = docs.one("Service", "-metrics")["spec"]
    assert metrics["clusterIP"] == "None"
    assert {p["name"]: (p["port"], p["targetPort"]) for p in metrics["ports"]} == {
        "metrics": (9464, "metrics"), "metrics-1": (9465, "metrics-1")}


def test_probes_use_the_health_names_of_the_server_on_the_probe_port(scenarios, scenario: str) -> None:
    from serving.health import live_service
    from serving.servicer import SERVICE_NAME

    container = _container(scenarios[scenario])
    for probe in ("startupProbe", "readinessProbe"):
        # readiness: "" (= cascade.v1.Ranking), SERVING while the server can answer, degraded or not
        assert container[probe]["grpc"] == {"port": 50052, "service": ""}
    assert container["livenessProbe"]["grpc"] == {"port": 50052, "service": live_service(SERVICE_NAME)}


def test_probe_port_follows_server_ports_probe(render) -> None:
    container = _container(render({"server": {"ports": {"grpc": 6000, "probe": 6001}}}))
    assert container["readinessProbe"]["grpc"]["port"] == 6001
    assert _plain_env(container)["CASCADE_GRPC_ADDRESS"] == "0.0.0.0:6000"
    assert _plain_env(container)["CASCADE_PROBE_ADDRESS"] == "0.0.0.0:6001"


def test_grace_period_outlasts_the_servers_drain(scenarios, scenario: str) -> None:
    docs = scenarios[scenario]
    spec = docs.one("Deployment")["spec"]["template"]["spec"]
    grace = yaml.safe_load(docs.one("ConfigMap", "-server")["data"]["serving.yaml"]).get("grpc", {}).get(
        "shutdown_grace_s", 5.0)
    assert spec["terminationGracePeriodSeconds"] >= grace + 11


def test_too_short_grace_period_fails_the_render(render) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match=r"terminationGracePeriodSeconds \(20\) must be >= .* = 21"):
        render({"server": {"terminationGracePeriodSeconds": 20, "config": {"grpc": {"shutdown_grace_s": 10}}}})


def test_config_checksum_rolls_the_pods(render) -> None:
    def checksum(values: dict[str, Any]) -> str:
        return render(values).one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) == checksum({"server": {"replicaCount": 3}})
    assert checksum({}) != checksum({"server": {"config": {"grpc": {"max_in_flight": 16}}}})


def test_pods_run_as_non_root_on_a_read_only_root(scenarios, scenario: str) -> None:
    docs = scenarios[scenario]
    pod_specs = [docs.one("Deployment")["spec"]["template"]["spec"]]
    pod_specs += [cj["spec"]["jobTemplate"]["spec"]["template"]["spec"] for cj in docs.find("CronJob")]
    for spec in pod_specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # the writable scratch space


def test_hpa_owns_the_replica_count(scenarios) -> None:
    full, default = scenarios["full"], scenarios["default"]
    assert "replicas" not in full.one("Deployment")["spec"]
    assert default.one("Deployment")["spec"]["replicas"] == 2
    hpa = full.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == full.one("Deployment")["metadata"]["name"]
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 60
    assert metrics["Pods"]["pods"]["metric"]["name"] == "cascade_requests_in_flight"


def test_scheduling_presets(scenarios, render) -> None:
    full = scenarios["full"].one("Deployment")["spec"]["template"]["spec"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in full["affinity"]["podAntiAffinity"]
    (spread,) = full["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ranking-server"
    assert "affinity" not in scenarios["minimal"].one("Deployment")["spec"]["template"]["spec"]
    pdb = scenarios["full"].one("PodDisruptionBudget")["spec"]
    assert pdb == {"minAvailable": "50%", "selector": pdb["selector"]}


def test_artifacts_volume_is_a_claim_or_an_empty_dir(scenarios) -> None:
    def artifacts(docs) -> dict[str, Any]:
        volumes = docs.one("Deployment")["spec"]["template"]["spec"]["volumes"]
        return next(v for v in volumes if v["name"] == "artifacts")

    claim = scenarios["default"].one("PersistentVolumeClaim")
    assert artifacts(scenarios["default"])["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "emptyDir" in artifacts(scenarios["minimal"])
