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
                   "epoch_s": [h["epoch_seconds"] for h in res.history], "budget_minutes": res.budget_minutes,
                   "loop_minutes": round(res.loop_seconds / 60, 2), "best_minutes": res.best_minutes,
                   "convergence": [{"epoch": h["epoch"], "minutes": h.get("minutes"),
                                    "valid_ndcg@10": h.get("valid_ndcg@10")} for h in res.history],
                   "curves_png": str(out / "convergence.png")}
            runs.append(rec)
            print(f"  -> test hr@10 {res.test['hr@10']:.4f} ndcg@10 {res.test['ndcg@10']:.4f} "
                  f"recall@500 {res.test['recall@500']:.4f} in {wall / 60:.1f} min ({res.epochs_run} epochs)", flush=True)
            if export is None:
                from retrieval.data import open_data
                from retrieval.evaluate import last_queries
                from retrieval.export import export_from_checkpoint, load_unsharded

                data = open_data(feats, cfg)
                manifest = export_from_checkpoint(out / "checkpoints" / "best", cfg, data, out / "export",
                                                  extra={"metrics": {"test": res.test, "valid": res.best_valid},
                                                         "best_epoch": res.best_epoch})
                model = load_unsharded(out / "checkpoints" / "best", cfg)
                with torch.no_grad():
                    q = np.concatenate([last_queries(model, eb.batch).numpy() for eb in data.eval_batches("test", 0, 1)])
                export = {"dir": str(out / "export"), "manifest_ann": manifest["ann"],
                          **ann_report(out / "export", cfg, q, args.latency_repeats)}
    return {"dataset": name, "config": spec["config"], "overrides": args.overrides, "features": str(feats),
            "features_info": feat_info, "runs": runs, "ann": export, "bar": spec["bar"],
            "published": [pick(baselines[name], m, s) for m, s in spec["published"]],
            "resolved_config": to_dict(load_config(RetrieverConfig, REPO / spec["config"], args.overrides))}


# ---------------------------------------------------------------- step time (--sections step_time)

STEP_VARIANTS = {  # name -> config overrides on top of the dataset's YAML; the first is the baseline
    "full softmax, fp32 (before)": ["loss.mode=full", "train.bf16=false"],
    "full softmax, bf16 encoder": ["loss.mode=full", "train.bf16=true"],
    "pool 1024, fp32": ["loss.mode=sampled", "loss.in_batch=false", "loss.uniform_negatives=1024", "train.bf16=false"],
    "pool 1024, bf16 encoder": ["loss.mode=sampled", "loss.in_batch=false", "loss.uniform_negatives=1024",
                                "train.bf16=true"],
    "full softmax, fp32, sparse_adam": ["loss.mode=full", "train.bf16=false",
                                        "train.sharding.embedding_optimizer=sparse_adam"],
}


def padding_fraction(batches: list, max_len: int, groups: int) -> float:
    """Share of the encoder's (B, T) slots that are padding when users are encoded in `groups` length groups."""
    import torch

    real = padded = 0
    for b in batches:
        lens = b.history_lengths().clamp(max=max_len)
        for g in torch.tensor_split(torch.sort(lens).values, min(groups, lens.numel())):
            real += int(g.sum())
            padded += int(g.max()) * g.numel() if g.numel() else 0
    return 1.0 - real / max(padded, 1)


