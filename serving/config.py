"""Typed configuration of the ranking server: one frozen dataclass tree with defaults.

`serving/app.py` is the only place that builds it (YAML + ``--set key=value`` +
a few environment variables, see `serving.app.load_serving_config`); every
other module receives the part it needs. Everything binds 127.0.0.1 by default.

    cfg = load_config(ServingConfig, "serving.yaml", ["limits.max_k=50", "grpc.max_workers=4"])
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from features.messages import EventBounds, KafkaTopics
from features.sequence import SequenceConfig
from features.storage import StorageConfig, StorageError, check_location, is_remote
from features.transforms import StatsConfig, parse_window


def _check_address(name: str, addr: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{name} must look like HOST:PORT (e.g. 127.0.0.1:50051), got {addr!r}")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS client (Redis, Kafka): the CA that signed the server, and an optional client pair."""

    ca_file: Path | None = None  # None: the system trust store
    cert_file: Path | None = None  # client certificate (mutual TLS), with key_file
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together (a client certificate and its key)")

    @property
    def configured(self) -> bool:
        return any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))


@dataclass(frozen=True)
class GrpcTlsConfig:
    """gRPC over TLS; no cert_file: plaintext (loopback/dev, or TLS terminated by a mesh)."""

    cert_file: Path | None = None  # server certificate chain (PEM)
    key_file: Path | None = None  # its private key (PEM)
    client_ca_file: Path | None = None  # set: clients must present a certificate this CA signed (mutual TLS)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("grpc.tls.cert_file and grpc.tls.key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("grpc.tls.client_ca_file (mutual TLS) needs grpc.tls.cert_file and key_file")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class GrpcConfig:
    address: str = "127.0.0.1:50051"  # port 0 = any free port (tests)
    max_workers: int = 2  # handler threads (Python handlers share the GIL: more threads add queueing, not speed)
    # Calls accepted at once, running (max_workers) or queued for a thread; one more is answered
    # RESOURCE_EXHAUSTED at once by gRPC (maximum_concurrent_rpcs): load shedding. Counts every method
    # of this port; Kubernetes probes use probe_address so they are never shed. Under overload an accepted
    # call waits for about max_in_flight others: larger absorbs bursts, smaller keeps latency
    # (benchmarks/flood_bench.py measures both).
    max_in_flight: int = 3
    # A second, unbounded gRPC server with only grpc.health.v1 for the Kubernetes probes
    # ("" = none: health is served on `address` only, where it can be shed under overload).
    # Plaintext even with grpc.tls (kubelet gRPC probes do not speak TLS); it answers nothing but health.
    probe_address: str = ""
    max_receive_message_bytes: int = 1 << 20
    default_deadline_s: float = 1.0  # applied when the client sends none
    shutdown_grace_s: float = 5.0  # SIGTERM: stop accepting, drain in-flight requests for up to this long
    reflection: bool = True
    tls: GrpcTlsConfig = GrpcTlsConfig()
    # Identical server processes sharing the port (SO_REUSEPORT; the kernel spreads connections):
    # Python handlers hold the GIL, so one process uses about one core. Each process has its own
    # consumers (the events group splits the partitions) and its own /metrics port (metrics port + i).
    processes: int = 1

    def __post_init__(self) -> None:
        _check_address("grpc.address", self.address)
        if self.processes < 1:
            raise ValueError(f"grpc.processes must be >= 1, got {self.processes}")
        if self.processes > 1 and self.address.endswith(":0"):
            raise ValueError("grpc.processes > 1 needs a fixed grpc.address port (the processes share it)")
        if not 0 < self.max_workers <= self.max_in_flight:
            raise ValueError(f"grpc.max_workers ({self.max_workers}) must be positive and at most grpc.max_in_flight "
                             f"({self.max_in_flight}): max_in_flight counts the running calls and the queued ones")
        if self.probe_address:
            _check_address("grpc.probe_address", self.probe_address)
            if self.probe_address == self.address and not self.address.endswith(":0"):
                raise ValueError("grpc.probe_address must differ from grpc.address")
        if self.max_receive_message_bytes < 1024:
            raise ValueError(f"grpc.max_receive_message_bytes must be >= 1024, got {self.max_receive_message_bytes}")
        if self.default_deadline_s <= 0 or self.shutdown_grace_s < 0:
            raise ValueError("grpc.default_deadline_s must be > 0 and grpc.shutdown_grace_s >= 0")


