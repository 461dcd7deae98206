"""Transport security: gRPC over TLS and mutual TLS on the real server, Redis AUTH and TLS against a real
redis-server, Kafka SASL/SSL options as kafka-python receives them, secrets from the environment taken
verbatim and never logged. Certificates are made per module with the openssl CLI (a throwaway CA)."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

PASSWORD = "p: #[not yaml] 'x' \"y\" 123"  # a password YAML would mangle: secrets are taken verbatim


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found: apt-get install openssl")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=cascade-test-ca",
             cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN=cascade-test-{who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.crt", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


# ------------------------------------------------------------------------------------------ gRPC


def _model_info(channel) -> str:
    from serving.proto import ranking_pb2, ranking_pb2_grpc

    return ranking_pb2_grpc.RankingStub(channel).GetModelInfo(ranking_pb2.GetModelInfoRequest(), timeout=5).model_version


def _tls_channel(address: str, certs: dict[str, Path], client_cert: bool):
    import grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=certs["ca.crt"].read_bytes(),
        private_key=certs["client.key"].read_bytes() if client_cert else None,
        certificate_chain=certs["client.crt"].read_bytes() if client_cert else None)
    return grpc.secure_channel(address, creds)


@pytest.mark.integration
def test_grpc_tls_answers_a_tls_client_and_refuses_plaintext(make_server, certs) -> None:
    import grpc

    h = make_server(bootstrap=False, consume=False, **{"grpc.tls.cert_file": certs["server.crt"],
                                                       "grpc.tls.key_file": certs["server.key"]})
    with _tls_channel(h.app.addresses.grpc, certs, client_cert=False) as ch:
        assert _model_info(ch) == "v1"
    with grpc.insecure_channel(h.app.addresses.grpc) as ch, pytest.raises(grpc.RpcError) as info:
        _model_info(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.integration
def test_mutual_tls_refuses_a_client_without_a_certificate(make_server, certs) -> None:
    import grpc

    h = make_server(bootstrap=False, consume=False, **{"grpc.tls.cert_file": certs["server.crt"],
                                                       "grpc.tls.key_file": certs["server.key"],
                                                       "grpc.tls.client_ca_file": certs["ca.crt"]})
    with _tls_channel(h.app.addresses.grpc, certs, client_cert=True) as ch:
        assert _model_info(ch) == "v1"
    with _tls_channel(h.app.addresses.grpc, certs, client_cert=False) as ch, pytest.raises(grpc.RpcError) as info:
        _model_info(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_config_is_checked_where_it_is_read(tmp_path: Path) -> None:
    from features.config import ConfigError
    from serving.app import load_serving_config
    from serving.config import GrpcTlsConfig
    from serving.security import server_credentials

    with pytest.raises(ConfigError, match="cert_file and grpc.tls.key_file go together"):
        load_serving_config(None, ["grpc.tls.cert_file=/x.crt"], env={})
    with pytest.raises(ConfigError, match="client_ca_file .* needs grpc.tls.cert_file"):
        load_serving_config(None, ["grpc.tls.client_ca_file=/ca.crt"], env={})
    with pytest.raises(ValueError, match=r"grpc\.tls\.cert_file=.*missing\.crt: cannot read it"):
        server_credentials(GrpcTlsConfig(cert_file=tmp_path / "missing.crt", key_file=tmp_path / "k"))
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(ValueError, match="not a PEM file"):
        server_credentials(GrpcTlsConfig(cert_file=tmp_path / "not.pem", key_file=tmp_path / "not.pem"))
    assert server_credentials(GrpcTlsConfig()) is None


# ------------------------------------------------------------------------------------------ Redis


def _start_redis(tmp: Path, *args: str, tls: bool = False) -> tuple[subprocess.Popen, int]:
    from jobs.services import free_port, redis_binary

    port = free_port()
    port_args = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    proc = subprocess.Popen([str(redis_binary()), "--bind", "127.0.0.1", *port_args, "--save", "", "--appendonly", "no",
                             "--dir", str(tmp), "--logfile", str(tmp / f"redis-{port}.log"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    import socket

    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, (tmp / f"redis-{port}.log").read_text()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()


def _store(url: str, **kw):
    from serving.config import RedisConfig
    from serving.state.redis_store import RedisOnlineStore

    return RedisOnlineStore(RedisConfig(url=url, socket_timeout_s=2.0, **kw))


@pytest.fixture()
def redis_with_password(tmp_path: Path):
    proc, port = _start_redis(tmp_path, "--requirepass", PASSWORD)
    try:
        yield port
    finally:
        _stop(proc)


def test_redis_auth_with_the_configured_password_and_refused_without(redis_with_password: int) -> None:
    import redis

    url = f"redis://127.0.0.1:{redis_with_password}/0"
    good, anonymous, wrong = _store(url, password=PASSWORD), _store(url), _store(url, password="guess")
    try:
        assert good.ping() is True
        good.put_users({})  # a write path too
        assert anonymous.ping() is False and wrong.ping() is False
    finally:
        for s in (good, anonymous, wrong):
            s.close()
    # an ACL user (username + password)
    admin = redis.Redis(host="127.0.0.1", port=redis_with_password, password=PASSWORD)
    admin.execute_command("ACL", "SETUSER", "cascade", "on", ">s3cret", "~*", "+@all")
    admin.close()
    user = _store(url, username="cascade", password="s3cret")
    try:
        assert user.ping() is True
    finally:
        user.close()


def test_redis_password_from_the_environment_is_taken_verbatim_and_never_logged(redis_with_password: int) -> None:
    from features.config import dump_config
    from serving.app import load_serving_config
    from serving.security import redacted
    from serving.state.redis_store import RedisOnlineStore

    cfg = load_serving_config(None, [], env={"CASCADE_REDIS_URL": f"redis://127.0.0.1:{redis_with_password}/0",
                                             "CASCADE_REDIS_PASSWORD": PASSWORD})
    assert cfg.redis.password == PASSWORD
    store = RedisOnlineStore(cfg.redis)
    try:
        assert store.ping() is True
    finally:
        store.close()
    shown = dump_config(redacted(cfg))
    assert "123" not in shown and "not yaml" not in shown and "password: '***'" in shown
    url_cfg = load_serving_config(None, ["redis.url=redis://app:hunter2@r:6379/0"], env={})
    assert "hunter2" not in dump_config(redacted(url_cfg)) and "redis://app:***@r:6379/0" in dump_config(redacted(url_cfg))


def test_redis_over_tls_with_a_client_certificate(tmp_path: Path, certs) -> None:
    from serving.config import TlsFiles

    proc, port = _start_redis(tmp_path, "--tls-cert-file", str(certs["server.crt"]),
                              "--tls-key-file", str(certs["server.key"]), "--tls-ca-cert-file", str(certs["ca.crt"]),
                              "--tls-auth-clients", "yes", "--requirepass", PASSWORD, tls=True)
    try:
        tls = TlsFiles(ca_file=certs["ca.crt"], cert_file=certs["client.crt"], key_file=certs["client.key"])
        good = _store(f"rediss://127.0.0.1:{port}/0", password=PASSWORD, tls=tls)
        no_cert = _store(f"rediss://127.0.0.1:{port}/0", password=PASSWORD, tls=TlsFiles(ca_file=certs["ca.crt"]))
        plain = _store(f"redis://127.0.0.1:{port}/0", password=PASSWORD)
        try:
            deadline = time.monotonic() + 10
            while not good.ping():
                assert time.monotonic() < deadline, "redis over TLS never answered"
                time.sleep(0.1)
            assert no_cert.ping() is False and plain.ping() is False
        finally:
            for s in (good, no_cert, plain):
                s.close()
    finally:
        _stop(proc)


def test_redis_tls_files_need_a_rediss_url() -> None:
    from serving.config import RedisConfig, TlsFiles

    with pytest.raises(ValueError, match="use rediss://"):
        RedisConfig(url="redis://r:6379/0", tls=TlsFiles(ca_file=Path("/ca.crt")))


# ------------------------------------------------------------------------------------------ Kafka


def test_kafka_sasl_ssl_options_reach_the_kafka_python_clients(tmp_path: Path) -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    from serving.app import load_serving_config
    from serving.security import kafka_client_kwargs

    cfg = load_serving_config(None, ["kafka.security_protocol=SASL_SSL", "kafka.sasl.mechanism=SCRAM-SHA-512",
                                     "kafka.tls.ca_file=/etc/cascade/kafka-tls/ca.crt"],
                              env={"CASCADE_KAFKA_SASL_USERNAME": "svc-cascade", "CASCADE_KAFKA_SASL_PASSWORD": PASSWORD})
    with pytest.raises(ValueError, match=r"kafka tls\.ca_file=/etc/cascade/kafka-tls/ca\.crt does not exist"):
        kafka_client_kwargs(cfg.kafka)
    kw = kafka_client_kwargs(cfg.kafka, check_files=False)
    assert kw == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                  "sasl_plain_username": "svc-cascade", "sasl_plain_password": PASSWORD, "ssl_check_hostname": True,
                  "ssl_cafile": "/etc/cascade/kafka-tls/ca.crt"}
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):  # every name is one the client knows
        assert set(kw) <= set(client.DEFAULT_CONFIG), set(kw) - set(client.DEFAULT_CONFIG)

    plain = load_serving_config(None, [], env={})
    assert kafka_client_kwargs(plain.kafka) == {}
    mtls = load_serving_config(None, ["kafka.security_protocol=SSL", "kafka.tls.cert_file=/c.crt",
                                      "kafka.tls.key_file=/c.key", "kafka.tls.check_hostname=false"], env={})
    assert kafka_client_kwargs(mtls.kafka, check_files=False) == {"security_protocol": "SSL", "ssl_check_hostname": False,
                                               "ssl_certfile": "/c.crt", "ssl_keyfile": "/c.key"}


def test_kafka_security_config_is_validated() -> None:
    from features.config import ConfigError
    from serving.app import load_serving_config

    with pytest.raises(ConfigError, match="needs kafka.sasl.username and kafka.sasl.password"):
        load_serving_config(None, ["kafka.security_protocol=SASL_PLAINTEXT"], env={})
    with pytest.raises(ConfigError, match="not SSL or SASL_SSL"):
        load_serving_config(None, ["kafka.tls.ca_file=/ca.crt"], env={})
    with pytest.raises(ConfigError, match="security_protocol"):
        load_serving_config(None, ["kafka.security_protocol=SASL"], env={})


def test_the_servers_kafka_consumers_are_built_with_the_security_options(monkeypatch, tmp_path: Path) -> None:
    """The events consumer and the broadcast readers hand kafka_client_kwargs to kafka-python (recorded by a
    stand-in client class: no SASL broker is assumed here)."""
    import kafka

    from serving.app import load_serving_config
    from serving.metrics import ServingMetrics
    from serving.stream.broadcast import _BroadcastReader
    from serving.stream.events import EventsConsumer

    made: list[dict] = []

    class Recorder:
        def __init__(self, *topics: str, **kw: object) -> None:
            made.append(kw)

    monkeypatch.setattr(kafka, "KafkaConsumer", Recorder)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_serving_config(None, ["kafka.security_protocol=SASL_SSL", "kafka.sasl.mechanism=SCRAM-SHA-256",
                                     f"kafka.tls.ca_file={ca}"],
                              env={"CASCADE_KAFKA_SASL_USERNAME": "u", "CASCADE_KAFKA_SASL_PASSWORD": PASSWORD})
    EventsConsumer(cfg.kafka, None, ServingMetrics(), None)._consumer()
    _BroadcastReader(cfg.kafka, cfg.kafka.topics.items, None, "items-reader", ServingMetrics())._client()
    assert len(made) == 2
    for kw in made:
        assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"],
                kw["ssl_cafile"]) == ("SASL_SSL", "SCRAM-SHA-256", "u", PASSWORD, str(ca))
