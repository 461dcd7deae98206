"""Serving under a flood: one well-behaved client beside >= 10x the server's capacity from several processes.

What runs (all on 127.0.0.1, bounded in count and time): real redis-server + tansu (jobs.services.LocalServices),
ML-100K imported and bootstrapped into Redis, a model bundle of the project's real retriever and ranker
(`retrieval.export` + `ranking.export` over randomly initialised models with the ML-100K configs: serving
cost does not depend on the weights), and `cascade serve` as its own process with the configured
`grpc.max_workers` / `grpc.max_in_flight`.

1. unloaded: the well-behaved client alone, sequential Rank calls -> p50 / p99.
2. capacity: `max_in_flight` closed-loop callers (never shed) -> answered calls per second.
3. flood: --flood-procs processes send open-loop at --factor x capacity for --seconds, beside the
   well-behaved client, which calls with a --deadline-ms deadline and retries RESOURCE_EXHAUSTED after a
   short jittered backoff while its deadline allows.

Reported: the client's p99 under flood (each answered call; and per logical request, retries included),
its ratio to the unloaded p99, and the shed fraction = RESOURCE_EXHAUSTED answers / excess, where
excess = flood calls sent - capacity x seconds. Targets (issue 15): client p99 <= 3x unloaded while
>= 90 % of the excess is shed. The machine may be small and shared: flood processes, the client, the
server, Redis and tansu all share its cores; the load average is recorded.

    python benchmarks/flood_bench.py                  # ~3 min after setup
    python benchmarks/flood_bench.py --quick          # shorter phases
    python benchmarks/flood_bench.py --max-workers 2 --max-in-flight 3 --name serving/flood-w2-f3
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
TARGETS = {"p99_ratio_max": 3.0, "shed_fraction_min": 0.90}


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q)) if len(xs) else float("nan")


# ----------------------------------------------------------------------------- setup
# "small": the serving tests' shrunk ML-100K configurations (tests/serving/conftest.py); "full": as trained.
MODEL_OVERRIDES = {
    "small": (["model.dim=16", "model.user.max_len=20", "model.user.num_heads=2", "model.user.num_layers=1"],
              ["model.embedding.dim=16", "model.embedding.attention_dim=8", "model.sequence.long=sdim",
               "model.sequence.long_len=200", "model.moe.expert_hidden=[32]", "model.moe.gate_hidden=16"]),
    "full": ([], []),
}


def build_bundle(catalog, out: Path, model: str) -> Path:
    """A bundle of the real exporters' output over randomly initialised real models (ML-100K configs)."""
    from jobs.random_bundle import RandomBundleSpec, write_random_bundle

    out = out / model
    path = out / "flood-v1"
    if (path / "manifest.json").exists():
        return path
    r_over, k_over = MODEL_OVERRIDES[model]
    return write_random_bundle(catalog, out, "flood-v1", 0, RandomBundleSpec(
        retriever_overrides=(*r_over, "index.kind=flat"), ranker_overrides=tuple(k_over)))[0]


def start_server(work: Path, svc, bundle: Path, dataset: Path, prefix: str,
                 args) -> tuple[subprocess.Popen, str, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from jobs.services import free_port

    port, mport = free_port(), free_port()
    u = uuid.uuid4().hex[:6]
    cfg = work / "serving.yaml"
    cfg.write_text(
        f"grpc:\n  address: 127.0.0.1:{port}\n  max_workers: {args.max_workers}\n"
        f"  max_in_flight: {args.max_in_flight}\n"
        f"metrics:\n  address: 127.0.0.1:{mport}\nredis:\n  url: {svc.redis.address}\n  key_prefix: {prefix}\n"
        f"kafka:\n  bootstrap: {svc.kafka.address}\n  consume_events: false\n  consume_items: false\n"
        f"  consume_models: false\n  topics:\n    dead_letter: flood-dlq-{u}\n"
        f"models:\n  allowed_roots: [{bundle.parent}]\n")
    log = work / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--config", str(cfg), "--model-bundle",
                             str(bundle), "--catalog", str(dataset)], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=REPO)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        hs = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cascade serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                status = hs.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cascade serve not SERVING after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    return proc, f"127.0.0.1:{port}", f"127.0.0.1:{mport}"


