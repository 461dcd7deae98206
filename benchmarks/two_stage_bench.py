"""Two-stage benchmark: the retriever alone vs the retriever followed by the listwise ranker.

Protocol (leave-one-out, as in retrieval_bench.py and the published rows in ../shared/data/BASELINES.md):
every user; the validation item is the second-to-last, the test item the last; full ranking over every
catalog item with every item the user has seen masked (the whole history, not a tail).

1. The standard retriever: `retrieval/configs/<dataset>.yaml`, seed S, trained on every user's
   training prefix. It is what serves; its own test HR/NDCG is "retriever alone".
2. The lists retriever: the same config with `train.holdout_tail=K`, trained without each user's
   last K training items. Its top-N lists at those K positions are the ranker's training lists:
   lists for targets the retriever was not trained on, so the retrieval logit the ranker learns
   to correct is as sharp in training as at serving. (Lists at positions the retriever trained on
   would make the retrieval score look far better than it is, the reason the pointwise ranker lost.)
3. Valid lists: the standard retriever at the validation position (it never trained on that
   item); test lists: at the test position. Top N of all unseen items, best first.
4. The ranker (`ranking/configs/two-stage.yaml`, layered on the dataset's ranker config when it has
   one): DIN + DARE + AW-MoE with the contrastive gate loss, scoring the retriever's logit plus a
   learned correction whose heads start at zero, trained listwise (softmax over the list,
   `--train-width` sampled candidates per list and step), the epoch chosen on the valid lists'
   NDCG@10 (the two-stage system's valid NDCG@10), tested once at that epoch. With the item-item
   inputs and `lists.item_item_select` (the default), a ranker without them is trained too and the
   one better on the valid lists is kept (`jobs.second_stage.fit_selected`); the file records both.
5. Retriever alone and pipeline are scored on the same users and the same test lists (the list is
   the retriever's top N of every unseen item, so the retriever's order on it is its full-ranking
   order); paired per-user differences of hit@10 and NDCG@10 with a bootstrap 95% interval.

Each seed writes `benchmarks/results/two_stage/<dataset>/seed<S>.json`; the summary over every seed
file present (mean ± std, the x1.05 target) is printed and written to `.../summary.json`, so a
3-seed table builds up run by run. Targets (reported, never asserted): pipeline >= 1.05 x retriever
on HR@10 and NDCG@10 on ML-1M for each seed; pipeline above the retriever on Beauty.

    python benchmarks/two_stage_bench.py --dataset ml-1m --seed 0          # trains both retrievers (cached)
    python benchmarks/two_stage_bench.py --dataset ml-1m --seed 0 --retriever R/export --lists-retriever L/export
    python benchmarks/two_stage_bench.py --dataset ml-100k --seed 0 --quick  # minutes: a smoke run

Retrievers, lists and ranker runs are cached under --work-dir, so an interrupted run continues.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import DATASETS, fmt, load1, mean_std, prepare_features, print_table, write_json  # noqa: E402
from results_file import RESULTS_DIR, write_results  # noqa: E402

TARGET_RATIO = 1.05
KS = (10, 50)


def train_retriever(features: Path, dataset: str, seed: int, out: Path, overrides: list[str]) -> Path:
    """`cascade train-retriever` with the dataset's config (cached: an existing export is reused)."""
    export = out / "export"
    if (export / "manifest.json").exists():
        print(f"  reusing {export}", flush=True)
        return export
    cmd = [sys.executable, "-m", "jobs.cli", "train-retriever", "--features", str(features), "--config",
           str(REPO / "retrieval" / "configs" / f"{dataset}.yaml"), "--out", str(out), f"train.seed={seed}",
           *overrides]
    print(f"  {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return export


def check_cache_inputs(work: Path, args: argparse.Namespace) -> None:
    """The retrievers and lists cached under `work` were made from these inputs: refuse to reuse them for
    others (another --holdout or retriever override would otherwise be scored on the old retrievers' lists).
    A folder from before this record is adopted as made from the current inputs."""
    inputs = {"holdout": args.holdout, "retriever_overrides": list(args.retriever_overrides),
              "retriever": None if args.retriever is None else str(args.retriever),
              "lists_retriever": None if args.lists_retriever is None else str(args.lists_retriever)}
    record = work / "inputs.json"
    if record.exists():
        old = json.loads(record.read_text())
        diff = {k: (old.get(k), v) for k, v in inputs.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{work} caches retrievers and lists made from other inputs "
                             f"({', '.join(f'{k}: cached {a!r}, asked {b!r}' for k, (a, b) in diff.items())}): "
                             "pass another --work-dir, or delete that folder to train again")
    else:
        record.write_text(json.dumps(inputs, indent=1))


def ranker_config(args: argparse.Namespace) -> Any:
    from features.config import load_config
    from ranking.config import RankerConfig

    layers = ([REPO / DATASETS[args.dataset]["config"]] if DATASETS[args.dataset].get("config") else []) + \
        [REPO / "ranking" / "configs" / "two-stage.yaml"]
    overrides = [f"train.seed={args.seed}", f"train.threads={args.threads}", f"lists.top_n={args.top_n}",
                 f"lists.holdout={args.holdout}", f"lists.train_width={args.train_width}",
                 f"lists.lists_per_batch={args.lists_per_batch}", f"lists.context_window={args.context_window}",
                 f"lists.max_users={args.max_users}", *args.ranker_overrides]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_steps:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps}")
    cfg = None
    for i, layer in enumerate(layers):
        cfg = load_config(RankerConfig, layer, overrides if i == len(layers) - 1 else [], base=cfg)
    return cfg