def _time_steps(rank: int, world_size: int, base, variants: dict, feats: Path, max_batches: int,
                overrides: list[str]) -> dict:
    """One training epoch (or its first `max_batches` steps) per variant on the same batches, the variants
    interleaved step by step, so a load change on a shared machine hits them all alike."""
    import time as _time

    import torch

    from features.config import load_config
    from retrieval.config import RetrieverConfig
    from retrieval.data import open_data
    from retrieval.train import build_training

    data = open_data(feats, base)
    batches = list(data.train_batches(0, 0, 1))
    if max_batches:
        batches = batches[:max_batches]
    runs = {}
    for name in variants:
        cfg = load_config(RetrieverConfig, REPO / DATASETS["ml-1m"]["config"], [*overrides, *variants[name]])
        torch.manual_seed(0)
        dmp, opt, sampler = build_training(cfg, data.catalog)
        runs[name] = {"dmp": dmp, "opt": opt, "sampler": sampler, "times": [], "rows": 0}

    def step(run: dict, batch, i: int) -> float:
        t, c = _time.perf_counter(), _time.process_time()
        out = run["dmp"](batch, run["sampler"](batch, i, 0))
        run["opt"].zero_grad()
        out.loss.backward()
        run["opt"].step()
        run["rows"] += int(out.rows)
        run["cpu"] = run.get("cpu", 0.0) + _time.process_time() - c  # all threads: less sensitive to other load
        return _time.perf_counter() - t

    for run in runs.values():  # warm-up (allocator, thread pools), not timed
        step(run, batches[0], 0)
        run["rows"], run["cpu"] = 0, 0.0
    for i, batch in enumerate(batches):
        for run in runs.values():
            run["times"].append(step(run, batch, i + 1))
    out = {}
    for name, run in runs.items():
        ts = run["times"]
        out[name] = {"overrides": variants[name], "steps": len(ts), "step_ms_median": round(1000 * statistics.median(ts), 1),
                     "step_ms_mean": round(1000 * statistics.mean(ts), 1), "epoch_s": round(sum(ts), 1),
                     "rows_per_s": round(run["rows"] / sum(ts), 1), "epoch_cpu_s": round(run["cpu"], 1)}
    return {"variants": out, "batches": len(batches), "epoch_batches": data.num_train_batches(0, 1),
            "rows_per_step_mean": round(sum(int(b.num_candidates.sum()) for b in batches) / len(batches), 1),
            "catalog_items": len(data.catalog), "threads": torch.get_num_threads(),
            "padding_fraction": {f"length_groups={g}": round(padding_fraction(batches, base.model.user.max_len, g), 4)
                                 for g in (1, 4, 8)}}


def step_time_section(args: argparse.Namespace) -> dict:
    """Step and epoch time of the variants in STEP_VARIANTS on ML-1M, measured in one process, in one run."""
    from features.config import load_config
    from features.train.launch import run_distributed
    from retrieval.config import RetrieverConfig

    feats, _ = ensure_features("ml-1m", args)
    base = load_config(RetrieverConfig, REPO / DATASETS["ml-1m"]["config"], args.overrides)
    machine = wait_for_quiet(args.max_load, args.max_wait)
    base_name = next(iter(STEP_VARIANTS))
    names = [base_name, *[v for v in (args.step_variants or STEP_VARIANTS) if v != base_name]]
    unknown = [v for v in names if v not in STEP_VARIANTS]
    if unknown:
        raise SystemExit(f"--step-variants: unknown {unknown}; known: {list(STEP_VARIANTS)}")
    variants = {v: STEP_VARIANTS[v] for v in names}
    res = run_distributed(_time_steps, 1, base, variants, feats, args.step_batches, args.overrides)[0]
    res.update(machine)
    b = res["variants"][base_name]
    for v in res["variants"].values():
        v["speedup_vs_before"] = round(b["epoch_s"] / v["epoch_s"], 2)
        v["cpu_speedup_vs_before"] = round(b["epoch_cpu_s"] / v["epoch_cpu_s"], 2)
    print(f"\nML-1M training step time ({res['batches']} of {res['epoch_batches']} batches of an epoch, "
          f"~{res['rows_per_step_mean']:.0f} next-item rows per step, {res['catalog_items']} items, "
          f"{res['threads']} threads; variants interleaved step by step; 1-min load {res['load_1m_at_start']})")
    print(f"  {'variant':<34}{'median ms':>11}{'mean ms':>10}{'epoch s':>10}{'rows/s':>10}{'speedup':>9}"
          f"{'epoch CPU s':>13}{'CPU speedup':>13}")
    for name, v in res["variants"].items():
        print(f"  {name:<34}{v['step_ms_median']:>11.1f}{v['step_ms_mean']:>10.1f}{v['epoch_s']:>10.1f}"
              f"{v['rows_per_s']:>10.0f}{v['speedup_vs_before']:>8.2f}x{v['epoch_cpu_s']:>13.1f}"
              f"{v['cpu_speedup_vs_before']:>12.2f}x")
    print("  encoder padding (share of padded slots): " + ", ".join(f"{k}: {v:.3f}" for k, v in
                                                                    res["padding_fraction"].items()))
    if args.step_batches:
        print(f"  epoch s = the {res['batches']} timed steps only (--step-batches); a full epoch has "
              f"{res['epoch_batches']}")
    return res