def scrape(metrics_addr: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cascade_") and " " in line:
            key, val = line.rsplit(" ", 1)
            out[key] = float(val)
    return out


def _request(users: list[int], rnd: random.Random):
    from serving.proto import ranking_pb2

    return ranking_pb2.RankRequest(user_id=rnd.choice(users), k=10, exclude_seen=True)


# ----------------------------------------------------------------------------- clients
def well_behaved(address: str, users: list[int], n: int | None, seconds: float | None, deadline_s: float) -> dict:
    """Sequential calls with a deadline; RESOURCE_EXHAUSTED is retried after 2-8 ms while the deadline allows."""
    import grpc

    from serving.proto import ranking_pb2_grpc

    rnd = random.Random(1)
    answered, logical, outcomes, attempts = [], [], Counter(), []
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = ranking_pb2_grpc.RankingStub(ch)
        for _ in range(20):  # warm the connection and the server's caches (under a flood some are shed)
            try:
                stub.Rank(_request(users, rnd), timeout=5)
            except grpc.RpcError:
                time.sleep(0.005)
        end = time.monotonic() + seconds if seconds else None
        while (n is None or len(logical) < n) and (end is None or time.monotonic() < end):
            req = _request(users, rnd)
            t0 = time.perf_counter()
            tries, outcome = 0, "DEADLINE_EXCEEDED"
            while True:
                left = deadline_s - (time.perf_counter() - t0)
                if left <= 0:
                    break
                tries += 1
                ta = time.perf_counter()
                try:
                    stub.Rank(req, timeout=left)
                    answered.append(time.perf_counter() - ta)
                    outcome = "OK"
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        outcome = e.code().name
                        break
                    outcome = "RESOURCE_EXHAUSTED"
                time.sleep(rnd.uniform(0.002, 0.008))
            logical.append(time.perf_counter() - t0)
            outcomes[outcome] += 1  # RESOURCE_EXHAUSTED here: shed on every try until the deadline
            attempts.append(tries)
    return {"answered_s": answered, "logical_s": logical, "outcomes": dict(outcomes), "attempts": attempts}


def closed_loop_capacity(address: str, users: list[int], callers: int, seconds: float) -> dict:
    """`callers` threads, one call each in flight: never more than max_in_flight, so nothing is shed."""
    import grpc

    from serving.proto import ranking_pb2_grpc

    counts: Counter = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run(i: int) -> None:
        rnd = random.Random(100 + i)
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = ranking_pb2_grpc.RankingStub(ch)
            while time.monotonic() < end:
                try:
                    stub.Rank(_request(users, rnd), timeout=5)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    counts[code] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    return {"answered_per_s": counts["OK"] / took, "counts": dict(counts), "seconds": took}


def flood_process(address: str, users: list[int], rate: float, seconds: float, deadline_s: float,
                  max_outstanding: int, start_at: float, seed: int, out) -> None:
    """Open loop: a call every 1/rate s (at most `max_outstanding` unanswered), for `seconds`; counts by status."""
    import grpc

    from serving.proto import ranking_pb2_grpc

    rnd = random.Random(seed)
    counts: Counter = Counter()
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(max_outstanding)
    ch = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    stub = ranking_pb2_grpc.RankingStub(ch)

    def done(f) -> None:
        code = f.code().name
        with lock:
            counts[code] += 1
        slots.release()

    while time.time() < start_at:
        time.sleep(0.005)
    t0 = time.monotonic()
    sent = i = 0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        due = t0 + i / rate
        if due > now:
            time.sleep(due - now)
        i += 1
        if not slots.acquire(blocking=False):
            counts["not_sent_outstanding_cap"] += 1
            continue
        stub.Rank.future(_request(users, rnd), timeout=deadline_s).add_done_callback(done)
        sent += 1
    took = time.monotonic() - t0
    for _ in range(max_outstanding):  # every call answered (or timed out)
        slots.acquire(timeout=deadline_s + 5)
    ch.close()
    out.put({"sent": sent, "seconds": took, **dict(counts)})


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / "var" / "bench" / "flood")
    p.add_argument("--max-workers", type=int, default=None, help="grpc.max_workers (default: the server default)")
    p.add_argument("--max-in-flight", type=int, default=None, help="grpc.max_in_flight (default: the server default)")
    p.add_argument("--factor", type=float, default=10.0, help="flood rate as a multiple of the measured capacity")
    p.add_argument("--flood-procs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=30.0, help="flood duration")
    p.add_argument("--unloaded-calls", type=int, default=400)
    p.add_argument("--deadline-ms", type=float, default=250.0, help="the well-behaved client's deadline per request")
    p.add_argument("--flood-deadline-ms", type=float, default=1000.0)
    p.add_argument("--users", type=int, default=200, help="distinct ML-100K users queried")
    p.add_argument("--model", choices=sorted(MODEL_OVERRIDES), default="small",
                   help="ML-100K model configurations: the serving tests' small ones, or as trained")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default=None,
                   help="results file name under benchmarks/results/ (default serving/flood, serving/flood-quick)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here (benchmarks/run_all.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.unloaded_calls = 12.0, 200
    args.name = args.name or ("serving/flood-quick" if args.quick else "serving/flood")

    from features.config import load_config
    from features.datasets import import_dataset
    from jobs.services import LocalServices
    from serving.bootstrap import bootstrap_dataset
    from serving.catalog import load_catalog
    from serving.config import ServingConfig
    from serving.state.redis_store import RedisOnlineStore

    defaults = ServingConfig().grpc
    args.max_workers = args.max_workers or defaults.max_workers
    args.max_in_flight = args.max_in_flight or defaults.max_in_flight
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "ml-100k"
    if not (dataset / "manifest.json").exists():
        print("importing ML-100K", flush=True)
        import_dataset(REPO.parent / "shared" / "data" / "ml-100k", dataset, overwrite=True)
    catalog = load_catalog(dataset)
    print("building the model bundle (real exporters, random weights)", flush=True)
    bundle = build_bundle(catalog, work / "models", args.model)

    results: dict = {"config": {"model": args.model, "max_workers": args.max_workers,
                                "max_in_flight": args.max_in_flight,
                                "flood_procs": args.flood_procs, "factor": args.factor, "seconds": args.seconds,
                                "deadline_ms": args.deadline_ms, "flood_deadline_ms": args.flood_deadline_ms,
                                "cores": os.cpu_count()}}
    with LocalServices(work / "services") as svc:
        prefix = f"flood{uuid.uuid4().hex[:6]}"
        cfg = load_config(ServingConfig, None, [f"redis.url={svc.redis.address}", f"redis.key_prefix={prefix}"])
        store = RedisOnlineStore(cfg.redis)
        bootstrap_dataset(store, dataset, cfg.state, catalog)
        store.close()
        users = list(range(1, args.users + 1))
        proc, address, maddr = start_server(work, svc, bundle, dataset, prefix, args)
        try:
            load0 = os.getloadavg()[0]
            print(f"server on {address}: unloaded client ({args.unloaded_calls} calls)", flush=True)
            un = well_behaved(address, users, args.unloaded_calls, None, 5.0)
            un_p50, un_p99 = pct(un["answered_s"], 50) * 1e3, pct(un["answered_s"], 99) * 1e3
            print(f"  p50 {un_p50:.2f} ms  p99 {un_p99:.2f} ms", flush=True)

            cap = closed_loop_capacity(address, users, args.max_in_flight, min(10.0, args.seconds / 2))
            capacity = cap["answered_per_s"]
            print(f"capacity: {capacity:.0f} answered calls/s with {args.max_in_flight} callers {cap['counts']}",
                  flush=True)

            rate = args.factor * capacity
            before = scrape(maddr)
            ctx = multiprocessing.get_context("spawn")
            q = ctx.Queue()
            start_at = time.time() + 8.0  # spawned processes import grpc first
            procs = [ctx.Process(target=flood_process, args=(
                address, users, rate / args.flood_procs, args.seconds, args.flood_deadline_ms / 1e3,
                max(64, int(rate / args.flood_procs * args.flood_deadline_ms / 1e3) + 8), start_at, 1000 + i, q))
                for i in range(args.flood_procs)]
            for pr in procs:
                pr.start()
            print(f"flood: {args.flood_procs} processes x {rate / args.flood_procs:.0f} calls/s "
                  f"for {args.seconds:.0f} s "
                  f"(total {rate:.0f}/s = {args.factor:g}x capacity), beside the well-behaved client", flush=True)
            while time.time() < start_at + 1.0:  # the client measures only while the flood runs
                time.sleep(0.01)
            fl = well_behaved(address, users, None, args.seconds - 2.0, args.deadline_ms / 1e3)
            flood = [q.get(timeout=args.seconds + 120) for _ in procs]
            for pr in procs:
                pr.join(30)
            after = scrape(maddr)
            load1 = os.getloadavg()[0]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    tot: Counter = Counter()
    for f in flood:
        tot.update(f)
    flood_seconds = max(f["seconds"] for f in flood)
    sent = tot["sent"]
    excess = sent - capacity * flood_seconds
    shed = tot["RESOURCE_EXHAUSTED"]
    fl_ans_p50, fl_ans_p99 = pct(fl["answered_s"], 50) * 1e3, pct(fl["answered_s"], 99) * 1e3
    fl_log_p50, fl_log_p99 = pct(fl["logical_s"], 50) * 1e3, pct(fl["logical_s"], 99) * 1e3
    n_log = len(fl["logical_s"])

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    results.update({
        "unloaded": {"calls": len(un["answered_s"]), "p50_ms": un_p50, "p99_ms": un_p99},
        "capacity": {"answered_per_s": capacity, "callers": args.max_in_flight, "counts": cap["counts"]},
        "flood": {"offered_per_s": sent / flood_seconds, "target_per_s": rate, "sent": sent,
                  "seconds": flood_seconds, "by_status": {k: v for k, v in tot.items() if k not in ("sent", "seconds")},
                  "excess": excess, "shed": shed, "shed_fraction": shed / excess if excess > 0 else float("nan"),
                  # of the flood calls not answered OK, the share answered RESOURCE_EXHAUSTED (vs timed out)
                  "shed_of_unanswered": shed / max(1, sent - tot["OK"]),
                  "server_shed_total": delta("cascade_requests_shed_total"),
                  "server_deadline_dropped": {k: v - before.get(k, 0.0) for k, v in after.items()
                                              if k.startswith("cascade_deadline_dropped_total")}},
        "client_under_flood": {
            "requests": n_log, "outcomes": fl["outcomes"],
            "success_fraction": fl["outcomes"].get("OK", 0) / n_log if n_log else float("nan"),
            "answered_calls": len(fl["answered_s"]), "answered_p50_ms": fl_ans_p50, "answered_p99_ms": fl_ans_p99,
            "answered_p99_ratio": fl_ans_p99 / un_p99, "answered_p50_ratio": fl_ans_p50 / un_p50,
            "with_retries_p50_ms": fl_log_p50, "with_retries_p99_ms": fl_log_p99,
            "with_retries_p99_ratio": fl_log_p99 / un_p99,
            "mean_attempts": float(np.mean(fl["attempts"])) if fl["attempts"] else float("nan")},
        "load_average": {"before": load0, "after": load1},
        "targets": TARGETS,
    })
    print_table(results)
    from results_file import write_results  # benchmarks/results_file.py (this directory)

    path = write_results(args.name, results, benchmark="flood")
    print(f"wrote {path.relative_to(REPO)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(path.read_text())
    return 0


def print_table(r: dict) -> None:
    c, u, f, w = r["config"], r["unloaded"], r["flood"], r["client_under_flood"]
    rows = [
        ("server", f"max_workers={c['max_workers']} max_in_flight={c['max_in_flight']} ({c['cores']} cores)", ""),
        ("unloaded client p50 / p99", f"{u['p50_ms']:.2f} / {u['p99_ms']:.2f} ms", ""),
        ("capacity (answered/s)", f"{r['capacity']['answered_per_s']:.0f}", ""),
        ("flood offered", f"{f['offered_per_s']:.0f}/s x {f['seconds']:.0f} s = {f['sent']} calls "
                          f"({f['offered_per_s'] / r['capacity']['answered_per_s']:.1f}x capacity)", ">= 10x"),
        ("flood by status", ", ".join(f"{k} {v}" for k, v in sorted(f["by_status"].items())), ""),
        ("shed / excess", f"{f['shed']} / {f['excess']:.0f} = {f['shed_fraction']:.1%} "
                          f"({f['shed_of_unanswered']:.1%} of the flood calls not answered OK)",
         f">= {r['targets']['shed_fraction_min']:.0%}"),
        ("client answered p50 / p99", f"{w['answered_p50_ms']:.2f} / {w['answered_p99_ms']:.2f} ms "
                                      f"({w['answered_p50_ratio']:.1f}x / {w['answered_p99_ratio']:.1f}x unloaded)",
         f"<= {r['targets']['p99_ratio_max']:g}x"),
        ("client with retries p50 / p99", f"{w['with_retries_p50_ms']:.2f} / {w['with_retries_p99_ms']:.2f} ms "
                                          f"({w['with_retries_p99_ratio']:.1f}x), "
                                          f"mean {w['mean_attempts']:.2f} tries", ""),
        ("client outcomes", f"{w['outcomes']} of {w['requests']} ({w['success_fraction']:.1%} OK within "
                            f"{c['deadline_ms']:.0f} ms)", ""),
        ("load average before / after", f"{r['load_average']['before']:.2f} / {r['load_average']['after']:.2f}", ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    vwidth = max(len(b) for _, b, _ in rows)
    print()
    print(f"{'flood benchmark':<{width}}  {'measured':<{vwidth}}  target")
    for a, b, t in rows:
        print(f"{a:<{width}}  {b:<{vwidth}}  {t}")


if __name__ == "__main__":
    raise SystemExit(main())