def per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    r = np.asarray(ranks, np.float64)
    out = {}
    for k in KS:
        hit = r < k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    return out


def paired(a: np.ndarray, b: np.ndarray, seed: int, reps: int = 2000) -> dict[str, float]:
    """Mean of b - a with a bootstrap 95% interval over users."""
    d = b - a
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (reps, len(d)))].mean(1)
    return {"mean": float(d.mean()), "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]}


def score_lists(ranker_export: str, data: Any) -> np.ndarray:
    """(R,) 0-based rank of each test request's target after the exported ranker (inf: not retrieved)."""
    from ranking.export import load_ranker

    return data.ranks(load_ranker(ranker_export), "test")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from features.reader import FeatureStore
    from features.train.metrics import topk_metrics
    from jobs.second_stage import candidate_lists, fit_selected

    work = args.work_dir / args.dataset / f"seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    check_cache_inputs(work, args)
    t_all = time.perf_counter()
    features = prepare_features(args.dataset, args.shared_data, args.data_dir)
    print(f"\n[two-stage] {args.dataset} seed {args.seed}: retrievers (load {load1():.1f})", flush=True)
    t0 = time.perf_counter()
    std = args.retriever or train_retriever(features, args.dataset, args.seed, work / "retriever",
                                            args.retriever_overrides)
    held = args.lists_retriever or train_retriever(features, args.dataset, args.seed, work / "retriever-holdout",
                                                   [*args.retriever_overrides, f"train.holdout_tail={args.holdout}"])
    retrievers_s = time.perf_counter() - t0
    cfg = ranker_config(args)
    store = FeatureStore(features)
    print(f"[two-stage] candidate lists (top {args.top_n}, every seen item masked)", flush=True)
    t0 = time.perf_counter()
    lists = candidate_lists(store, Path(std), Path(held), cfg.lists, work)
    lists_s = time.perf_counter() - t0
    print("[two-stage] ranker", flush=True)
    fitted = fit_selected(cfg, store, lists, work / f"ranker{args.tag}")
    res, data = fitted.result, fitted.data
    test = lists["test"]
    retr_rank = np.where(test.hit(), (test.items == test.target[:, None]).argmax(1), np.inf)
    pipe_rank = score_lists(res.export_dir, data)
    retr, pipe = per_user(retr_rank), per_user(pipe_rank)
    m_retr = topk_metrics(retr_rank, ks=KS, recall_ks=(args.top_n,))
    m_pipe = topk_metrics(pipe_rank, ks=KS, recall_ks=(args.top_n,))
    diffs = {k: paired(retr[k], pipe[k], args.seed) for k in retr}
    valid_retr = {k: float(v) for k, v in topk_metrics(
        np.where(lists["valid"].hit(), (lists["valid"].items == lists["valid"].target[:, None]).argmax(1), np.inf),
        ks=KS, recall_ks=()).items()}
    results = {
        "dataset": args.dataset, "split": "leave-one-out test (last item), full ranking, every seen item masked",
        "seed": args.seed, "users": int(len(test)), "top_n": args.top_n, "holdout_tail": args.holdout,
        "train_width": args.train_width, "context_window": args.context_window,
        "retriever": {k: v for k, v in m_retr.items()}, "pipeline": {k: v for k, v in m_pipe.items()},
        "ratio": {k: (m_pipe[k] / m_retr[k] if m_retr[k] else float("nan")) for k in ("hr@10", "ndcg@10")},
        "paired_difference": diffs,
        "valid": {"retriever": valid_retr, "pipeline": res.best_valid},
        "ranker": {"best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "stopped": res.stopped,
                   "train_seconds": res.train_seconds, "examples_per_s": res.examples_per_s,
                   "history": res.history, "kept": fitted.kept, "variants": fitted.variants},
        "seconds": {"retrievers": retrievers_s, "lists": lists_s, "ranker": res.train_seconds,
                    "all": time.perf_counter() - t_all},
        "retriever_exports": {"standard": str(std), "lists": str(held)},
        "quick": bool(args.quick),
    }
    print_table(f"Two-stage {args.dataset} seed {args.seed}: test, {len(test):,} users, target ranked in the "
                f"retriever's top {args.top_n} unseen items",
                ["system", "hr@10", "ndcg@10", "hr@50", "ndcg@50", f"recall@{args.top_n}"],
                [[name, *(f"{m[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", f"recall@{args.top_n}"))]
                 for name, m in (("retriever alone", m_retr), ("retriever -> ranker", m_pipe))])
    print(f"  pipeline / retriever: hr@10 x{results['ratio']['hr@10']:.3f}, ndcg@10 x{results['ratio']['ndcg@10']:.3f}"
          f"  (target x{TARGET_RATIO}); paired Δhr@10 {diffs['hr@10']['mean']:+.4f} "
          f"[{diffs['hr@10']['ci95'][0]:+.4f}, {diffs['hr@10']['ci95'][1]:+.4f}]")
    return results