# ---------------------------------------------------------------- short comparisons (--sections compare)

# Short runs that pick defaults on the VALIDATION split only (the test split is not read into these results).
# Base: --compare-config (the ML-1M model) on --compare-dataset; each variant adds its overrides.
COMPARE_VARIANTS = {
    "full-fp32": ["loss.mode=full", "train.bf16=false"],
    "pool-bf16": ["loss.mode=sampled", "loss.in_batch=false", "loss.uniform_negatives={pool}", "train.bf16=true"],
    "pool-bf16-emb-lr0.15": ["loss.mode=sampled", "loss.in_batch=false", "loss.uniform_negatives={pool}",
                             "train.bf16=true", "train.sharding.embedding_lr=0.15"],
    "pool-bf16-learned-tau": ["loss.mode=sampled", "loss.in_batch=false", "loss.uniform_negatives={pool}",
                              "train.bf16=true", "loss.learn_temperature=true"],
    "pool-bf16-dot": ["loss.mode=sampled", "loss.in_batch=false", "loss.uniform_negatives={pool}", "train.bf16=true",
                      "model.score=dot", "loss.temperature=1.0"],
    "pool-bf16-dropout0.1": ["loss.mode=sampled", "loss.in_batch=false", "loss.uniform_negatives={pool}",
                             "train.bf16=true", "model.user.dropout=0.1"],
    "pool-bf16-id-only": ["loss.mode=sampled", "loss.in_batch=false", "loss.uniform_negatives={pool}",
                          "train.bf16=true", "model.item.category=false", "model.item.attribute_features=[]"],
}


def compare_section(args: argparse.Namespace) -> dict:
    """Each variant trained once (world size 1); valid metrics per epoch and per minute, best valid epoch."""
    from features.config import load_config
    from features.train.launch import run_distributed
    from retrieval.config import RetrieverConfig
    from retrieval.train import train_on_features
    from results_file import write_results

    feats, _ = ensure_features(args.compare_dataset, args)
    out: dict = {}
    names = args.compare_variants or list(COMPARE_VARIANTS)
    for name in names:
        overrides = [o.format(pool=args.compare_pool) for o in COMPARE_VARIANTS[name]]
        cfg = load_config(RetrieverConfig, REPO / args.compare_config, [*args.overrides, *overrides])
        run_dir = Path(args.work) / args.compare_dataset / f"compare-{name}"
        machine = wait_for_quiet(args.max_load, args.max_wait)
        print(f"  {name}: {' '.join(overrides)}", flush=True)
        t = time.perf_counter()
        res = run_distributed(train_on_features, 1, cfg, feats, run_dir, False, not args.quiet)[0]
        curve = [{"epoch": h["epoch"], "minutes": h.get("minutes"), "loss": h["loss"],
                  "valid_ndcg@10": h.get("valid_ndcg@10"), "valid_hr@10": h.get("valid_hr@10"),
                  "valid_recall@500": h.get("valid_recall@500"), "epoch_seconds": h["epoch_seconds"]}
                 for h in res.history]
        rec = {"variant": name, "overrides": [*args.overrides, *overrides], "config": args.compare_config,
               "dataset": args.compare_dataset, "best_epoch": res.best_epoch, "best_valid": res.best_valid,
               "best_minutes": res.best_minutes, "epochs_run": res.epochs_run, "stopped": res.stopped,
               "loop_minutes": round(res.loop_seconds / 60, 2), "wall_s": round(time.perf_counter() - t, 1),
               "curve": curve, **machine}
        out[name] = rec
        path = write_results(f"retrieval/{args.compare_dataset}/compare-{name}", rec, benchmark="retrieval_bench")
        print(f"  -> {name}: best valid ndcg@10 {res.best_valid.get('ndcg@10', float('nan')):.4f} "
              f"hr@10 {res.best_valid.get('hr@10', float('nan')):.4f} at epoch {res.best_epoch} "
              f"({res.best_minutes:.1f} min), {res.epochs_run} epochs, stopped: {res.stopped}; {path}", flush=True)
    plot_compare(out, REPO / "benchmarks" / "results" / "retrieval" / args.compare_dataset / "compare.png")
    print(f"\n{args.compare_dataset}, valid split (best epoch), config {args.compare_config} + overrides:")
    print(f"  {'variant':<26}{'ndcg@10':>9}{'hr@10':>9}{'recall@500':>12}{'best ep':>9}{'min':>7}{'epochs':>8}")
    for name, r in out.items():
        v = r["best_valid"]
        print(f"  {name:<26}{v.get('ndcg@10', 0):>9.4f}{v.get('hr@10', 0):>9.4f}{v.get('recall@500', 0):>12.4f}"
              f"{r['best_epoch']:>9}{r['best_minutes']:>7.1f}{r['epochs_run']:>8}")
    return out


