"""Serving: closed-loop gRPC load on ML-1M-trained models, consumer throughput and freshness, with the floors.

What runs (all on 127.0.0.1, real tansu + redis-server + the `cascade serve` process):

1. ML-1M (canonical import of ../shared/data/ml-1m, or --dataset) -> model bundle (--bundle, or by default
   the product's own: `cascade pipeline run` on ML-1M, Spark features -> retriever -> full ranker (DARE
   tables + SDIM + 4-expert AW-MoE as the second stage over the retriever's logit, trained on a held-out
   retriever's lists) -> gate -> bundle, with short training since only speed is measured
   here; built once and cached under var/serving_bench/, see `pipeline_config`) -> online state
   bootstrapped into Redis (sequences with SDIM signatures, counter logs, popularity).
2. Query sets: "L=1000" real ML-1M users with >= 1000 behaviors, their last 1000 kept; "L=10000"
   synthetic users with 10,000 behaviors drawn by item popularity over the last 60 days.
3. Floors, measured in the same run with the same client: an (almost) empty gRPC call (Health/Check
   on the same server) and one Redis round trip (GET of a user's packed state; MGET of 500 items'
   counter logs).
4. Closed loop: C client threads, each with one request in flight (Rank k=--k (20), 500 candidates,
   exclude_seen, debug timings), C in --concurrency (1, 2, 4, 8, 32); client-side latency and QPS,
   server-side per-stage latency from the debug timings. The server runs --processes 2 (one per core,
   the documented 2-core setting; grpc.processes) with one torch thread each.
5. Consumer: a backlog of --consumer-events events on a fresh topic, applied by one `EventsConsumer`
   (this process, nothing else running) -> events/s; then a steady --fresh-rate events/s stream from a
   producer in another process -> event-to-visible freshness (Kafka produce timestamp -> Redis
   transaction committed).

The machine may be shared: the load average and the CPU used by other processes during each phase
are recorded (`foreign_cores`); --wait-quiet waits (up to 30 min) for a 1-minute load <= 2.5 first.
Targets (ISSUE 7): p99 <= 15 ms at concurrency 1; >= 150 QPS with p99 <= 50 ms; >= 20k events/s per
consumer process; freshness p99 <= 500 ms. Results are reported as measured, misses included.

    python benchmarks/serving_bench.py --wait-quiet --json reports/serving_bench.json
    python benchmarks/serving_bench.py --quick            # shorter runs (~3 min after setup)
    python benchmarks/serving_bench.py --build-bundle-only  # just build (or find) the default bundle

The default bundle is what this command line builds (the first run of the benchmark runs it through
`jobs.pipeline.run_pipeline`; about 15-25 min on 2 quiet cores: import 0.5, features 2-3, retriever
2 epochs ~3, ranker 1 epoch <= 10 (time budget), gate evaluation ~2)::

    cascade pipeline run --version ml1m-serving-bench dataset=var/serving_bench/ml-1m \
        artifacts=var/serving_bench/artifacts features.spark_master='local[2]' publish.announce=false \
        'retriever.configs=[retrieval/configs/ml-1m.yaml]' 'retriever.overrides=[train.epochs=2]' \
        'ranker.configs=[ranking/configs/ml-1m.yaml,ranking/configs/two-stage.yaml]' \
        'ranker.overrides=[model.sequence.long=sdim,train.epochs=1,train.max_minutes=10]'
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_common import GcMeter  # noqa: E402

BENCH_VAR = REPO / "var" / "serving_bench"
BUNDLE_VERSION = "ml1m-serving-bench"
TARGETS = {"p99_ms_at_c1": 15.0, "qps": 150.0, "p99_ms_at_qps": 50.0, "events_per_s": 20_000.0,
           "freshness_p99_ms": 500.0, "heavy_p99_ms_at_c1": 30.0}
HEAVY_SET = "L=10000 (synthetic users)"  # the heavy case: these users with --heavy-candidates candidates, C = 1


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q)) if len(xs) else float("nan")


class CpuMeter:
    """CPU used by processes outside ours (this process, its children, the services) over a phase, in cores."""

    def __init__(self, own_pids: list[int]) -> None:
        self.own = own_pids

    def _own_cpu(self) -> float:
        total = 0.0
        for pid in self.own:
            try:
                p = psutil.Process(pid)
                for q in [p, *p.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def start(self) -> None:
        c = psutil.cpu_times()
        self._t0 = time.monotonic()
        self._busy0 = c.user + c.system + c.nice + getattr(c, "irq", 0) + getattr(c, "softirq", 0)
        self._own0 = self._own_cpu()

    def stop(self) -> dict:
        c = psutil.cpu_times()
        busy = c.user + c.system + c.nice + getattr(c, "irq", 0) + getattr(c, "softirq", 0) - self._busy0
        dt = time.monotonic() - self._t0
        own = self._own_cpu() - self._own0
        return {"seconds": round(dt, 2), "own_cores": round(own / dt, 2),
                "foreign_cores": round(max(0.0, busy - own) / dt, 2), "load1": round(os.getloadavg()[0], 2)}


def wait_quiet(max_s: float, threshold: float = 2.5) -> float:
    t0 = time.monotonic()
    while os.getloadavg()[0] > threshold and time.monotonic() - t0 < max_s:
        print(f"waiting for a quiet machine: load {os.getloadavg()[0]:.2f} > {threshold}", flush=True)
        time.sleep(30)
    return time.monotonic() - t0


# ----------------------------------------------------------------------------- setup
def pipeline_config(dataset: Path, artifacts: Path):
    """The pipeline that builds the default bundle: the product's models and serving sizes, short training."""
    from jobs.pipeline import FeaturesStage, PipelineConfig, PublishConfig, TrainStage

    return PipelineConfig(
        dataset=str(dataset), artifacts=str(artifacts), features=FeaturesStage(spark_master="local[2]"),
        retriever=TrainStage(configs=("retrieval/configs/ml-1m.yaml",), overrides=("train.epochs=2",)),
        ranker=TrainStage(configs=("ranking/configs/ml-1m.yaml", "ranking/configs/two-stage.yaml"),
                          overrides=("model.sequence.long=sdim", "train.epochs=1", "train.max_minutes=10")),
        publish=PublishConfig(announce=False))