def summarize(dataset: str, folder: Path, tag: str = "") -> dict[str, Any] | None:
    runs = {}
    for f in sorted(folder.glob("seed*.json")):
        if re.fullmatch(rf"seed\d+{re.escape(tag)}", f.stem):
            runs[f.stem] = json.loads(f.read_text())["results"]
    if not runs:
        return None
    table = {}
    rows = []
    for system in ("retriever", "pipeline"):
        table[system] = {k: mean_std([r[system][k] for r in runs.values()]) for k in ("hr@10", "ndcg@10", "hr@50")}
        rows.append([system, *(fmt(table[system][k]) for k in ("hr@10", "ndcg@10", "hr@50")), str(len(runs))])
    ratios = {s: r["ratio"] for s, r in runs.items()}
    kept = {s: r["ranker"].get("kept", "") for s, r in runs.items()}
    met = {s: all(v >= TARGET_RATIO for v in r.values()) for s, r in ratios.items()}
    print_table(f"Two-stage {dataset}: mean ± std over seeds ({', '.join(runs)})",
                ["system", "hr@10", "ndcg@10", "hr@50", "seeds"], rows)
    return {"dataset": dataset, "seeds": sorted(runs), "table": table, "ratio_by_seed": ratios,
            "target": f"pipeline >= {TARGET_RATIO} x retriever on hr@10 and ndcg@10, every seed",
            "met_by_seed": met, "ranker_kept_by_seed": kept}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="ml-1m", choices=sorted(DATASETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-n", type=int, default=100, help="candidates per list (the ranker's N)")
    p.add_argument("--holdout", type=int, default=5, help="training positions per user held out of the lists retriever")
    p.add_argument("--train-width", type=int, default=32, help="sampled candidates per training list (0: whole)")
    p.add_argument("--lists-per-batch", type=int, default=16)
    p.add_argument("--context-window", type=int, default=5,
                   help="the ranker's point-in-time context features (features.list_context) over the last N "
                        "behaviors; 0: the list features only")
    p.add_argument("--tag", default="", help="results file suffix (seed<S><tag>.json) and work subfolder")
    p.add_argument("--epochs", type=int, default=0, help="0: the ranker config's")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--max-users", type=int, default=0, help="0: every user")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--retriever", type=Path, default=None, help="standard retriever export (else trained, cached)")
    p.add_argument("--lists-retriever", type=Path, default=None, help="holdout retriever export (else trained)")
    p.add_argument("--retriever-overrides", nargs="*", default=[], help="overrides of both retrievers' config")
    p.add_argument("--ranker-overrides", nargs="*", default=[], help="overrides of the ranker's config")
    p.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench")
    p.add_argument("--work-dir", type=Path, default=REPO / "var" / "two_stage_bench")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results document here")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2-epoch retrievers, 1 ranker epoch of 20 steps, 300 users; results under quick/")
    args = p.parse_args(argv)
    if args.quick:
        args.retriever_overrides = ["train.epochs=2", "train.max_minutes=0", *args.retriever_overrides]
        args.epochs, args.max_steps = args.epochs or 1, args.max_steps or 20
        args.max_users = args.max_users or 300
        args.work_dir = args.work_dir / "quick"
    res = run(args)
    name = f"two_stage/{'quick/' if args.quick else ''}{args.dataset}"
    path = write_results(f"{name}/seed{args.seed}{args.tag}", res, benchmark="two_stage")
    print(f"\nwrote {path}")
    if args.json:
        write_json(args.json, res)
    summary = summarize(args.dataset, RESULTS_DIR / name, args.tag)
    if summary is not None:
        print(f"wrote {write_results(f'{name}/summary{args.tag}', summary, benchmark='two_stage')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
