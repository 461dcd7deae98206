"""Two-tower retriever quality and ANN speed on ML-1M and Amazon Beauty, next to the published rows.

For each dataset: canonical import (`cascade data import`) and the Spark feature
build (`cascade build-features`) unless a features directory is given, then the
full training run of `cascade train-retriever` (retrieval/configs/<dataset>.yaml,
the same library function) for every seed x world size asked for, the test
metrics of the best-valid epoch (leave-one-out, full ranking over every item,
history masked), the training wall time, and for the first run the export:
HNSW and IVF recall@500 against exact search (faiss IndexFlatIP, the baseline
measured in the same run) on the test users' vectors, and query latency for 1
and 64 queries. The published rows are read from BASELINES.md (one place), not
copied here. Nothing is asserted: misses are printed as misses.

    python benchmarks/retrieval_bench.py --json reports/retrieval_bench.json            # ML-1M + Beauty, seed 0
    python benchmarks/retrieval_bench.py --datasets beauty --seeds 0 1 2 --world-sizes 1 2   # ws 2 vs 1, 3 seeds
    python benchmarks/retrieval_bench.py --features-ml-1m features/ml-1m ...            # reuse a feature build

The machine may be shared: before each training run the script waits (up to
--max-wait seconds, polling every 60 s) until the 1-minute load is below
--max-load, and records the load it started under.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "ml-1m": {"source": "ml-1m", "config": "retrieval/configs/ml-1m.yaml", "published": [
        ("SASRec+ (full CE)", "Dross"), ("SASRec (sampled-softmax loss)", "HSTU"), ("HSTU", "HSTU"),
        ("HSTU-large", "HSTU"), ("ICSRec (released ckpt, SAS)", "ICSRec-R")],
        "bar": {"hr@10": 0.3152, "ndcg@10": 0.1821, "recall@500": 0.90}},
    "beauty": {"source": "amazon-beauty/Beauty.txt", "config": "retrieval/configs/beauty.yaml", "published": [
        ("SASRec", "S3Rec-A"), ("ICLRec (released ckpt)", "ICLRec-R"), ("ICSRec (released ckpt, SAS)", "ICSRec-R")],
        "bar": {"hr@10": 0.0744, "ndcg@10": 0.0403}},
    # small and fast: for the world-size / seed comparison, no published rows
    "ml-100k": {"source": "ml-100k", "config": "retrieval/configs/ml-100k.yaml", "published": [], "bar": {}},
}
COLS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "recall@100", "recall@500")


# ---------------------------------------------------------------- published baselines (BASELINES.md)

def published_rows(baselines: Path) -> dict[str, list[dict]]:
    """Every markdown table row of BASELINES.md, by dataset section: {"ml-1m": [...], "beauty": [...]}.

    Each row: {"model", "source", "section", metric (lower case, e.g. "hr@10"): float or None}.
    The BERT4Rec-preprocessed Beauty section (a different dataset) is left out.
    """
    out: dict[str, list[dict]] = {"ml-1m": [], "beauty": [], "ml-100k": []}
    section, header = None, None
    for line in baselines.read_text().splitlines():
        if line.startswith("#"):
            h = line.lower()
            section = "ml-1m" if "ml-1m" in h else "beauty" if "beauty" in h else None
            if "bert4rec-preprocessed" in h:  # another Beauty dataset: not comparable
                section = None
            header = None
            continue
        if not line.startswith("|") or section is None:
            header = None if not line.startswith("|") else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        row = dict(zip(header, cells))
        if "model" not in row:
            continue
        rec = {"model": row["model"], "source": row.get("source", "").strip("[]"), "section": section}
        for k, v in row.items():
            if k in ("model", "source"):
                continue
            try:
                rec[k] = float(v)
            except ValueError:
                rec[k] = None
        out[section].append(rec)
    return out


def pick(rows: list[dict], model: str, source: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["source"] == source), None)


# ---------------------------------------------------------------- helpers

def wait_for_quiet(max_load: float, max_wait: float) -> dict:
    t0 = time.time()
    load = os.getloadavg()[0]
    while load > max_load and time.time() - t0 < max_wait:
        print(f"  machine busy (1-min load {load:.1f} > {max_load}); waiting ...", flush=True)
        time.sleep(60)
        load = os.getloadavg()[0]
    return {"load_1m_at_start": round(load, 2), "waited_s": round(time.time() - t0)}


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "jobs.cli", *args]
    print("  $ cascade " + " ".join(args), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def ensure_features(name: str, args: argparse.Namespace) -> tuple[Path, dict]:
    given = getattr(args, f"features_{name.replace('-', '_')}")
    if given:
        return Path(given), {"built": False}
    work = Path(args.work) / name
    data, feats = work / "data", work / "features"
    info: dict = {"built": True}
    if not (data / "manifest.json").exists():
        t = time.perf_counter()
        src = Path(args.data_root) / DATASETS[name]["source"]
        cli("data", "import", "--source", str(src), "--out", str(data), "--overwrite")
        info["import_s"] = round(time.perf_counter() - t, 1)
    if not (feats / "manifest.json").exists():
        t = time.perf_counter()
        cli("build-features", "--dataset", str(data), "--out", str(feats), "--overwrite", "--master", "local[2]")
        info["build_features_s"] = round(time.perf_counter() - t, 1)
    return feats, info


def latency_ms(index, queries: np.ndarray, k: int, repeats: int) -> float:
    index.search(queries, k)  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        index.search(queries, k)
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def ann_report(export_dir: Path, cfg, queries: np.ndarray, repeats: int) -> dict:
    """HNSW (the exported index) and IVF against exact search: recall@500 and latency for 1 and 64 queries."""
    from dataclasses import replace

    from retrieval.index import build_index, exact_index, recall_vs_exact, search

    vecs = np.load(export_dir / "item_embeddings.npy")
    k = cfg.index.recall_k
    exact = exact_index(vecs)
    ex_rows, _ = search(exact, queries, k)
    rng = np.random.default_rng(0)
    q1 = queries[rng.integers(len(queries), size=1)]
    q64 = queries[rng.integers(len(queries), size=64)]
    out = {"items": int(len(vecs)), "k": k, "queries": int(len(queries)), "indexes": {}}
    for name, icfg in (("exact (IndexFlatIP)", replace(cfg.index, kind="flat")),
                       (f"hnsw M={cfg.index.hnsw_m} ef={cfg.index.hnsw_ef_search}", replace(cfg.index, kind="hnsw")),
                       (f"ivf nprobe={cfg.index.ivf_nprobe}", replace(cfg.index, kind="ivf"))):
        t = time.perf_counter()
        index = exact if icfg.kind == "flat" else build_index(vecs, icfg)
        build_s = time.perf_counter() - t
        rows, _ = search(index, queries, k)
        out["indexes"][name] = {
            "recall_vs_exact": recall_vs_exact(rows, ex_rows), "build_s": round(build_s, 3),
            "ms_1_query": round(latency_ms(index, q1, k, repeats), 3),
            "ms_64_queries": round(latency_ms(index, q64, k, max(3, repeats // 4)), 3),
        }
    return out


# ---------------------------------------------------------------- one dataset

def run_dataset(name: str, args: argparse.Namespace, baselines: dict) -> dict:
    import torch

    from features.config import load_config, to_dict
    from features.train.launch import run_distributed
    from jobs.train_retriever import export_run
    from retrieval.config import RetrieverConfig
    from retrieval.train import train_on_features

    spec = DATASETS[name]
    print(f"\n=== {name} ===", flush=True)
    feats, feat_info = ensure_features(name, args)
    runs = []
    export = None
    for ws in args.world_sizes:
        for seed in args.seeds:
            cfg = load_config(RetrieverConfig, REPO / spec["config"], [f"train.seed={seed}", *args.overrides])
            out = Path(args.work) / name / f"run-ws{ws}-seed{seed}"
            machine = wait_for_quiet(args.max_load, args.max_wait)
            print(f"  training ws={ws} seed={seed} -> {out} (1-min load {machine['load_1m_at_start']})", flush=True)
            t = time.perf_counter()
            res = run_distributed(train_on_features, ws, cfg, feats, out, False, not args.quiet,
                                  threads_per_rank=max(1, (os.cpu_count() or 2) // ws))[0]
            wall = time.perf_counter() - t
            rec = {"world_size": ws, "seed": seed, "wall_s": round(wall, 1), "train_s": res.train_seconds,
                   "train_cpu_s": res.train_cpu_seconds,
                   "epochs": res.epochs_run, "best_epoch": res.best_epoch, "stopped": res.stopped,
                   "test": res.test, "valid": res.best_valid, "plan": res.plan, "collisions": res.collisions, **machine,
                   "epoch_s": [h["epoch_seconds"] for h in res.history]}
            runs.append(rec)
            print(f"  -> test hr@10 {res.test['hr@10']:.4f} ndcg@10 {res.test['ndcg@10']:.4f} "
                  f"recall@500 {res.test['recall@500']:.4f} in {wall / 60:.1f} min ({res.epochs_run} epochs)", flush=True)
            if export is None:
                manifest = export_run(cfg, feats, out)
                from retrieval.data import open_data
                from retrieval.evaluate import last_queries
                from retrieval.export import load_unsharded

                model = load_unsharded(out / "checkpoints" / "best", cfg)
                data = open_data(feats, cfg)
                with torch.no_grad():
                    q = np.concatenate([last_queries(model, eb.batch).numpy() for eb in data.eval_batches("test", 0, 1)])
                export = {"dir": str(out / "export"), "manifest_ann": manifest["ann"],
                          **ann_report(out / "export", cfg, q, args.latency_repeats)}
    return {"dataset": name, "config": spec["config"], "overrides": args.overrides, "features": str(feats),
            "features_info": feat_info, "runs": runs, "ann": export, "bar": spec["bar"],
            "published": [pick(baselines[name], m, s) for m, s in spec["published"]],
            "resolved_config": to_dict(load_config(RetrieverConfig, REPO / spec["config"], args.overrides))}


# ---------------------------------------------------------------- report

def _mean_std(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f}±{statistics.stdev(vals):.4f}"


def print_report(res: dict) -> None:
    name = res["dataset"]
    print(f"\n{name}: leave-one-out, full ranking over every item, history masked (test split)")
    print(f"{'model':<38}{'source':<10}" + "".join(f"{c:>15}" for c in COLS))
    for p in res["published"]:
        if p is None:
            continue
        print(f"{p['model'][:37]:<38}{p['source']:<10}" + "".join(
            f"{p[c]:>15.4f}" if p.get(c) is not None else f"{'–':>15}" for c in COLS))
    by_ws: dict[int, list[dict]] = {}
    for r in res["runs"]:
        by_ws.setdefault(r["world_size"], []).append(r)
    for ws, runs in sorted(by_ws.items()):
        label = f"Cascade two-tower, ws={ws}, {len(runs)} seed(s)"
        print(f"{label:<38}{'this run':<10}" + "".join(f"{_mean_std([r['test'][c] for r in runs]):>15}" for c in COLS))
    if res["bar"]:
        print("bars: " + ", ".join(
            f"{k} >= {v} -> {'met' if statistics.mean(r['test'][k] for r in res['runs']) >= v else 'MISSED'}"
            for k, v in res["bar"].items()))
    for r in res["runs"]:
        print(f"  ws={r['world_size']} seed={r['seed']}: {r['wall_s'] / 60:.1f} min wall ({r['train_s'] / 60:.1f} min in "
              f"training steps, {r['train_cpu_s'] / 60:.1f} CPU-min), {r['epochs']} epochs, best {r['best_epoch']}, "
              f"stopped: {r['stopped']}, 1-min load at start {r['load_1m_at_start']}")
    a = res["ann"]
    if a:
        print(f"ANN over {a['items']} items, top-{a['k']} of {a['queries']} test users' vectors "
              f"(recall vs exact; median latency):")
        print(f"  {'index':<28}{'recall@' + str(a['k']):>12}{'1 query ms':>12}{'64 queries ms':>15}{'build s':>10}")
        for iname, m in a["indexes"].items():
            print(f"  {iname:<28}{m['recall_vs_exact']:>12.4f}{m['ms_1_query']:>12.3f}{m['ms_64_queries']:>15.3f}"
                  f"{m['build_s']:>10.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["ml-1m", "beauty"], choices=list(DATASETS))
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--baselines", default=None, help="BASELINES.md (default: DATA_ROOT/BASELINES.md)")
    p.add_argument("--features-ml-1m", default=None, help="an existing ML-1M features directory")
    p.add_argument("--features-beauty", default=None, help="an existing Beauty features directory")
    p.add_argument("--features-ml-100k", default=None, help="an existing ML-100K features directory")
    p.add_argument("--work", default=str(REPO / "var" / "retrieval_bench"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--overrides", nargs="*", default=[], help="config overrides for every run, e.g. train.epochs=3")
    p.add_argument("--latency-repeats", type=int, default=50)
    p.add_argument("--max-load", type=float, default=2.5)
    p.add_argument("--max-wait", type=float, default=1800.0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from jobs.train_retriever import _quiet_fbgemm

    _quiet_fbgemm()
    baselines = published_rows(Path(args.baselines or Path(args.data_root) / "BASELINES.md"))
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "datasets": {}}
    for name in args.datasets:
        results["datasets"][name] = run_dataset(name, args, baselines)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    for res in results["datasets"].values():
        print_report(res)
    if args.json:
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