def default_bundle(dataset: Path, artifacts: Path) -> Path:
    """The published bundle under `artifacts`, built by `jobs.pipeline.run_pipeline` the first time."""
    from jobs.pipeline import read_published, run_pipeline

    pub = read_published(artifacts)
    if pub is not None:
        return Path(pub["bundle"])
    print(f"building the default bundle: the pipeline on ML-1M into {artifacts} (once; 15-25 min)", flush=True)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    res = run_pipeline(pipeline_config(dataset, artifacts), BUNDLE_VERSION, lambda m: print(m, flush=True))
    if not res.published:
        raise SystemExit(f"the pipeline did not publish {BUNDLE_VERSION} ({'; '.join(res.reasons)}); "
                         f"see {artifacts}/versions/{BUNDLE_VERSION}/evaluation.json, or pass --bundle DIR")
    print(f"  built in {res.seconds / 60:.1f} min: {res.bundle}", flush=True)
    return Path(res.bundle)


def prepare(args, work: Path):
    from features.datasets import import_dataset

    dataset = args.dataset
    if dataset is None:
        dataset = BENCH_VAR / "ml-1m"
        if not (dataset / "manifest.json").exists():
            print(f"importing ML-1M into {dataset}", flush=True)
            import_dataset(REPO.parent / "shared" / "data" / "ml-1m", dataset, overwrite=True)
    bundle = args.bundle if args.bundle is not None else default_bundle(Path(dataset), args.artifacts)
    return Path(dataset), Path(bundle)


