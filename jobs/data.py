"""`cascade data import|synth`: public datasets and synthetic logs -> canonical Parquet.

    cascade data import --source ../shared/data/ml-1m --out data/ml-1m
    cascade data import --source ../shared/data/amazon-beauty/Beauty.txt --out data/beauty
    cascade data synth --events 10000000 --out data/synth-10m --seed 0
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="import public datasets / generate synthetic data")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    imp = dsub.add_parser("import", help="import MovieLens / Amazon sequence files into canonical Parquet")
    imp.add_argument("--source", required=True, type=Path,
                     help="dataset directory (ML-1M, ML-100K) or sequence file (Beauty.txt)")
    imp.add_argument("--out", required=True, type=Path, help="output dataset directory")
    imp.add_argument("--kind", default="auto", choices=("auto", "ml-1m", "ml-100k", "sequence"))
    imp.add_argument("--name", default=None, help="dataset name in the manifest and event ids")
    imp.add_argument("--positive-threshold", type=float, default=4.0,
                     help="ratings >= this are positives (label 1.0); default 4")
    imp.add_argument("--strict", action="store_true", help="exit non-zero if any row was quarantined")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    imp.set_defaults(func=run_import)

    syn = dsub.add_parser("synth", help="generate a synthetic dataset with learnable structure")
    syn.add_argument("--out", required=True, type=Path)
    syn.add_argument("--events", type=int, default=1_000_000)
    syn.add_argument("--users", type=int, default=0, help="0: events // 150")
    syn.add_argument("--items", type=int, default=0, help="0: max(1000, events // 500)")
    syn.add_argument("--heavy-users", type=int, default=-1,
                     help="users with --heavy-min-events events each (-1: a few when events allow)")
    syn.add_argument("--heavy-min-events", type=int, default=20_000)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--overwrite", action="store_true")
    syn.set_defaults(func=run_synth)


def _print_summary(manifest: dict, seconds: float, out: Path) -> None:
    from features.datasets.common import DATASET_MANIFEST

    stats = manifest["stats"]
    q = manifest["tables"]["quarantine"]
    print(f"dataset      {manifest['dataset']}  ->  {out}")
    print(f"events       {stats['events']:,}   users {stats['users']:,}   items {stats['items']:,}")
    for t in ("items", "users"):
        print(f"{t:<12} {manifest['tables'][t]['rows']:,} rows")
    tr = manifest["time_range"]
    print(f"time range   {tr['min_utc']} .. {tr['max_utc']}  ({manifest['timestamps']})")
    print(f"quarantined  {q['rows']:,}" + (f"  by reason: {json.dumps(q['by_reason'])}" if q["rows"] else ""))
    print(f"took         {seconds:.1f}s   peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"manifest     {out / DATASET_MANIFEST}")


def run_import(args: argparse.Namespace) -> int:
    from features.datasets import MovieLensConfig, import_dataset

    t0 = time.perf_counter()
    res = import_dataset(
        args.source, args.out, args.kind, dataset=args.name,
        movielens=MovieLensConfig(positive_threshold=args.positive_threshold), overwrite=args.overwrite,
    )
    _print_summary(res.manifest, time.perf_counter() - t0, args.out)
    if res.quarantined and args.strict:
        print(f"--strict: {res.quarantined} row(s) quarantined; see {args.out / 'quarantine'}")
        return 3
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from features.datasets.synthetic import SynthConfig, generate

    cfg = SynthConfig(events=args.events, users=args.users, items=args.items, heavy_users=args.heavy_users,
                      heavy_min_events=args.heavy_min_events, seed=args.seed)
    t0 = time.perf_counter()
    with tqdm(total=args.events, unit="ev", unit_scale=True, desc="synth") as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        res = generate(cfg, args.out, overwrite=args.overwrite, progress=progress)
    _print_summary(res.manifest, time.perf_counter() - t0, args.out)
    s = res.manifest["stats"]
    print(f"ctr          {s['ctr']:.3f}   max events/user {s['max_user_events']:,}   users with 20k+ events {s['users_with_20k_plus']}")
    return 0
