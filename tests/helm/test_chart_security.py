"""Transport security and network exposure in the chart: TLS Secrets mounted where the rendered serving config
points, credentials only as Secret references, a NetworkPolicy around the server pods, /metrics only on the
metrics Service. The `secure` ci scenario turns all of it on (and every scenario is linted and validated by
test_chart.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


def _pod(docs) -> dict[str, Any]:
    return docs.one("Deployment")["spec"]["template"]


def _container(docs) -> dict[str, Any]:
    (c,) = _pod(docs)["spec"]["containers"]
    return c


def _serving_config(docs, tmp_path: Path):
    from serving.app import SECRET_ENV, load_serving_config

    path = tmp_path / "serving.yaml"
    path.write_text(docs.one("ConfigMap", "-server")["data"]["serving.yaml"])
    c = _container(docs)
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    env["CASCADE_REDIS_URL"] = "rediss://redis-master:6379/0"
    env.update({e["name"]: "from-a-secret" for e in c["env"] if e["name"] in SECRET_ENV})
    return load_serving_config(path, env=env)


def _mounted_file(docs, path: Path) -> tuple[str, str]:
    """A file path in the container -> (Secret name, key) of the Secret volume mounted above it."""
    c, spec = _container(docs), _pod(docs)["spec"]
    mount = next(m for m in c["volumeMounts"] if path.parent == Path(m["mountPath"]))
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return volume["secret"]["secretName"], path.name


def test_tls_files_in_the_config_are_the_mounted_secrets(scenarios, tmp_path: Path) -> None:
    docs = scenarios["secure"]
    cfg = _serving_config(docs, tmp_path)
    assert _mounted_file(docs, cfg.grpc.tls.cert_file) == ("cascade-grpc-tls", "tls.crt")
    assert _mounted_file(docs, cfg.grpc.tls.key_file) == ("cascade-grpc-tls", "tls.key")
    assert _mounted_file(docs, cfg.grpc.tls.client_ca_file) == ("cascade-grpc-tls", "ca.crt")  # mutual TLS
    assert _mounted_file(docs, cfg.redis.tls.ca_file) == ("redis-client-tls", "ca.crt")
    assert _mounted_file(docs, cfg.redis.tls.cert_file) == ("redis-client-tls", "tls.crt")
    assert _mounted_file(docs, cfg.kafka.tls.ca_file) == ("kafka-ca", "ca.crt")
    assert cfg.kafka.tls.cert_file is None  # clientCertificate: false
    assert (cfg.kafka.security_protocol, cfg.kafka.sasl.mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    for v in _pod(docs)["spec"]["volumes"]:
        if v["name"].startswith("tls-"):
            assert v["secret"]["defaultMode"] == 0o440


def test_credentials_are_secret_references_only(scenarios) -> None:
    docs = scenarios["secure"]
    refs = {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in _container(docs)["env"] if "valueFrom" in e}
    assert refs == {"CASCADE_REDIS_URL": ("cascade-redis", "url"),
                    "CASCADE_REDIS_PASSWORD": ("cascade-redis", "password"),
                    "CASCADE_REDIS_USERNAME": ("cascade-redis", "username"),
                    "CASCADE_KAFKA_SASL_USERNAME": ("cascade-kafka-sasl", "username"),
                    "CASCADE_KAFKA_SASL_PASSWORD": ("cascade-kafka-sasl", "password")}
    text = yaml.safe_dump_all(list(docs))
    assert "password:" not in docs.one("ConfigMap", "-server")["data"]["serving.yaml"]
    assert "from-a-secret" not in text


def test_default_render_is_plaintext_without_extra_secrets(scenarios, tmp_path: Path) -> None:
    docs = scenarios["default"]
    from serving.app import load_serving_config

    path = tmp_path / "serving.yaml"
    path.write_text(docs.one("ConfigMap", "-server")["data"]["serving.yaml"])
    cfg = load_serving_config(path, env={"CASCADE_REDIS_URL": "redis://r:6379/0"})
    assert not cfg.grpc.tls.enabled and cfg.kafka.security_protocol == "PLAINTEXT" and not cfg.redis.tls.configured
    assert not [v for v in _pod(docs)["spec"]["volumes"] if v["name"].startswith("tls-")]
    assert not docs.find("NetworkPolicy")


def test_metrics_are_not_on_the_public_service(scenarios, scenario: str) -> None:
    docs = scenarios[scenario]
    public = docs.one("Service", "cascade")
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc"]
    metrics = docs.one("Service", "-metrics")
    assert metrics["spec"]["clusterIP"] == "None"
    assert all(p["name"].startswith("metrics") for p in metrics["spec"]["ports"])
    for sm in docs.find("ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"].items()
        assert sel <= metrics["metadata"]["labels"].items() and not sel <= public["metadata"]["labels"].items()


def test_network_policy_selects_the_server_and_names_its_ports(scenarios) -> None:
    docs = scenarios["secure"]
    np = docs.one("NetworkPolicy")["spec"]
    pod_labels = _pod(docs)["metadata"]["labels"]
    assert np["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert np["policyTypes"] == ["Ingress", "Egress"]
    container_ports = {p["name"] for p in _container(docs)["ports"]}
    by_port = {}
    for rule in np["ingress"]:
        for p in rule["ports"]:
            assert p["port"] in container_ports
            by_port[p["port"]] = rule.get("from")
    assert by_port["grpc"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}}]
    assert by_port["probe"] is None  # the kubelet's probes, from the node
    assert by_port["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    dns, *rest = np["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert [r["ports"][0]["port"] for r in rest] == [9093, 6379]


def test_network_policy_defaults_let_grpc_in_and_only_prometheus_scrape(render) -> None:
    np = render({"networkPolicy": {"enabled": True}}).one("NetworkPolicy")["spec"]
    assert np["policyTypes"] == ["Ingress"] and "egress" not in np
    grpc_rule = next(r for r in np["ingress"] if r["ports"][0]["port"] == "grpc")
    metrics_rule = next(r for r in np["ingress"] if r["ports"][0]["port"] == "metrics")
    assert "from" not in grpc_rule
    assert metrics_rule["from"] == [{"namespaceSelector": {},
                                     "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


@pytest.mark.parametrize(("values", "message"), [
    ({"kafka": {"securityProtocol": "SASL_SSL"}}, "needs kafka.sasl.existingSecret"),
    ({"server": {"tls": {"clientAuth": True}}}, "server.tls.clientAuth needs server.tls.existingSecret"),
    ({"redis": {"tls": {"clientCertificate": True}}}, "redis.tls.clientCertificate needs redis.tls.existingSecret"),
    ({"kafka": {"tls": {"existingSecret": "ca"}}}, "kafka.securityProtocol must be SSL or SASL_SSL"),
    ({"serviceMonitor": {"enabled": True}, "server": {"metricsService": {"enabled": False}}},
     "serviceMonitor.enabled needs server.metricsService.enabled"),
])
def test_incomplete_security_values_fail_the_render(render, values: dict[str, Any], message: str) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


@pytest.mark.parametrize(("values", "message"), [
    ({"kafka": {"securityProtocol": "SASL"}}, "/kafka/securityProtocol"),
    ({"kafka": {"sasl": {"mechanism": "GSSAPI"}}}, "/kafka/sasl/mechanism"),
    ({"networkPolicy": {"grpcFrom": "everyone"}}, "/networkPolicy/grpcFrom"),
    ({"server": {"tls": {"secret": "x"}}}, "additional properties 'secret' not allowed"),
])
def test_schema_rejects_bad_security_values(render, values: dict[str, Any], message: str) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError, match=message):
        render(values)


def test_pipeline_announces_with_the_servers_kafka_security(scenarios, tmp_path: Path) -> None:
    """The pipeline CronJob's producer (model announcements): the same protocol, SASL credentials from the Secret,
    the brokers' CA mounted where its config points; loaded by jobs/pipeline.py itself."""
    from jobs.cli import build_parser
    from jobs.pipeline import load_pipeline_config
    from serving.security import kafka_client_kwargs

    docs = scenarios["secure"]
    job = docs.one("CronJob", "-pipeline")["spec"]["jobTemplate"]["spec"]["template"]
    (c,) = job["spec"]["containers"]
    args = build_parser().parse_args(c["command"][1:])
    config = tmp_path / "pipeline.yaml"
    config.write_text(docs.one("ConfigMap", "-jobs")["data"]["pipeline.yaml"])
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs["CASCADE_KAFKA_SASL_PASSWORD"] == {"name": "cascade-kafka-sasl", "key": "password"}
    cfg = load_pipeline_config(config, args.overrides, env={name: "from-a-secret" for name in refs})
    kw = kafka_client_kwargs(cfg.publish, check_files=False)  # the files exist in the pod, not here
    assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_password"]) == (
        "SASL_SSL", "SCRAM-SHA-512", "from-a-secret")
    mount = next(m for m in c["volumeMounts"] if Path(kw["ssl_cafile"]).parent == Path(m["mountPath"]))
    volume = next(v for v in job["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "kafka-ca" and mount["readOnly"] is True


def test_pipeline_run_manifest_never_holds_the_sasl_password() -> None:
    from jobs.pipeline import _config_dict, load_pipeline_config

    cfg = load_pipeline_config(None, ["dataset=x", "publish.security_protocol=SASL_PLAINTEXT"],
                               env={"CASCADE_KAFKA_SASL_USERNAME": "u", "CASCADE_KAFKA_SASL_PASSWORD": "hunter2"})
    assert cfg.publish.sasl.password == "hunter2"
    assert "hunter2" not in str(_config_dict(cfg))
