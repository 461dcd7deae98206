"""Ranking CTR benchmark on real data: the ablation of DIN, DARE, SDIM, AW-MoE and the contrastive gate loss.

Protocol (BARS: same split, same budget, 3 seeds, mean ± std):

* ML-1M: the rating events of users 1-2999 (the shared copy's ratings with
  timestamps), label = rating >= 4, global time split of the samples (80/10/10
  by time); ML-100K: the same protocol on every rating.
* Variants (ranking/configs/ablations/*.yaml, layered on the dataset's config):
  DIN-only baseline, +DARE, +SDIM (instead of DARE), +AW-MoE without and with
  the contrastive gate loss, and the full model (DIN + DARE + AW-MoE +
  contrastive); `full_attention` (full target attention) may be asked for too.
* Metrics: test AUC, GAUC (per user), logloss at the epoch with the best valid
  AUC; the delta against the DIN baseline is paired by seed (same data order).
* Data are imported from ../shared/data and built with `cascade build-features`
  on first use (cached under --data-dir; bench_common.prepare_features).

Results: every finished (dataset, variant, seed) run writes
`benchmarks/results/ranking/ctr/<dataset>/<variant>-seed<seed>.json` (a failed
run writes nothing and keeps an earlier file). The summary table (mean ± std
over seeds, paired ΔAUC vs DIN) is then rebuilt from ALL run files of the
dataset that share this invocation's training budget (epochs, steps per epoch,
patience, config overrides; a non-default budget's files carry it in their names, e.g.
`full-seed0-e4-p1.json`, or `--tag`'s for overrides),
whichever session wrote them, so a 3-seed table is built up run by run; it is
printed and written to `.../ctr/<dataset>/summary.json`. A `--quick` run writes
under `.../ranking/ctr/quick/<dataset>/` instead (never mixed with real runs; not
committed). `--json PATH` also writes this invocation's raw document.

Target (reported, never asserted): full model AUC >= DIN + 0.005 on ML-1M, mean of 3 seeds.

    python benchmarks/ranking_ctr_bench.py                      # both datasets, all variants, 3 seeds (hours)
    python benchmarks/ranking_ctr_bench.py --datasets ml-1m --variants din,full --seeds 2  # one more seed
    python benchmarks/ranking_ctr_bench.py --datasets ml-100k --seeds 0                    # one slice
    python benchmarks/ranking_ctr_bench.py --quick              # a minutes-long smoke run

The machine may be shared: every run records the 1-minute load average before
and after (contention slows throughput figures; quality is unaffected).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_common import DATASETS, REPO, fmt, load1, mean_std, prepare_features, print_table, write_json  # noqa: E402
from results_file import RESULTS_DIR, write_results  # noqa: E402

from features.config import load_config  # noqa: E402
from features.train.launch import run_distributed  # noqa: E402
from ranking.config import RankerConfig  # noqa: E402

VARIANTS = ("din", "dare", "sdim", "awmoe", "awmoe_cl", "full")
VARIANT_NAMES = {"din": "DIN (baseline)", "dare": "+DARE", "sdim": "+SDIM (instead of DARE)",
                 "awmoe": "+AW-MoE", "awmoe_cl": "+AW-MoE +contrastive", "full": "full (DIN+DARE+AW-MoE+CL)",
                 "full_attention": "+full target attention"}
CTR_DATASETS = tuple(d for d, spec in DATASETS.items() if spec["config"])  # Beauty has no CTR protocol
PROTOCOL = {
    "ml-1m": "ML-1M: the rating events of users 1-2999 (the shared copy's ratings with timestamps), label = "
             "rating >= 4, global time split of the samples (train < q80 <= valid < q90 <= test); only rating "
             "events are behaviors, samples and counters; test metrics at the epoch with the best valid AUC",
    "ml-100k": "ML-100K: every rating event (943 users, 1,682 movies), label = rating >= 4, global time split of "
               "the samples (train < q80 <= valid < q90 <= test); test metrics at the epoch with the best valid AUC",
}
TARGET_AUC_GAIN = 0.005


# ---------------------------------------------------------------------------------------------- runs
def _train_ctr(rank: int, world: int, cfg: RankerConfig, out: str) -> dict[str, Any]:
    from ranking.data import open_ranking_data
    from ranking.train import train_ranker

    data = open_ranking_data(cfg.data, cfg.model)
    return asdict(train_ranker(rank, world, cfg, data, out, export=False))


def ctr_config(dataset: str, variant: str, features: Path, seed: int, args: argparse.Namespace) -> RankerConfig:
    cfg = load_config(RankerConfig, REPO / DATASETS[dataset]["config"])
    overrides = [f"data.features_dir={features}", f"train.seed={seed}", f"data.shuffle_seed={seed}",
                 f"train.threads={args.threads}"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_steps:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps}")
    if args.patience:
        overrides.append(f"train.patience={args.patience}")
    return load_config(RankerConfig, REPO / "ranking/configs/ablations" / f"{variant}.yaml",
                       overrides + list(args.overrides), base=cfg)


def results_root(quick: bool) -> str:
    """The results name prefix (under benchmarks/results/) of real or quick runs."""
    return "ranking/ctr/quick" if quick else "ranking/ctr"


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs comparable (0: the dataset config's own value; the config overrides, in order)."""
    return {"epochs": args.epochs, "max_steps_per_epoch": args.max_steps, "patience": args.patience,
            "overrides": list(args.overrides)}


