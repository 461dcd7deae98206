"""How fast one process applies events to the online state, and how soon an event is visible.

    python benchmarks/consumer_bench.py --store single            # one redis-server
    python benchmarks/consumer_bench.py --store cluster           # a three-master Redis Cluster
    python benchmarks/consumer_bench.py --store single --quick    # a smoke run (seconds)
    python benchmarks/consumer_bench.py --store single --dataset ../shared/data/ml-1m --bootstrap \
        --bundle var/serving_bench/artifacts/versions/<v>/bundle    # the served path: ML-1M state + SDIM sums
    python benchmarks/consumer_bench.py --store single --dataset ../shared/data/ml-1m --bootstrap --random-bundle
                                        # the same architecture with random weights: no 26-minute training first

The events consumer's apply step (`serving.stream.events.EventApplier.apply`: decode, dedupe, per-user
state update, the store's ingest) on batches of already-fetched records, against a real redis-server or
a real local Redis Cluster (`jobs.services`), so the Kafka client's own cost is out (serving_bench.py's
consumer phase measures it with tansu). Events: the dataset's users (uniform) and items (Zipf-popular),
clicks, impressions and ratings in time order; each user's state grown from empty, or with `--bootstrap`
from the dataset's history (`serving.bootstrap`, as a server starts). Without `--bundle` no model is
served, so no SDIM signatures or bucket sums are kept: a lower bound on the work per event. With a
bundle (the serving benchmark's default one holds the SDIM ranker) the applier keeps them as the server
does, and the results file is named after the dataset and `-sdim`.

* throughput: a backlog applied in batches of `--batch` records (kafka.max_poll_records' role);
  events/s of this one process (its thread holds the GIL: one core).
* freshness: a steady stream at `--rate` events/s; every `--poll-ms` the records produced since the
  last poll are applied as one batch; event-to-visible = its ingest returned - the event's produce time.

Prints a table and writes ``benchmarks/results/serving/consumer-<store>.json`` (--quick: under
``serving/quick/``, which git ignores: a smoke test, not a figure to quote). Issue 17's target:
>= 20k events/s per process, event-to-visible p99 <= 500 ms.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_common import GcMeter, print_table  # noqa: E402
from benchmarks.results_file import write_results  # noqa: E402


def make_records(n: int, seed: int, t0_ms: int, tag: str, user_ids: np.ndarray, item_ids: np.ndarray
                 ) -> list[SimpleNamespace]:
    """n encoded `events` records (the fields EventApplier reads), event times 1 ms apart from t0_ms."""
    from features.messages import encode_event
    from features.schema import Event

    rng = np.random.default_rng(seed)
    users = rng.choice(user_ids, n)
    items = item_ids[np.minimum(rng.zipf(1.3, n), len(item_ids)) - 1]
    kinds = rng.choice(["click", "impression", "rating"], n, p=[0.5, 0.4, 0.1])
    labels = rng.integers(0, 2, n)
    now = int(time.time() * 1000)
    return [SimpleNamespace(topic="events", partition=0, offset=i, timestamp=now, value=encode_event(
        Event(f"{tag}{i}", int(u), int(it), t0_ms + i, str(k), float(lb))))
        for i, (u, it, k, lb) in enumerate(zip(users.tolist(), items.tolist(), kinds.tolist(), labels.tolist()))]


def _applier(store, catalog, bundle):
    from serving.config import StateConfig
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import CatalogRef
    from serving.stream.events import EventApplier

    holder = ModelHolder()
    if bundle is not None:
        holder.swap(bundle)
    return EventApplier(StateConfig(), store, CatalogRef(catalog), holder, ServingMetrics(), None)


def _load_bundle(path: Path):
    """The served model of bundle `path`, as the server loads it (verified)."""
    from serving.config import StateConfig
    from serving.models import load_verified_bundle

    st = StateConfig()
    return load_verified_bundle(path, st.stats, st.retention_ms())


class _Cpu:
    """CPU seconds of this process and of the Redis server(s) (INFO cpu) between start and stop: per event
    they do not depend on what else the machine runs, unlike events/s."""

    def __init__(self, store) -> None:
        self.store = store

    def _redis(self) -> float:
        client = self.store._slow
        if self.store.cluster:  # every master's, one dict per node
            from redis.cluster import RedisCluster

            rows = list(client.info("cpu", target_nodes=RedisCluster.PRIMARIES).values())
        else:
            rows = [client.info("cpu")]
        return sum(r["used_cpu_user"] + r["used_cpu_sys"] for r in rows)

    def __enter__(self) -> "_Cpu":
        self.c0, self.r0 = time.process_time(), self._redis()
        return self

    def __exit__(self, *exc) -> None:
        self.client_s, self.redis_s = time.process_time() - self.c0, self._redis() - self.r0


def throughput(applier, n: int, batch: int, users: np.ndarray, items: np.ndarray) -> dict:
    # in time order and before the stream's events (an hour ago, 1 ms apart): every user's events arrive in order
    recs = make_records(n, 0, int(time.time() * 1000) - 3_600_000, f"bl{uuid.uuid4().hex[:6]}-", users, items)
    t0 = time.perf_counter()
    applied = 0
    with _Cpu(applier.store) as cpu, GcMeter() as gcm:
        for s in range(0, n, batch):
            applied += applier.apply(recs[s:s + batch]).applied
    dt = time.perf_counter() - t0
    return {"events": n, "applied": applied, "batch": batch, "seconds": round(dt, 3), "events_per_s": n / dt,
            "cpu_s": round(cpu.client_s, 3), "client_cpu_us_per_event": cpu.client_s / n * 1e6,
            "redis_cpu_us_per_event": cpu.redis_s / n * 1e6, "gc": gcm.report()}


def freshness(applier, rate: float, seconds: float, poll_ms: float, users: np.ndarray, items: np.ndarray) -> dict:
    n = int(rate * seconds)
    recs = make_records(n, 1, int(time.time() * 1000), f"fr{uuid.uuid4().hex[:6]}-", users, items)
    start = time.perf_counter()
    due = start + np.arange(n) / rate  # produce time of each record
    lat: list[float] = []
    i = 0
    while i < n:
        now = time.perf_counter()
        j = int(np.searchsorted(due, now, side="right"))
        if j > i:
            applier.apply(recs[i:j])
            done = time.perf_counter()
            lat.extend((done - due[i:j]).tolist())
            i = j
        time.sleep(max(0.0, poll_ms / 1000 - (time.perf_counter() - now)))
    q = np.percentile(lat, [50, 99]) * 1000
    return {"rate": rate, "events": n, "poll_ms": poll_ms, "p50_ms": float(q[0]), "p99_ms": float(q[1]),
            "max_ms": float(max(lat) * 1000)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=["single", "cluster"], default="single")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--rate", type=float, default=10_000.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--poll-ms", type=float, default=100.0)
    ap.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k",
                    help="a raw dataset: its users and catalog (the events' ids, item categories)")
    served = ap.add_mutually_exclusive_group()
    served.add_argument("--bundle", type=Path, default=None,
                    help="a model bundle to serve (SDIM signatures and bucket sums kept as the server keeps them)")
    served.add_argument("--random-bundle", action="store_true",
                    help="serve a bundle of the serving bench's architecture (ML-1M configs, SDIM ranker) with "
                         "random weights (jobs.random_bundle): the same work per event as a trained one, no training")
    ap.add_argument("--bootstrap", action="store_true", help="load the dataset's state first (users' histories)")
    ap.add_argument("--tag", default="", help="results file suffix (e.g. the code version compared)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20k events, 2 s of stream")
    args = ap.parse_args(argv)
    if args.quick:
        args.events, args.seconds = 20_000, 2.0

    from features.datasets import import_dataset
    from features.datasets.common import read_table
    from jobs.services import LocalServices, start_redis_cluster, stop_pid
    from serving.bootstrap import bootstrap_dataset
    from serving.catalog import load_catalog
    from serving.config import RedisConfig, RuntimeConfig, StateConfig
    from serving.state.redis_store import RedisOnlineStore

    if args.bundle is not None or args.random_bundle:
        import torch

        torch.set_num_threads(1)  # the server's setting: one torch thread per process
    bundle = None if args.bundle is None else _load_bundle(args.bundle)
    boot = None

    with tempfile.TemporaryDirectory(prefix="consumer-bench-") as tmp:
        work = Path(tmp)
        import_dataset(args.dataset, work / "data", overwrite=True)
        catalog = load_catalog(work / "data")
        if args.random_bundle:
            from jobs.random_bundle import RandomBundleSpec, write_random_bundle

            bundle = _load_bundle(write_random_bundle(catalog, work / "models", "random-sdim", 0,
                                                      RandomBundleSpec.ml1m_sdim())[0])
        users = np.unique(read_table(work / "data", "users").column("user_id").to_numpy()).astype(np.int64)
        nodes, svc = [], None
        try:
            if args.store == "cluster":
                nodes = start_redis_cluster(work / "cluster")
                cfg = RedisConfig(url=nodes[0].address, key_prefix="bench", cluster=True, item_groups=16)
            else:
                svc = LocalServices(work / "redis", kafka=False).__enter__()
                cfg = RedisConfig(url=svc.redis.address, key_prefix="bench")
            store = RedisOnlineStore(cfg)
            if args.bootstrap:
                b = bootstrap_dataset(store, work / "data", StateConfig(), catalog, bundle=bundle)
                boot = {"users": b.users, "behaviors_kept": b.behaviors_kept, "seconds": round(b.seconds, 1)}
                print(f"bootstrapped {b.users:,} users ({b.behaviors_kept:,} behaviors) in {b.seconds:.1f}s", flush=True)
            applier = _applier(store, catalog, bundle)
            from serving.heap import settle_heap

            settle_heap(RuntimeConfig().gc_gen0_threshold)  # as a server once its model is loaded
            tp = throughput(applier, args.events, args.batch, users, catalog.item_ids)
            fr = freshness(applier, args.rate, args.seconds, args.poll_ms, users, catalog.item_ids)
            store.close()
        finally:
            for n in nodes:
                stop_pid(n.pid)
            if svc is not None:
                svc.stop()
    served = "no model" if bundle is None else f"bundle {bundle.version} (SDIM sums: window {bundle.sums_window})"
    print_table(f"consumer apply step, {args.store} Redis, one process, {args.dataset.name}, {served}",
                ["metric", "value"], [
        ["events/s (backlog, batch %d)" % args.batch, f"{tp['events_per_s']:,.0f}"],
        ["CPU per event: this process / Redis", f"{tp['client_cpu_us_per_event']:.1f} / "
                                                f"{tp['redis_cpu_us_per_event']:.1f} us"],
        ["event-to-visible p50 / p99 (%.0f ev/s, poll %.0f ms)" % (args.rate, args.poll_ms),
         f"{fr['p50_ms']:.1f} / {fr['p99_ms']:.1f} ms"]])
    name = f"consumer-{args.store}" + ("" if bundle is None else f"-{args.dataset.name}-sdim") + \
        ("-random" if args.random_bundle else "") + args.tag
    path = write_results(f"serving/{'quick/' if args.quick else ''}{name}",
                         {"dataset": args.dataset.name, "bundle": None if bundle is None else
                          {"version": bundle.version, "sums_window": bundle.sums_window, "sig_spec": bundle.sig_spec,
                           "random_weights": args.random_bundle},
                          "bootstrap": boot, "throughput": tp, "freshness": fr}, benchmark="consumer")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
