"""One served request in process: where its time goes, without gRPC, Redis or other clients.

The serving benchmark (benchmarks/serving_bench.py) measures the product end to end; on a 2-core
machine the client, both server processes, Redis and Kafka share the CPU, so its per-stage numbers
carry all of that. This script runs the server's own `serving.runtime.Runtime` (the same stages, the
same bundle loader and model manager the server uses) over the serving benchmark's default bundle
(the pipeline-built ML-1M retriever + full second-stage ranker, built once by
`serving_bench.py --build-bundle-only`) with the online state in the in-memory store, one request at
a time on one thread, and reports:

* per request: wall-clock p50/p99 and the process CPU time, per-stage p50 (the runtime's own timings);
* jitter: one user's request repeated (what the machine itself adds: same work every time);
* the spread between users (median of each user's repeats);
* work per request: Python function calls on the handler thread (cProfile, counted, not timed; the
  ranker's forward runs on the micro-batching worker).

Query set: real ML-1M users with >= 1,000 behaviors, their last 1,000 (the serving benchmark's
"L=1000" set), 500 candidates, k = 20, exclude_seen.

    python benchmarks/request_bench.py                  # writes results/serving/request-ml1m.json
    python benchmarks/request_bench.py --quick          # 100 requests (results/serving/quick/, not committed)
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_common import load1, print_table, write_json  # noqa: E402
from results_file import write_results  # noqa: E402


def build_runtime(users_per_set: int, ranker_batch_max: int):
    """The server's runtime over the default bundle, state bootstrapped into the in-memory store."""
    import torch

    from features.config import load_config
    from serving.bootstrap import bootstrap_dataset
    from serving.catalog import load_catalog
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder, load_verified_bundle
    from serving.runtime import Availability, CatalogRef, Popularity, Runtime
    from serving.state.memory_store import InMemoryOnlineStore
    from serving_bench import BENCH_VAR, build_query_users, default_bundle

    dataset = BENCH_VAR / "ml-1m"
    if not (dataset / "manifest.json").exists():
        raise SystemExit(f"{dataset} is missing: run `python benchmarks/serving_bench.py --build-bundle-only` first")
    bundle_dir = default_bundle(dataset, BENCH_VAR / "artifacts")
    cfg = load_config(ServingConfig, None, [f"runtime.ranker_batch_max={ranker_batch_max}"])
    torch.set_num_threads(cfg.runtime.torch_threads)
    catalog = load_catalog(dataset)
    bundle = load_verified_bundle(bundle_dir, cfg.state.stats, cfg.state.retention_ms())
    store = InMemoryOnlineStore()
    bootstrap_dataset(store, dataset, cfg.state, catalog, bundle=bundle)
    sets = build_query_users(store, bundle, catalog, cfg.state, users_per_set, np.random.default_rng(0))
    metrics, holder, cat = ServingMetrics(), ModelHolder(), CatalogRef(catalog)
    ModelManager(holder, cat, cfg.state, cfg.models, metrics).load(bundle_dir, bundle.version, bundle.checksum)
    rt = Runtime(cfg.limits, cfg.runtime, store, holder, cat, Popularity(*store.top_items(100)), Availability(),
                 metrics)
    return rt, sets["L=1000 (ML-1M users)"], str(bundle_dir), bundle.version


def timed(rt, queries) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """Wall ms, process-CPU ms per request and the runtime's stage timings (ms)."""
    wall, cpu, stages = [], [], {}
    for q in queries:
        c, t = time.process_time(), time.perf_counter()
        r = rt.rank(q)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        for s, sec in r.timings:
            stages.setdefault(s, []).append(sec * 1e3)
    return np.array(wall) * 1e3, np.array(cpu) * 1e3, stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="requests measured (cycling over the users)")
    p.add_argument("--repeats", type=int, default=300, help="repeats of one user's request (jitter)")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--ranker-batch-max", type=int, default=8, help="the server default (micro-batching on)")
    p.add_argument("--tag", default="", help="suffix of results/serving/request-ml1m<tag>.json")
    p.add_argument("--quick", action="store_true", help="100 requests, 50 repeats, 8 users")
    p.add_argument("--json", default=None, help="also write this run's raw document here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.users = 100, 50, 8
    from serving.runtime import RankQuery

    t0 = time.perf_counter()
    rt, users, bundle, version = build_runtime(args.users, args.ranker_batch_max)
    print(f"runtime over {version} ready in {time.perf_counter() - t0:.1f}s; {len(users)} users", flush=True)
    queries = [RankQuery(user_id=users[i % len(users)], k=args.k, num_candidates=args.candidates, exclude_seen=True)
               for i in range(args.n)]
    timed(rt, queries[:30])  # warm-up
    l0 = load1()
    wall, cpu, stages = timed(rt, queries)
    rep_wall, _, _ = timed(rt, [queries[0]] * args.repeats)
    per_user = np.array([np.median(timed(rt, [RankQuery(user_id=u, k=args.k, num_candidates=args.candidates,
                                                        exclude_seen=True)] * 10)[0]) for u in users])
    prof = cProfile.Profile()
    prof.enable()
    profiled = queries[:100]
    timed(rt, profiled)
    prof.disable()
    # the handler thread's calls (the ranker forward itself runs on the micro-batching worker thread)
    calls = pstats.Stats(prof).total_calls / len(profiled)  # type: ignore[attr-defined]
    rt.close()

    def q(a, p):
        return float(np.percentile(a, p))

    res = {
        "setup": {"bundle": bundle, "version": version, "users": len(users), "candidates": args.candidates,
                  "k": args.k, "exclude_seen": True, "ranker_batch_max": args.ranker_batch_max, "threads": 1,
                  "load_before": l0, "load_after": load1()},
        "requests": {"n": args.n, "p50_ms": q(wall, 50), "p90_ms": q(wall, 90), "p99_ms": q(wall, 99),
                     "mean_ms": float(wall.mean()), "cpu_mean_ms": float(cpu.mean()),
                     "stages_p50_ms": {s: float(np.median(v)) for s, v in stages.items()}},
        "one_user_repeated": {"n": args.repeats, "p50_ms": q(rep_wall, 50), "p90_ms": q(rep_wall, 90),
                              "p99_ms": q(rep_wall, 99), "max_ms": float(rep_wall.max())},
        "per_user_median_ms": {"min": float(per_user.min()), "p50": float(np.median(per_user)),
                               "max": float(per_user.max())},
        "python_calls_per_request_handler_thread": calls,
    }
    r = res["requests"]
    print_table("one request in process (ms)", ["", "p50", "p90", "p99", "cpu mean"],
                [["requests", *(f"{r[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "cpu_mean_ms"))],
                 ["one user repeated", *(f"{res['one_user_repeated'][k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")),
                  ""]])
    print("stages p50 ms: " + "  ".join(f"{s} {v:.2f}" for s, v in r["stages_p50_ms"].items()))
    u = res["per_user_median_ms"]
    print(f"per-user medians: min {u['min']:.2f}  p50 {u['p50']:.2f}  max {u['max']:.2f} ms; "
          f"{calls:,.0f} Python calls per request on the handler thread")
    name = "serving/quick/request-ml1m" if args.quick else f"serving/request-ml1m{args.tag}"  # quick: never committed
    path = write_results(name, res, benchmark="request_bench")
    print(f"wrote {path}")
    if args.json:
        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