@dataclass(frozen=True)
class LimitsConfig:
    """Request limits; a request outside them gets INVALID_ARGUMENT naming the field."""

    max_k: int = 200
    default_num_candidates: int = 500
    max_num_candidates: int = 2000
    max_context_entries: int = 32
    max_context_chars: int = 256  # per key and per value
    max_candidate_item_ids: int = 2000

    def __post_init__(self) -> None:
        if not 0 < self.max_k <= self.max_num_candidates:
            raise ValueError(f"limits.max_k must be in [1, max_num_candidates], got {self.max_k}")
        if not 0 < self.default_num_candidates <= self.max_num_candidates:
            raise ValueError("limits.default_num_candidates must be in [1, limits.max_num_candidates]")
        if self.max_context_entries < 0 or self.max_context_chars <= 0 or self.max_candidate_item_ids < 0:
            raise ValueError("limits.max_context_entries/max_candidate_item_ids must be >= 0, max_context_chars > 0")


@dataclass(frozen=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"  # cluster: any one node of it (cluster_nodes names more)
    key_prefix: str = "cascade:v2"  # versioned keys: a new layout gets a new prefix (v2: hash-tagged, cluster-ready)
    # Redis Cluster (redis-py RedisCluster): every transaction stays in one hash slot (serving.state.redis_store).
    cluster: bool = False
    cluster_nodes: tuple[str, ...] = ()  # more startup nodes "HOST:PORT" besides the url's (used while it is down)
    # Users and items are spread over this many hash tags each (cluster slots): an ingest batch reads and
    # writes once per group it touches (fewer groups: fewer commands per batch; more: finer spread over
    # masters). Each item group has its own popularity ZSET (top_items merges them). Part of the key
    # layout: fixed for the life of a state (another value needs another key_prefix).
    user_groups: int = 128
    item_groups: int = 16
    socket_timeout_s: float = 0.25  # request path: a slow Redis counts as down (degraded answer)
    ingest_socket_timeout_s: float = 5.0  # consumers: big pipelines
    max_connections: int = 64
    user_ttl_s: int = 0  # 0: user state never expires; else expires this long after the user's last event
    dedupe_ttl_s: int = 14 * 86_400  # event-id marks live this long (redeliveries older than this are re-applied)
    item_log_prune_bytes: int = 64 * 1024  # an item's stats log is pruned to the retention when it grows past this
    # A consumer keeps the user records it wrote (serving.state.user_cache), so a user it wrote before is
    # neither read nor decoded again; a value changed by anyone else is noticed by its generation. 0: off.
    ingest_cache_mb: int = 256
    health_interval_s: float = 0.5  # how often health probes Redis (and recovery is noticed)
    # AUTH (ACL user + password; "" = none or whatever the URL holds). Set the password from a Secret
    # (CASCADE_REDIS_PASSWORD), not in YAML: it is redacted from logged configs either way.
    username: str = ""
    password: str = ""
    tls: TlsFiles = TlsFiles()  # with a rediss:// url: CA / client certificate files

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis.url must start with redis://, rediss:// or unix://, got {self.url!r}")
        if self.tls.configured and not self.url.startswith("rediss://"):
            raise ValueError("redis.tls files are set but redis.url is not rediss://: use rediss:// for TLS")
        if self.socket_timeout_s <= 0 or self.ingest_socket_timeout_s <= 0 or self.health_interval_s <= 0:
            raise ValueError("redis timeouts and health_interval_s must be positive")
        if self.user_ttl_s < 0 or self.dedupe_ttl_s <= 0:
            raise ValueError("redis.user_ttl_s must be >= 0 and redis.dedupe_ttl_s > 0")
        if self.ingest_cache_mb < 0:
            raise ValueError(f"redis.ingest_cache_mb must be >= 0 (0: no cache), got {self.ingest_cache_mb}")
        for name, n in (("user_groups", self.user_groups), ("item_groups", self.item_groups)):
            if not 1 <= n <= 16384:
                raise ValueError(f"redis.{name} must be in [1, 16384] (hash slots), got {n}")
        if self.cluster_nodes and not self.cluster:
            raise ValueError("redis.cluster_nodes is set but redis.cluster is false: set redis.cluster=true")
        for i, node in enumerate(self.cluster_nodes):
            _check_address(f"redis.cluster_nodes[{i}]", node)
        if self.cluster and self.url.startswith("unix://"):
            raise ValueError("redis.cluster needs a redis:// or rediss:// url (cluster nodes talk TCP)")
        if self.cluster and urlsplit(self.url).path.strip("/") not in ("", "0"):
            raise ValueError(f"redis.url {self.url!r}: a Redis Cluster has only database 0")


@dataclass(frozen=True)
class SaslConfig:
    """Kafka SASL credentials; set the password from a Secret (CASCADE_KAFKA_SASL_PASSWORD)."""

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str = ""
    password: str = ""


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str = "127.0.0.1:9092"
    topics: KafkaTopics = KafkaTopics()
    events_group: str = "cascade-serving-events"  # shared by all replicas: partitions are split between them
    consume_events: bool = True
    consume_items: bool = True  # every replica reads all of `items` and `models` (no group)
    consume_models: bool = True
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    max_poll_records: int = 5_000
    poll_timeout_ms: int = 100
    # how long the broker may hold a fetch while no new data arrives. The broker answers as soon as a record
    # arrives (fetch_min_bytes 1), so this is not a floor of event-to-visible latency (produce -> poll measured
    # 5.5 ms at p50 with 20 and with 500); what it sets is how often an idle consumer asks again, and each ask
    # is Python work under the GIL the request path shares: 20 ms cost ~11 % of a core per idle consumer (the
    # server runs three: events, items, models), 500 ms ~1.4 %.
    fetch_max_wait_ms: int = 500
    fetch_max_bytes: int = 32 << 20
    max_partition_fetch_bytes: int = 8 << 20
    client_id: str = "cascade-serving"
    # Supervision of the consumers (serving/stream/supervise.py): an unexpected error is retried after
    # retry_backoff_s, doubling up to retry_backoff_max_s; a record that fails max_record_failures times
    # in a row is dead-lettered (reason consumer_error) and skipped. Redis being down is never a record's fault.
    max_record_failures: int = 3
    retry_backoff_s: float = 0.1
    retry_backoff_max_s: float = 5.0
    # Broker security (kafka-python's security_protocol): PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl: SaslConfig = SaslConfig()  # used with SASL_*
    tls: TlsFiles = TlsFiles()  # used with SSL / SASL_SSL

    def __post_init__(self) -> None:
        if self.security_protocol.startswith("SASL_") and not (self.sasl.username and self.sasl.password):
            raise ValueError(f"kafka.security_protocol={self.security_protocol} needs kafka.sasl.username and "
                             "kafka.sasl.password (CASCADE_KAFKA_SASL_USERNAME / CASCADE_KAFKA_SASL_PASSWORD)")
        if self.tls.configured and not self.security_protocol.endswith("SSL"):
            raise ValueError("kafka.tls files are set but kafka.security_protocol is not SSL or SASL_SSL")
        if not self.bootstrap:
            raise ValueError("kafka.bootstrap must name at least one broker (HOST:PORT[,HOST:PORT])")
        for b in self.bootstrap.split(","):
            _check_address("kafka.bootstrap", b.strip())
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("kafka.heartbeat_interval_ms must be at most a third of kafka.session_timeout_ms")
        if self.max_poll_records <= 0 or self.poll_timeout_ms <= 0:
            raise ValueError("kafka.max_poll_records and kafka.poll_timeout_ms must be positive")
        if self.max_record_failures < 1 or not 0 < self.retry_backoff_s <= self.retry_backoff_max_s:
            raise ValueError("kafka.max_record_failures must be >= 1 and 0 < kafka.retry_backoff_s <= retry_backoff_max_s")


@dataclass(frozen=True)
class StateConfig:
    """What the online state keeps; must match the features the models were trained on."""

    sequence: SequenceConfig = SequenceConfig()
    stats: StatsConfig = StatsConfig()
    # How far back (event time) the per-entity counter logs are kept: at least the longest finite
    # stats window of any model that will be served.
    stats_retention: str = "31d"
    # Events stamped before this UTC date, or later than the consumer's clock + event_max_future, are
    # dead-lettered (ts_too_old / ts_in_future): a far-future timestamp would become a user's newest
    # event; an ancient one is usually seconds written as milliseconds.
    event_ts_floor: str = "1990-01-01"
    event_max_future: str = "5m"

    def __post_init__(self) -> None:
        self.event_bounds()  # raises on a malformed floor or skew
        ret = parse_window(self.stats_retention)
        if ret is None:
            raise ValueError("state.stats_retention must be a finite window such as 31d")
        longest = max((ms for ms in self.stats.window_ms() if ms is not None), default=0)
        if ret < longest:
            raise ValueError(
                f"state.stats_retention={self.stats_retention} is shorter than the longest stats window "
                f"({max(w for w, ms in zip(self.stats.windows, self.stats.window_ms()) if ms == longest)})"
            )

    def retention_ms(self) -> int:
        return int(parse_window(self.stats_retention))  # type: ignore[arg-type]

    def event_bounds(self) -> EventBounds:
        try:
            floor = datetime.date.fromisoformat(self.event_ts_floor)
        except ValueError:
            raise ValueError(f"state.event_ts_floor must be a date like 1990-01-01, got {self.event_ts_floor!r}") from None
        skew = parse_window(self.event_max_future)
        if skew is None:
            raise ValueError("state.event_max_future must be a finite window such as 5m")
        epoch = datetime.datetime.combine(floor, datetime.time(), datetime.timezone.utc).timestamp()
        return EventBounds(min_ts_ms=int(epoch * 1000), max_future_ms=skew)


@dataclass(frozen=True)
class RebuildConfig:
    """Noticing an empty Redis (restart without persistence, failover to an empty replica) and rebuilding it.

    Bootstrap writes an epoch key; a watcher checks it every `check_interval_s`. When it is gone the
    state is rebuilt from `snapshot` (bootstrap + dedupe marks of every loaded event) and the events
    consumers rewind to the snapshot's Kafka offsets (or the earliest retained offset), so every event
    ends up applied exactly once. See serving/rebuild.py.
    """

    enabled: bool = True
    # Where the state is rebuilt from: a pipeline artifacts directory (its published version's features
    # snapshot), a `cascade build-features` output (its input dataset) or a canonical dataset directory;
    # None: no snapshot, the state is rebuilt from the events topic alone (what Kafka still retains).
    snapshot: Path | None = None
    check_interval_s: float = 1.0
    lock_ttl_s: float = 900.0  # one replica rebuilds under this lock; another takes over if it dies
    dedupe_marks: bool = True  # mark every snapshot event applied, so its redelivery is a no-op

    def __post_init__(self) -> None:
        if self.check_interval_s <= 0 or self.lock_ttl_s <= 0:
            raise ValueError("rebuild.check_interval_s and rebuild.lock_ttl_s must be positive")


def _location(value: str | Path, where: str) -> str | Path:
    """A local path stays a Path; an object-store URI (s3://bucket/prefix) stays a checked string."""
    try:
        loc = check_location(value, where)
    except StorageError as e:
        raise ValueError(str(e)) from None
    return loc if is_remote(loc) else Path(loc)


@dataclass(frozen=True)
class ModelsConfig:
    # A model bundle version to load at start (before any `models` announcement arrives): a directory or an
    # object-store URI (s3://bucket/artifacts/versions/v1/bundle).
    initial_bundle: str | Path | None = None
    # Announced URIs (and the initial bundle) must resolve under one of these: directories (compared after
    # symlinks) or object-store prefixes (s3://bucket/artifacts/, compared segment by segment). The server
    # refuses to start with none unless allow_any_root (local development only) is set.
    allowed_roots: tuple[str | Path, ...] = ()
    allow_any_root: bool = False
    smoke_candidates: int = 64  # candidates in the smoke inference that gates every swap
    # Where object-store bundles are downloaded (content-addressed by manifest sha256) before they are
    # verified and loaded; None: a temporary directory of the process.
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.initial_bundle is not None:
            object.__setattr__(self, "initial_bundle", _location(self.initial_bundle, "models.initial_bundle"))
        object.__setattr__(self, "allowed_roots", tuple(
            _location(r, f"models.allowed_roots[{i}]") for i, r in enumerate(self.allowed_roots)))


@dataclass(frozen=True)
class RuntimeConfig:
    torch_threads: int = 1  # intra-op threads per request (requests already run in parallel)
    popularity_size: int = 2000  # the in-memory fallback list
    # Candidates' counters: "cached" = precomputed for the whole catalog every item_stats_refresh_s
    # (serving/item_features.py; point-in-time requests still read Redis), "request" = one Redis MGET per
    # request (exact "now"; for catalogs too big to refresh each second), "off" = no counters (zeros).
    item_stats: Literal["cached", "request", "off"] = "cached"
    item_stats_refresh_s: float = 1.0
    item_stats_max_age_s: float = 5.0  # an older snapshot is not used (the request reads Redis)
    validate_batches: bool = True  # features.batch.validate_batch on every request batch
    popularity_refresh_s: float = 10.0  # how often the in-memory popularity list is re-read from Redis
    # Micro-batching (serving/microbatch.py): concurrent requests' ranker forwards run as one, up to
    # ranker_batch_max requests; a forward waits at most ranker_batch_wait_ms for more (0: only those already
    # waiting, so a lone request never waits). ranker_batch_max 1 = every request runs its own forward.
    ranker_batch_max: int = 8
    ranker_batch_wait_ms: float = 0.0
    # The cyclic garbage collector (serving/heap.py): once the process has loaded its model (and after each
    # swap) what is alive is frozen out of full collections, and a young collection runs every
    # gc_gen0_threshold net allocations (Python's default: 700). 0: the interpreter's defaults, nothing frozen.
    gc_gen0_threshold: int = 20_000

    def __post_init__(self) -> None:
        if self.gc_gen0_threshold < 0:
            raise ValueError("runtime.gc_gen0_threshold must be >= 0 (0: Python's defaults), "
                             f"got {self.gc_gen0_threshold}")
        if self.torch_threads <= 0 or self.popularity_size <= 0 or self.popularity_refresh_s <= 0:
            raise ValueError("runtime.torch_threads, popularity_size and popularity_refresh_s must be positive")
        if self.item_stats_refresh_s <= 0 or self.item_stats_max_age_s < self.item_stats_refresh_s:
            raise ValueError("runtime.item_stats_refresh_s must be > 0 and <= runtime.item_stats_max_age_s")
        if self.ranker_batch_max < 1 or not 0 <= self.ranker_batch_wait_ms <= 1000:
            raise ValueError(f"runtime.ranker_batch_max must be >= 1 (got {self.ranker_batch_max}) and "
                             f"runtime.ranker_batch_wait_ms in [0, 1000] (got {self.ranker_batch_wait_ms})")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    address: str = "127.0.0.1:9464"  # /metrics; port 0 = any free port

    def __post_init__(self) -> None:
        _check_address("metrics.address", self.address)


@dataclass(frozen=True)
class ServingConfig:
    grpc: GrpcConfig = GrpcConfig()
    limits: LimitsConfig = LimitsConfig()
    redis: RedisConfig = RedisConfig()
    kafka: KafkaConfig = KafkaConfig()
    state: StateConfig = StateConfig()
    models: ModelsConfig = ModelsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    metrics: MetricsConfig = MetricsConfig()
    rebuild: RebuildConfig = RebuildConfig()
    storage: StorageConfig = StorageConfig()  # the object store of s3:// bundle URIs
    # Catalog (items) to serve: a canonical dataset directory or a features directory (its items/).
    catalog: Path | None = None
    labels: dict[str, str] = field(default_factory=dict)  # free-form, shown by GetModelInfo