def build_query_users(store, bundle, catalog, state, n_users: int, rng: np.random.Generator) -> dict[str, list[int]]:
    from features.sequence import SequenceState
    from serving.state.codec import CounterLog, UserRecord
    from serving.state.update import with_bucket_sums

    sets: dict[str, list[int]] = {}
    # L=1000: real ML-1M users with >= 1000 behaviors, their last 1000 under new ids
    uids = []
    recs = {}
    for u in range(1, 6041):
        r = store.read_user(u)
        if r is not None and len(r.seq) >= 1000:
            t = r.seq.tail(1000)
            recs[20_000_000 + u] = UserRecord(SequenceState(*(np.array(a) for a in (t.item_ids, t.ts_ms, t.actions, t.categories))),
                                              r.log, r.attrs, None if r.sigs is None else np.array(r.sigs[-1000:]),
                                              r.sig_spec, r.attrs_raw)
            uids.append(20_000_000 + u)
        if len(uids) >= n_users:
            break
    store.put_users(with_bucket_sums(recs, bundle) if bundle.sums_window else recs)  # SDIM sums, as ingest keeps
    sets["L=1000 (ML-1M users)"] = uids
    # L=10000: synthetic users, behaviors drawn by item popularity over the last 60 days
    ids, counts = store.top_items(len(catalog))
    p = counts / counts.sum()
    now = int(time.time() * 1000)
    recs = {}
    for i in range(n_users):
        items = rng.choice(ids, 10_000, p=p)
        ts = np.sort(rng.integers(now - 60 * 86_400_000, now - 1000, 10_000))
        acts = rng.choice([9, 8, 5], 10_000)
        seq = SequenceState(items, ts, acts, catalog.primary_categories(items))
        recent = ts >= now - 31 * 86_400_000
        log = CounterLog(ts[recent], (acts[recent] % 2).astype(np.uint8), 10_000, int((acts % 2).sum()))
        sigs = bundle.signatures(items) if bundle.sig_spec else None
        recs[30_000_000 + i] = UserRecord(seq, log, sig_spec=bundle.sig_spec if sigs is not None else 0, sigs=sigs)
    store.put_users(with_bucket_sums(recs, bundle) if bundle.sums_window else recs)
    sets["L=10000 (synthetic users)"] = list(recs)
    return sets


def start_server(work: Path, services, bundle: Path, dataset: Path, prefix: str, args) -> tuple[subprocess.Popen, str, Path]:
    from jobs.services import create_topics, free_port

    u = uuid.uuid4().hex[:6]
    topics = {f"bench-events-{u}": 4, f"bench-items-{u}": 1, f"bench-models-{u}": 1, f"bench-dlq-{u}": 1}
    create_topics(services.kafka.address, topics)
    port = free_port()
    cfg = work / "serving.yaml"
    cfg.write_text(
        f"grpc:\n  address: 127.0.0.1:{port}\n  max_workers: {args.server_workers}\n  max_in_flight: 64\n"
        f"  processes: {args.processes}\n"
        f"metrics:\n  address: 127.0.0.1:0\nredis:\n  url: {services.redis.address}\n  key_prefix: {prefix}\n"
        f"kafka:\n  bootstrap: {services.kafka.address}\n  topics:\n    events: bench-events-{u}\n"
        f"    items: bench-items-{u}\n    models: bench-models-{u}\n    dead_letter: bench-dlq-{u}\n"
        f"  events_group: bench-{u}\n  session_timeout_ms: 2000\n  heartbeat_interval_ms: 200\n"
        f"runtime:\n  torch_threads: {args.torch_threads}\n  validate_batches: {str(args.validate_batches).lower()}\n"
        f"  ranker_batch_max: {args.ranker_batch_max}\n  ranker_batch_wait_ms: {args.ranker_batch_wait_ms}\n"
        f"  gc_gen0_threshold: {args.gc_gen0_threshold}\n")
    log = work / "serve.log"
    lf = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--dev", "--config", str(cfg), "--model-bundle", str(bundle),
                             "--catalog", str(dataset)], stdout=lf, stderr=subprocess.STDOUT, cwd=REPO)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    hs = health_pb2_grpc.HealthStub(ch)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"cascade serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if hs.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"cascade serve not SERVING after 300s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    ch.close()
    return proc, f"127.0.0.1:{port}", log


