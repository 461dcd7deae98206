"""How fast one process applies events to the online state, and how soon an event is visible.

    python benchmarks/consumer_bench.py --store single            # one redis-server
    python benchmarks/consumer_bench.py --store cluster           # a three-master Redis Cluster
    python benchmarks/consumer_bench.py --store single --quick    # a smoke run (seconds)

The events consumer's apply step (`serving.stream.events.EventApplier.apply`: decode, dedupe, per-user
state update, the store's ingest) on batches of already-fetched records, against a real redis-server or
a real local Redis Cluster (`jobs.services`), so the Kafka client's own cost is out (serving_bench.py's
consumer phase measures it with tansu). Events: ML-100K's users and items (Zipf-popular items), clicks,
impressions and ratings in time order, each user's state grown from empty.

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

from benchmarks.bench_common import print_table  # noqa: E402
from benchmarks.results_file import write_results  # noqa: E402

USERS, ITEMS = 943, 1682  # ML-100K's, whose catalog the applier reads


def make_records(n: int, seed: int, t0_ms: int, tag: str) -> list[SimpleNamespace]:
    """n encoded `events` records (the fields EventApplier reads), event times 1 ms apart from t0_ms."""
    from features.messages import encode_event
    from features.schema import Event

    rng = np.random.default_rng(seed)
    users = rng.integers(1, USERS + 1, n)
    items = np.minimum(rng.zipf(1.3, n), ITEMS)
    kinds = rng.choice(["click", "impression", "rating"], n, p=[0.5, 0.4, 0.1])
    labels = rng.integers(0, 2, n)
    now = int(time.time() * 1000)
    return [SimpleNamespace(topic="events", partition=0, offset=i, timestamp=now, value=encode_event(
        Event(f"{tag}{i}", int(u), int(it), t0_ms + i, str(k), float(lb))))
        for i, (u, it, k, lb) in enumerate(zip(users.tolist(), items.tolist(), kinds.tolist(), labels.tolist()))]


def _applier(store, catalog_dir: Path):
    from serving.catalog import load_catalog
    from serving.config import StateConfig
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import CatalogRef
    from serving.stream.events import EventApplier

    return EventApplier(StateConfig(), store, CatalogRef(load_catalog(catalog_dir)), ModelHolder(), ServingMetrics(),
                        None)


def throughput(applier, n: int, batch: int) -> dict:
    # in time order and before the stream's events (an hour ago, 1 ms apart): every user's events arrive in order
    recs = make_records(n, 0, int(time.time() * 1000) - 3_600_000, f"bl{uuid.uuid4().hex[:6]}-")
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    applied = 0
    for s in range(0, n, batch):
        applied += applier.apply(recs[s:s + batch]).applied
    dt = time.perf_counter() - t0
    return {"events": n, "applied": applied, "batch": batch, "seconds": round(dt, 3), "events_per_s": n / dt,
            "cpu_s": round(time.process_time() - cpu0, 3)}


def freshness(applier, rate: float, seconds: float, poll_ms: float) -> dict:
    n = int(rate * seconds)
    recs = make_records(n, 1, int(time.time() * 1000), f"fr{uuid.uuid4().hex[:6]}-")
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
                    help="a raw dataset whose catalog the applier uses (item categories)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 20k events, 2 s of stream")
    args = ap.parse_args(argv)
    if args.quick:
        args.events, args.seconds = 20_000, 2.0

    from features.datasets import import_dataset
    from jobs.services import LocalServices, start_redis_cluster, stop_pid
    from serving.config import RedisConfig
    from serving.state.redis_store import RedisOnlineStore

    with tempfile.TemporaryDirectory(prefix="consumer-bench-") as tmp:
        work = Path(tmp)
        import_dataset(args.dataset, work / "data", overwrite=True)
        nodes, svc = [], None
        try:
            if args.store == "cluster":
                nodes = start_redis_cluster(work / "cluster")
                cfg = RedisConfig(url=nodes[0].address, key_prefix="bench", cluster=True, item_groups=16)
            else:
                svc = LocalServices(work / "redis", kafka=False).__enter__()
                cfg = RedisConfig(url=svc.redis.address, key_prefix="bench")
            store = RedisOnlineStore(cfg)
            applier = _applier(store, work / "data")
            tp = throughput(applier, args.events, args.batch)
            fr = freshness(applier, args.rate, args.seconds, args.poll_ms)
            store.close()
        finally:
            for n in nodes:
                stop_pid(n.pid)
            if svc is not None:
                svc.stop()
    print_table(f"consumer apply step, {args.store} Redis, one process", ["metric", "value"], [
        ["events/s (backlog, batch %d)" % args.batch, f"{tp['events_per_s']:,.0f}"],
        ["event-to-visible p50 / p99 (%.0f ev/s, poll %.0f ms)" % (args.rate, args.poll_ms),
         f"{fr['p50_ms']:.1f} / {fr['p99_ms']:.1f} ms"]])
    path = write_results(f"serving/{'quick/' if args.quick else ''}consumer-{args.store}",
                         {"throughput": tp, "freshness": fr}, benchmark="consumer")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