def plot_compare(runs: dict, png: Path) -> None:
    """Valid NDCG@10 of every compared run, per epoch and per minute of training, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in runs.items():
        pts = [c for c in r["curve"] if c.get("valid_ndcg@10") is not None]
        axes[0].plot([c["epoch"] for c in pts], [c["valid_ndcg@10"] for c in pts], marker="o", markersize=3, label=name)
        axes[1].plot([c["minutes"] for c in pts], [c["valid_ndcg@10"] for c in pts], marker="o", markersize=3, label=name)
    for ax, x in zip(axes, ("epoch", "training minutes (steps + valid evaluation)")):
        ax.set_xlabel(x)
        ax.set_ylabel("valid ndcg@10")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


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
    p.add_argument("--sections", nargs="+", default=["quality"], choices=["quality", "step_time", "compare"],
                   help="quality: train/evaluate/export per dataset; step_time: ML-1M step and epoch time of the "
                        "loss/precision variants, written to benchmarks/results/retrieval/ml-1m/step-time.json")
    p.add_argument("--step-batches", type=int, default=0, help="step_time: time only the first N batches (0: an epoch)")
    p.add_argument("--step-variants", nargs="+", default=None,
                   help="step_time: the variants to time (default: all of STEP_VARIANTS); the baseline always runs")
    p.add_argument("--tag", default="", help="suffix of the quality results file name, e.g. pool1024 for a run "
                                             "with --overrides (the YAML defaults' file has none)")
    p.add_argument("--compare-dataset", default="ml-100k", choices=list(DATASETS))
    p.add_argument("--compare-config", default="retrieval/configs/ml-1m.yaml")
    p.add_argument("--compare-variants", nargs="*", default=None, choices=list(COMPARE_VARIANTS))
    p.add_argument("--compare-pool", type=int, default=1024, help="uniform pool size of the pool-* variants")
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from jobs.training import quiet_fbgemm

    quiet_fbgemm()
    baselines = published_rows(Path(args.baselines or Path(args.data_root) / "BASELINES.md"))
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "datasets": {}}
    if "step_time" in args.sections:
        from results_file import write_results

        res = step_time_section(args)
        tag = f"-{args.tag}" if args.tag else ""
        print(f"  -> {write_results(f'retrieval/ml-1m/step-time{tag}', res, benchmark='retrieval_bench')}")
    if "compare" in args.sections:
        compare_section(args)
    if "quality" not in args.sections:
        return 0
    from results_file import write_results

    for name in args.datasets:
        results["datasets"][name] = run_dataset(name, args, baselines)
        seeds = "-".join(str(x) for x in args.seeds)
        ws = "" if args.world_sizes == [1] else "-ws" + "-".join(str(w) for w in args.world_sizes)
        tag = f"-{args.tag}" if args.tag else ""
        print(f"  -> {write_results(f'retrieval/{name}/loo-seed{seeds}{ws}{tag}', results['datasets'][name], benchmark='retrieval_bench')}")
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