# ----------------------------------------------------------------------------- measurements
def floors(address: str, store, user_id: int, item_ids: np.ndarray, n: int) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out = {}
    with grpc.insecure_channel(address) as ch:
        hs = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest()
        for _ in range(200):
            hs.Check(req)
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            hs.Check(req)
            lat.append(time.perf_counter() - t)
        out["grpc_empty_call"] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "calls": n}
    r = store._fast
    key = store.keys.user(user_id)
    item_keys = [store.keys.item_log(int(i)) for i in item_ids]
    for name, fn in (("redis_get_user_state", lambda: r.get(key)),
                     ("redis_mget_500_item_logs", lambda: r.mget(item_keys))):
        for _ in range(100):
            fn()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            lat.append(time.perf_counter() - t)
        out[name] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "calls": n}
    out["redis_get_user_state"]["bytes"] = len(r.get(key) or b"")
    return out


@dataclass
class LoadResult:
    concurrency: int
    requests: int = 0
    errors: dict = field(default_factory=lambda: defaultdict(int))
    latencies: list = field(default_factory=list)
    stages: dict = field(default_factory=lambda: defaultdict(list))
    fallbacks: dict = field(default_factory=lambda: defaultdict(int))
    seconds: float = 0.0


def closed_loop(address: str, users: list[int], concurrency: int, warmup_s: float, duration_s: float,
                candidates: int, k: int = 20) -> LoadResult:
    import grpc

    from serving.proto import ranking_pb2, ranking_pb2_grpc

    # one channel (one TCP connection) per client: many independent clients, as in production; with
    # several server processes sharing the port, the kernel spreads connections, not requests
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(concurrency)]
    res = LoadResult(concurrency)
    lock = threading.Lock()
    start = time.monotonic()
    measure_from = start + warmup_s
    end = measure_from + duration_s

    def worker(w: int) -> None:
        rnd = random.Random(w)
        stub = ranking_pb2_grpc.RankingStub(channels[w])
        while True:
            now = time.monotonic()
            if now >= end:
                return
            req = ranking_pb2.RankRequest(user_id=rnd.choice(users), k=k, num_candidates=candidates,
                                          exclude_seen=True, debug=True)
            t = time.perf_counter()
            try:
                r = stub.Rank(req, timeout=5)
                err = None
            except grpc.RpcError as e:
                err = e.code().name
            dt = time.perf_counter() - t
            if now < measure_from:
                continue
            with lock:
                if err:
                    res.errors[err] += 1
                    continue
                res.requests += 1
                res.latencies.append(dt)
                for s in r.timings:
                    res.stages[s.stage].append(s.seconds)
                if r.fallback_reason:
                    res.fallbacks[r.fallback_reason] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.seconds = duration_s
    for ch in channels:
        ch.close()
    return res


def produce(bootstrap: str, topic: str, users: np.ndarray, items: np.ndarray, n: int, rate: float, tag: str) -> float:
    from kafka import KafkaProducer

    from features.messages import encode_event, event_key
    from features.schema import Event

    prod = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=256 * 1024)
    rng = np.random.default_rng(hash(tag) % 2**32)
    us = rng.choice(users, n)
    its = rng.choice(items, n)
    kinds = rng.choice(["click", "rating", "impression", "view"], n, p=[0.4, 0.2, 0.3, 0.1])
    labels = rng.random(n) < 0.5
    t0 = time.monotonic()
    for i in range(n):
        e = Event(f"{tag}/{i}", int(us[i]), int(its[i]), int(time.time() * 1000), str(kinds[i]), float(labels[i]))
        prod.send(topic, key=event_key(e), value=encode_event(e))
        if rate and i % 50 == 49:
            ahead = t0 + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    prod.flush()
    prod.close()
    return time.monotonic() - t0


