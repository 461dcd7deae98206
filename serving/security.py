"""Transport security of the server's three connections, built from the typed config in one place.

* gRPC: `server_credentials` -> TLS (optionally mutual: clients must present a
  certificate the configured CA signed); `add_server_port` binds with them or
  plaintext.
* Redis: `redis_connection_kwargs` -> AUTH (username/password) and, with a
  ``rediss://`` URL, the CA / client certificate files, for redis-py.
* Kafka: `kafka_client_kwargs` -> security_protocol, SASL (PLAIN / SCRAM) and
  SSL files, for every kafka-python consumer, producer and admin client.

Secrets reach the config from the environment (Kubernetes Secrets) in
`serving.app.load_serving_config`; `redacted` masks them before a config is
logged or printed. Files are read when the server starts: a missing or
unreadable file fails the start with its path and the config key.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from serving.config import GrpcTlsConfig, KafkaConfig, RedisConfig, ServingConfig

REDACTED = "***"
_URL_PASSWORD = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<pw>[^@/]*)@")


def _read(path: Path | None, key: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{key}={path}: cannot read it ({e.strerror or e})") from None


def server_credentials(tls: GrpcTlsConfig) -> Any:
    """`grpc.ServerCredentials` for `grpc.tls`, or None (plaintext) when no certificate is configured."""
    if not tls.enabled:
        return None
    import grpc

    cert = _read(tls.cert_file, "grpc.tls.cert_file")
    key = _read(tls.key_file, "grpc.tls.key_file")
    ca = _read(tls.client_ca_file, "grpc.tls.client_ca_file")
    for name, data in (("grpc.tls.cert_file", cert), ("grpc.tls.key_file", key), ("grpc.tls.client_ca_file", ca)):
        if data is not None and b"-----BEGIN " not in data:
            raise ValueError(f"{name}: not a PEM file (no -----BEGIN line)")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def add_server_port(server: Any, address: str, tls: GrpcTlsConfig) -> int:
    """Binds `address` with TLS when configured, plaintext otherwise; returns the bound port (0: failed)."""
    creds = server_credentials(tls)
    return server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)


def redis_connection_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    """Extra keyword arguments of `redis.Redis.from_url` for AUTH and TLS (credentials in the URL still win)."""
    kw: dict[str, Any] = {}
    if cfg.username:
        kw["username"] = cfg.username
    if cfg.password:
        kw["password"] = cfg.password
    if cfg.url.startswith("rediss://"):
        t = cfg.tls
        for name, f in (("redis.tls.ca_file", t.ca_file), ("redis.tls.cert_file", t.cert_file),
                        ("redis.tls.key_file", t.key_file)):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"{name}={f} does not exist")
        kw["ssl_cert_reqs"] = "required"
        kw["ssl_check_hostname"] = t.check_hostname
        if t.ca_file is not None:
            kw["ssl_ca_certs"] = str(t.ca_file)
        if t.cert_file is not None:
            kw["ssl_certfile"], kw["ssl_keyfile"] = str(t.cert_file), str(t.key_file)
    return kw


def kafka_client_kwargs(cfg: KafkaConfig | Any, check_files: bool = True) -> dict[str, Any]:
    """Security keyword arguments of every kafka-python client (KafkaConsumer/Producer/AdminClient).

    cfg: anything with `security_protocol`, `sasl` and `tls` as in KafkaConfig (also the pipeline's
    `jobs.pipeline.PublishConfig`, whose producer announces new models).

    PLAINTEXT gives ``{}`` so clients built against a local broker are unchanged. check_files: a configured
    CA / certificate / key file that does not exist raises ValueError naming its key (at start, not as a
    connection error in a consumer thread).
        KafkaConsumer(topic, bootstrap_servers=cfg.bootstrap, **kafka_client_kwargs(cfg))
    """
    if cfg.security_protocol == "PLAINTEXT":
        return {}
    kw: dict[str, Any] = {"security_protocol": cfg.security_protocol}
    if cfg.security_protocol.startswith("SASL_"):
        kw["sasl_mechanism"] = cfg.sasl.mechanism
        kw["sasl_plain_username"] = cfg.sasl.username
        kw["sasl_plain_password"] = cfg.sasl.password
    if cfg.security_protocol.endswith("SSL"):
        t = cfg.tls
        for name, f in (("tls.ca_file", t.ca_file), ("tls.cert_file", t.cert_file), ("tls.key_file", t.key_file)):
            if check_files and f is not None and not Path(f).is_file():
                raise ValueError(f"kafka {name}={f} does not exist")
        kw["ssl_check_hostname"] = t.check_hostname
        if t.ca_file is not None:
            kw["ssl_cafile"] = str(t.ca_file)
        if t.cert_file is not None:
            kw["ssl_certfile"], kw["ssl_keyfile"] = str(t.cert_file), str(t.key_file)
    return kw


def redact_url(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host (no password: unchanged)."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", url)


def redacted(cfg: ServingConfig) -> ServingConfig:
    """The config with every secret masked: what may be logged or printed."""
    r, k = cfg.redis, cfg.kafka
    redis_ = dataclasses.replace(r, url=redact_url(r.url), password=REDACTED if r.password else "")
    sasl = dataclasses.replace(k.sasl, password=REDACTED if k.sasl.password else "")
    return dataclasses.replace(cfg, redis=redis_, kafka=dataclasses.replace(k, sasl=sasl))