def same_budget(recorded: dict[str, Any], args: argparse.Namespace) -> bool:
    """Files written before `patience` and `overrides` were budget fields ran with the config's."""
    return {"patience": 0, "overrides": [], **recorded} == budget(args)


def budget_suffix(args: argparse.Namespace) -> str:
    """File-name suffix of a non-default budget, so its runs never overwrite the default budget's files
    (`--tag` names a run with overrides)."""
    parts = [f"{k}{v}" for k, v in (("e", args.epochs), ("s", args.max_steps), ("p", args.patience)) if v]
    if args.overrides and not args.tag:
        raise SystemExit("--overrides needs a --tag that names them in the run files (e.g. --tag=-drop0.1)")
    return ("-" + "-".join(parts) if parts else "") + args.tag if not args.quick else ""


def run_one(dataset: str, variant: str, seed: int, features: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Trains one (dataset, variant, seed) and returns its record (`error` set when it failed)."""
    cfg = ctr_config(dataset, variant, features, seed, args)
    l0, t0 = load1(), time.perf_counter()
    rec: dict[str, Any] = {"dataset": dataset, "variant": variant, "seed": seed, "protocol": PROTOCOL[dataset],
                           "budget": budget(args), "threads": args.threads}
    try:
        res = run_distributed(_train_ctr, 1, cfg, str(args.work_dir / f"ctr-{dataset}-{variant}-{seed}"))[0]
        rec.update(test=res["test"], valid=res["best_valid"], best_epoch=res["best_epoch"],
                   epochs_run=res["epochs_run"], stopped=res["stopped"], examples_per_s=res["examples_per_s"],
                   train_seconds=res["train_seconds"], history=res["history"])
    except Exception as e:  # one failing run must not lose the others; it is reported
        rec["error"] = f"{type(e).__name__}: {e}"
        print(f"  FAILED: {rec['error']}", flush=True)
    rec.update(wall_seconds=time.perf_counter() - t0, load_before=l0, load_after=load1())
    return rec


def run_ctr(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = {"runs": {}, "written": [], "summary": {}}
    runs = [(d, v, s) for d in args.datasets for v in args.variants for s in args.seeds]
    root = results_root(args.quick)
    for i, (dataset, variant, seed) in enumerate(runs):
        features = prepare_features(dataset, args.shared_data, args.data_dir, ctr=True)
        print(f"\n[ctr {i + 1}/{len(runs)}] {dataset} {variant} seed {seed}  (load {load1():.1f})", flush=True)
        rec = run_one(dataset, variant, seed, features, args)
        doc["runs"].setdefault(dataset, {}).setdefault(variant, {})[str(seed)] = rec
        if "error" not in rec:
            path = write_results(f"{root}/{dataset}/{variant}-seed{seed}{budget_suffix(args)}", rec,
                                 benchmark="ranking_ctr_bench")
            doc["written"].append(str(path))
            print(f"  test AUC {rec['test']['auc']:.4f}  GAUC {rec['test']['gauc']:.4f}  logloss "
                  f"{rec['test']['logloss']:.4f}  -> {path.relative_to(REPO)}", flush=True)
        if args.json:  # partial results survive an interrupted run
            write_json(args.json, doc)
    for dataset in args.datasets:
        doc["summary"][dataset] = summarize(dataset, args)
    return doc


# ---------------------------------------------------------------------------------------------- summary
def load_runs(dataset: str, quick: bool) -> list[dict[str, Any]]:
    """Every run file of a dataset (any session), each as its `results` plus the file's name and commit."""
    out = []
    for path in sorted((RESULTS_DIR / results_root(quick) / dataset).glob("*-seed*.json")):
        doc = json.loads(path.read_text())
        out.append({**doc["results"], "file": str(path.relative_to(REPO)), "commit": doc.get("commit", "?")})
    return out


def summarize(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Mean ± std over seeds and ΔAUC vs DIN paired by seed, over all run files with this budget; printed
    and written next to the run files as summary.json."""
    runs = load_runs(dataset, args.quick)
    same = [r for r in runs if same_budget(r.get("budget", {}), args)]
    excluded = [r["file"] for r in runs if not same_budget(r.get("budget", {}), args)]
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for r in same:
        by_variant.setdefault(r["variant"], {})[int(r["seed"])] = r
    base = by_variant.get("din", {})
    order = [v for v in VARIANT_NAMES if v in by_variant] + sorted(set(by_variant) - set(VARIANT_NAMES))
    table, rows = {}, []
    for variant in order:
        seeds = by_variant[variant]
        auc = mean_std([r["test"]["auc"] for r in seeds.values()])
        gauc = mean_std([r["test"]["gauc"] for r in seeds.values()])
        ll = mean_std([r["test"]["logloss"] for r in seeds.values()])
        eps = mean_std([r["examples_per_s"] for r in seeds.values()])
        paired = {s: r["test"]["auc"] - base[s]["test"]["auc"] for s, r in seeds.items() if s in base}
        delta = mean_std(list(paired.values())) if variant != "din" else (0.0, 0.0)
        table[variant] = {"auc": auc, "gauc": gauc, "logloss": ll, "delta_auc_vs_din": delta,
                          "delta_auc_vs_din_by_seed": {str(s): d for s, d in sorted(paired.items())},
                          "examples_per_s": eps, "seeds": sorted(seeds),
                          "files": [seeds[s]["file"] for s in sorted(seeds)],
                          "commits": sorted({r["commit"] for r in seeds.values()})}
        rows.append([VARIANT_NAMES.get(variant, variant), fmt(auc), fmt(gauc), fmt(ll),
                     fmt(delta) + f" (n={len(paired)})" if variant != "din" else "(baseline)",
                     f"{eps[0]:,.0f}", ",".join(map(str, sorted(seeds)))])
    print_table(f"CTR {dataset}{' (quick)' if args.quick else ''}: test metrics at the best-valid epoch, "
                f"mean ± std over seeds ({len(same)} run files, budget {budget(args)})",
                ["variant", "AUC", "GAUC", "logloss", "ΔAUC vs DIN (paired)", "train ex/s", "seeds"], rows)
    if excluded:
        print(f"  not in the table (another training budget): {', '.join(excluded)}")
    summary: dict[str, Any] = {"dataset": dataset, "protocol": PROTOCOL[dataset], "budget": budget(args),
                               "table": table, "excluded_other_budget": excluded}
    if "full" in table and "din" in table:
        d = table["full"]["delta_auc_vs_din"]
        summary["target_full_vs_din"] = {"target": TARGET_AUC_GAIN, "measured": d[0],
                                         "seeds": sorted(table["full"]["delta_auc_vs_din_by_seed"]),
                                         "met": d[0] >= TARGET_AUC_GAIN}
        print(f"  target full - DIN >= +{TARGET_AUC_GAIN}: {d[0]:+.4f} over "
              f"{len(summary['target_full_vs_din']['seeds'])} paired seed(s): "
              f"{'met' if d[0] >= TARGET_AUC_GAIN else 'MISSED'}")
    if table:
        path = write_results(f"{results_root(args.quick)}/{dataset}/summary{budget_suffix(args)}", summary,
                             benchmark="ranking_ctr_bench")
        print(f"  -> {path.relative_to(REPO)}")
    return summary


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(CTR_DATASETS))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANT_NAMES)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=0, help="0: the dataset config's")
    p.add_argument("--max-steps", type=int, default=0, help="cap on training steps per epoch (0: full epochs)")
    p.add_argument("--overrides", nargs="*", default=[],
                   help="config overrides (key=value) for every variant, after its ablation file; need --tag")
    p.add_argument("--tag", default="", help="suffix of the run and summary file names (with --overrides)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after that many epochs without a valid AUC gain (0: the dataset config's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training runs (1 is far faster than 2 on a contended 2-core machine)")
    p.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench")
    p.add_argument("--work-dir", type=Path, default=REPO / "var" / "ranking_ctr_bench")
    p.add_argument("--quick", action="store_true",
                   help="small, minutes-long run (smoke test; results under benchmarks/results/ranking/ctr/quick/)")
    p.add_argument("--json", default=None, help="also write this invocation's raw document here")
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.variants = [v for v in args.variants.split(",") if v]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        args.max_steps = args.max_steps or 20
        args.epochs = args.epochs or 1
    bad_d = [d for d in args.datasets if d not in CTR_DATASETS]
    bad_v = [v for v in args.variants if v not in VARIANT_NAMES]
    if bad_d or bad_v:
        p.error(f"unknown dataset(s) {bad_d} (known: {list(CTR_DATASETS)}) / variant(s) {bad_v} "
                f"(known: {list(VARIANT_NAMES)})")
    budget_suffix(args)  # refuses overrides without a tag before anything runs
    args.work_dir.mkdir(parents=True, exist_ok=True)
    t0, l0 = time.perf_counter(), load1()
    doc = run_ctr(args)
    doc.update(benchmark="ranking_ctr_bench", argv=sys.argv[1:], seconds=time.perf_counter() - t0,
               load_at_start=l0, load_at_end=load1())
    if args.json:
        write_json(args.json, doc)
        print(f"\nwrote {args.json}")
    return 0 if all("error" not in r for v in doc["runs"].values() for s in v.values() for r in s.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