def consumer_phase(services, cfg, store, catalog, models, n_events: int, fresh_rate: float, fresh_s: float,
                   users: np.ndarray, items: np.ndarray, meter: CpuMeter) -> dict:
    from dataclasses import replace

    from features.messages import KafkaTopics
    from jobs.services import create_topics
    from serving.metrics import ServingMetrics
    from serving.stream.events import EventApplier, EventsConsumer

    out = {}
    # throughput: a backlog applied as fast as one consumer can
    topic = f"bench-backlog-{uuid.uuid4().hex[:6]}"
    create_topics(services.kafka.address, {topic: 4})
    t = produce(services.kafka.address, topic, users, items, n_events, 0, f"bl-{uuid.uuid4().hex[:6]}")
    print(f"  produced a backlog of {n_events:,} events in {t:.1f}s ({n_events / t:,.0f}/s, kafka-python)", flush=True)
    k = replace(cfg.kafka, topics=KafkaTopics(events=topic), events_group=f"bench-bl-{uuid.uuid4().hex[:6]}")
    metrics = ServingMetrics()
    applier = EventApplier(cfg.state, store, catalog, models, metrics, None, cfg.redis.item_log_prune_bytes)
    c = EventsConsumer(k, applier, metrics, None)
    c.start()
    if not c.ready.wait(60):
        raise RuntimeError(f"the benchmark consumer got no partitions in 60 s: {c.error}")
    meter.start()
    t0 = time.monotonic()
    with GcMeter() as gcm:
        while c.totals.messages < n_events and time.monotonic() - t0 < 600 and c.is_alive():
            time.sleep(0.05)
    dt = time.monotonic() - t0
    cpu = meter.stop()
    c.stop()
    c.join(30)
    batches = metrics.registry.get_sample_value("cascade_consumer_batch_seconds_count", {"topic": topic}) or 0
    out["throughput"] = {"events": c.totals.messages, "applied": c.totals.applied, "seconds": round(dt, 2),
                         "events_per_s": c.totals.messages / dt, "batches": int(batches), "cpu": cpu,
                         "users": {"total": c.totals.users, "cached": c.totals.cached_users,
                                   "stale": c.totals.stale_cached_users},
                         "gc": gcm.report(),
                         "note": "from partition assignment to the last commit; one consumer thread, this process"}
    # freshness: a steady stream at fresh_rate
    topic = f"bench-fresh-{uuid.uuid4().hex[:6]}"
    create_topics(services.kafka.address, {topic: 4})
    k = replace(cfg.kafka, topics=KafkaTopics(events=topic), events_group=f"bench-fr-{uuid.uuid4().hex[:6]}")
    metrics = ServingMetrics()
    applier = EventApplier(cfg.state, store, catalog, models, metrics, None, cfg.redis.item_log_prune_bytes)
    c = EventsConsumer(k, applier, metrics, None)
    c.start()
    if not c.ready.wait(60):
        raise RuntimeError(f"the benchmark consumer got no partitions in 60 s: {c.error}")
    n = int(fresh_rate * fresh_s)
    meter.start()
    # the producer is another process, as producers are: in this one its Python loop would share the GIL
    # with the consumer thread and delay it by the producer's own work
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        sent_s = pool.submit(produce, services.kafka.address, topic, users, items, n, fresh_rate,
                             f"fr-{uuid.uuid4().hex[:6]}").result()
    t0 = time.monotonic()
    while c.totals.messages < n and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    cpu = meter.stop()
    c.stop()
    c.join(30)
    f = list(applier.recent_freshness_s)
    out["freshness"] = {"rate": fresh_rate, "events": len(f), "seconds": round(sent_s, 2),
                        "p50_ms": pct(f, 50) * 1e3, "p99_ms": pct(f, 99) * 1e3, "max_ms": max(f) * 1e3 if f else None,
                        "cpu": cpu, "note": "Kafka produce timestamp -> Redis transaction committed (producer linger 5 ms,"
                                            " consumer poll 100 ms)"}
    return out


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from serving.config import RedisConfig, RuntimeConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/cascade-serving-bench"), help="online state/logs dir")
    p.add_argument("--dataset", type=Path, default=None,
                   help=f"canonical ML-1M dir (default: imported into {BENCH_VAR.relative_to(REPO)}/ml-1m)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="model bundle (default: the one `cascade pipeline run` builds on ML-1M, see the docstring)")
    p.add_argument("--artifacts", type=Path, default=BENCH_VAR / "artifacts",
                   help="pipeline artifacts of the default bundle (its published version is reused)")
    p.add_argument("--build-bundle-only", action="store_true", help="build (or find) the default bundle and exit")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    p.add_argument("--k", type=int, default=20, help="items per answer (the issue's k = 20)")
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--heavy-candidates", type=int, default=1000,
                   help="the heavy case: 10k-behavior users with this many candidates at C = 1 (0: skip)")
    p.add_argument("--users-per-set", type=int, default=64)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per (set, concurrency)")
    p.add_argument("--floor-calls", type=int, default=2000)
    p.add_argument("--consumer-events", type=int, default=200_000)
    p.add_argument("--fresh-rate", type=float, default=2000.0)
    p.add_argument("--fresh-seconds", type=float, default=10.0)
    p.add_argument("--server-workers", type=int, default=8, help="gRPC handler threads per server process")
    p.add_argument("--processes", type=int, default=2,
                   help="server processes sharing the port (grpc.processes; 2 = one per core, the 2-core setting)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--validate-batches", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ranker-batch-max", type=int, default=8,
                   help="runtime.ranker_batch_max: requests per ranker forward (micro-batching; 1 = off)")
    p.add_argument("--ranker-batch-wait-ms", type=float, default=0.0, help="runtime.ranker_batch_wait_ms")
    p.add_argument("--gc-gen0-threshold", type=int, default=RuntimeConfig().gc_gen0_threshold,
                   help="runtime.gc_gen0_threshold of the server and of the benchmark's consumer (0: Python's defaults)")
    p.add_argument("--ingest-cache-mb", type=int, default=RedisConfig().ingest_cache_mb,
                   help="redis.ingest_cache_mb of the benchmark's consumer (0: every user read from Redis)")
    p.add_argument("--quick", action="store_true", help="duration 4 s, 50k consumer events, 5 s freshness")
    p.add_argument("--wait-quiet", action="store_true", help="wait (<= 30 min) for a 1-minute load <= 2.5 first")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--tag", default="", help="suffix of the results file (results/serving/serving-ml1m<tag>.json)")
    p.add_argument("--consumer", action=argparse.BooleanOptionalAction, default=True,
                   help="run the consumer phase (throughput, freshness)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.consumer_events, args.fresh_seconds = 4.0, 50_000, 5.0
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from jobs.services import LocalServices
    from serving.bootstrap import bootstrap_dataset
    from serving.catalog import load_catalog
    from serving.config import ServingConfig
    from serving.models import ModelHolder, load_verified_bundle
    from serving.runtime import CatalogRef
    from serving.state.redis_store import RedisOnlineStore

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    waited = wait_quiet(1800) if args.wait_quiet else 0.0
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_at_start": os.getloadavg(),
                                "waited_for_quiet_s": round(waited, 1)}, "targets": TARGETS}
    dataset, bundle_dir = prepare(args, work)
    if args.build_bundle_only:
        print(f"bundle       {bundle_dir}")
        return 0
    report["setup"] = {"dataset": str(dataset), "bundle": str(bundle_dir), "server_processes": args.processes,
                       "server_workers": args.server_workers, "torch_threads": args.torch_threads,
                       "validate_batches": args.validate_batches, "ranker_batch_max": args.ranker_batch_max,
                       "ranker_batch_wait_ms": args.ranker_batch_wait_ms, "k": args.k,
                       "gc_gen0_threshold": args.gc_gen0_threshold, "ingest_cache_mb": args.ingest_cache_mb,
                       "candidates": args.candidates}
    if args.bundle is None:
        from features.config import to_dict

        report["setup"]["bundle_built_by"] = {"pipeline": to_dict(pipeline_config(dataset, args.artifacts)),
                                              "version": BUNDLE_VERSION}
    with LocalServices(work / "services") as svc:
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        from features.config import load_config

        cfg = load_config(ServingConfig, None, [f"redis.url={svc.redis.address}", f"redis.key_prefix={prefix}",
                                                f"kafka.bootstrap={svc.kafka.address}",
                                                f"redis.ingest_cache_mb={args.ingest_cache_mb}"])
        store = RedisOnlineStore(cfg.redis)
        catalog = load_catalog(dataset)
        bundle = load_verified_bundle(bundle_dir, cfg.state.stats, cfg.state.retention_ms())
        manifest = bundle.manifest
        report["setup"]["model"] = {"version": bundle.version, "retriever": manifest["retriever"]["loader"],
                                    "ranker": manifest["ranker"]["loader"], "sdim": bool(bundle.sig_spec)}
        t0 = time.perf_counter()
        s = bootstrap_dataset(store, dataset, cfg.state, catalog, bundle=bundle)
        print(f"bootstrapped {s.users:,} users / {s.events:,} events into Redis in {time.perf_counter() - t0:.1f}s", flush=True)
        sets = build_query_users(store, bundle, catalog, cfg.state, args.users_per_set, np.random.default_rng(0))
        report["setup"]["query_sets"] = {k: len(v) for k, v in sets.items()}
        proc, address, log = start_server(work, svc, bundle_dir, dataset, prefix, args)
        meter = CpuMeter([os.getpid(), svc.kafka.pid, svc.redis.pid])
        try:
            print("floors ...", flush=True)
            first = sets["L=1000 (ML-1M users)"][0]
            meter.start()
            report["floors"] = floors(address, store, first, catalog.item_ids[:args.candidates], args.floor_calls)
            report["floors"]["cpu"] = meter.stop()
            loads = []
            for name, users in sets.items():
                for c in args.concurrency:
                    print(f"load {name} concurrency {c} ...", flush=True)
                    meter.start()
                    r = closed_loop(address, users, c, args.warmup, args.duration, args.candidates, args.k)
                    cpu = meter.stop()
                    loads.append({
                        "set": name, "concurrency": c, "requests": r.requests, "qps": r.requests / r.seconds,
                        "errors": dict(r.errors), "fallbacks": dict(r.fallbacks),
                        "p50_ms": pct(r.latencies, 50) * 1e3, "p99_ms": pct(r.latencies, 99) * 1e3,
                        "stages_ms": {s: {"p50": pct(v, 50) * 1e3, "p99": pct(v, 99) * 1e3} for s, v in r.stages.items()},
                        "cpu": cpu,
                    })
            if args.heavy_candidates:
                print(f"load heavy: {HEAVY_SET}, {args.heavy_candidates} candidates, concurrency 1 ...", flush=True)
                meter.start()
                r = closed_loop(address, sets[HEAVY_SET], 1, args.warmup, args.duration, args.heavy_candidates, args.k)
                cpu = meter.stop()
                loads.append({
                    "set": f"{HEAVY_SET}, {args.heavy_candidates} candidates", "heavy": True, "concurrency": 1,
                    "requests": r.requests, "qps": r.requests / r.seconds, "errors": dict(r.errors),
                    "fallbacks": dict(r.fallbacks), "p50_ms": pct(r.latencies, 50) * 1e3,
                    "p99_ms": pct(r.latencies, 99) * 1e3,
                    "stages_ms": {s: {"p50": pct(v, 50) * 1e3, "p99": pct(v, 99) * 1e3} for s, v in r.stages.items()},
                    "cpu": cpu})
            report["load"] = loads
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.consumer:
            print("consumer ...", flush=True)
            holder = ModelHolder()
            holder.swap(bundle)
            from serving.heap import settle_heap

            # the heap as a server's once its model is loaded (ServingApp.start): long-lived objects frozen
            settle_heap(args.gc_gen0_threshold)
            users = np.array(sorted(set(range(1, 6041))), np.int64)
            report["consumer"] = consumer_phase(svc, cfg, store, CatalogRef(catalog), holder, args.consumer_events,
                                                args.fresh_rate, args.fresh_seconds, users, catalog.item_ids, meter)
        store.close()
    report["machine"]["load_at_end"] = os.getloadavg()
    print_report(report)
    if not args.quick:
        from benchmarks.results_file import write_results

        print(f"wrote {write_results('serving/serving-ml1m' + args.tag, report, benchmark='serving')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


def print_report(r: dict) -> None:
    f = r["floors"]
    print("\n== floors (same run, same client) ==")
    print(f"{'floor':<28}{'p50 ms':>9}{'p99 ms':>9}")
    for k in ("grpc_empty_call", "redis_get_user_state", "redis_mget_500_item_logs"):
        print(f"{k:<28}{f[k]['p50_ms']:>9.2f}{f[k]['p99_ms']:>9.2f}")
    print(f"(foreign CPU during floors: {f['cpu']['foreign_cores']} cores, load {f['cpu']['load1']})")
    stages = ["state_read", "user_tower", "ann", "filter_seen", "item_stats", "features", "ranker", "topk", "total"]
    print(f"\n== closed-loop Rank (k={r['setup'].get('k', 10)}, {r['setup'].get('candidates', 500)} candidates, exclude_seen); client latency and server stages (p50/p99 ms) ==")
    head = f"{'set':<26}{'C':>3}{'QPS':>7}{'p50':>7}{'p99':>7}{'err':>5}  " + "  ".join(f"{s[:9]:>11}" for s in stages)
    print(head + f"{'foreign':>9}")
    for l in r["load"]:
        st = "  ".join(f"{l['stages_ms'].get(s, {}).get('p50', float('nan')):>5.2f}/{l['stages_ms'].get(s, {}).get('p99', float('nan')):<5.1f}"
                       for s in stages)
        print(f"{l['set']:<26}{l['concurrency']:>3}{l['qps']:>7.0f}{l['p50_ms']:>7.1f}{l['p99_ms']:>7.1f}"
              f"{sum(l['errors'].values()):>5}  {st}{l['cpu']['foreign_cores']:>9}")
    c = r.get("consumer")
    t, fr = (c["throughput"], c["freshness"]) if c else ({}, {})
    if c:
        print("\n== events consumer (one process) ==")
        print(f"throughput  {t['events']:,} events in {t['seconds']}s = {t['events_per_s']:,.0f} events/s "
              f"({t['batches']} batches; foreign CPU {t['cpu']['foreign_cores']} cores)")
        if "users" in t:
            u = t["users"]
            print(f"users       {u['total']:,} per-batch users: {u['cached']:,} from the consumer's cache "
                  f"({u['stale']:,} of them stale), the rest read from Redis")
        print(f"freshness   {fr['events']:,} events at {fr['rate']:.0f}/s: p50 {fr['p50_ms']:.1f} ms, p99 {fr['p99_ms']:.1f} ms, "
              f"max {fr['max_ms']:.1f} ms")
    tg = r["targets"]
    c1 = [l for l in r["load"] if l["concurrency"] == 1 and not l.get("heavy")]
    best = max(r["load"], key=lambda l: l["qps"] if l["p99_ms"] <= tg["p99_ms_at_qps"] else -1)
    print("\n== against the targets ==")
    for l in c1:
        print(f"p99 at C=1 ({l['set']}): {l['p99_ms']:.1f} ms  (target <= {tg['p99_ms_at_c1']:.0f}) "
              f"{'MET' if l['p99_ms'] <= tg['p99_ms_at_c1'] else 'MISSED'}")
    for l in [l for l in r["load"] if l.get("heavy")]:
        print(f"heavy p99 at C=1 ({l['set']}): {l['p99_ms']:.1f} ms  (target <= {tg['heavy_p99_ms_at_c1']:.0f}) "
              f"{'MET' if l['p99_ms'] <= tg['heavy_p99_ms_at_c1'] else 'MISSED'}")
    for name in {l["set"] for l in r["load"] if not l.get("heavy")}:
        ok = [l for l in r["load"] if l["set"] == name and l["p99_ms"] <= tg["p99_ms_at_qps"]]
        q = max((l["qps"] for l in ok), default=0.0)
        print(f"best QPS with p99 <= {tg['p99_ms_at_qps']:.0f} ms ({name}): {q:.0f}  (target >= {tg['qps']:.0f}) "
              f"{'MET' if q >= tg['qps'] else 'MISSED'}")
    if c:
        print(f"consumer: {t['events_per_s']:,.0f} events/s (target >= {tg['events_per_s']:,.0f}) "
              f"{'MET' if t['events_per_s'] >= tg['events_per_s'] else 'MISSED'}")
        print(f"freshness p99: {fr['p99_ms']:.0f} ms (target <= {tg['freshness_p99_ms']:.0f}) "
              f"{'MET' if fr['p99_ms'] <= tg['freshness_p99_ms'] else 'MISSED'}")
    del best


if __name__ == "__main__":
    sys.exit(main())
