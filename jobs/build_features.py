"""`cascade build-features`: the Spark feature jobs, canonical dataset -> features directory.

Runs every job (or `--only` some) of `features.spark.pipeline.build_features`:
validation + quarantine, item/user tables, timelines, sequences, popularity,
retrieval and ranking samples, statistics and the validation report. The
output layout is documented in `features/layout.py`.

Local (Spark in local mode, everything bound to 127.0.0.1):

    cascade build-features --dataset data/ml-1m --out features/ml-1m
    cascade build-features --dataset data/ml-1m --out features/ml-1m --master 'local[2]' \\
        --config features.yaml sequence.long_cap=2000 ranking.negatives_per_positive=8
    cascade build-features --dataset data/ml-1m --out features/ml-1m --only sequences,report   # same config
    cascade build-features --dataset data/ml-1m --out features --versioned   # features/v-.../ + features/current.json

spark-submit (this file; the master and resources come from spark-submit; Cascade
must be installed on the driver, executors need nothing but Spark: no Python UDFs):

    spark-submit --master 'local[4]' --driver-memory 8g jobs/build_features.py \\
        --dataset data/synth-10m --out features/synth-10m
    spark-submit --master yarn --deploy-mode client --num-executors 20 --executor-memory 8g \\
        jobs/build_features.py --dataset hdfs:///cascade/data/events-2026-11 \\
        --out hdfs:///cascade/features/2026-11 spark.shuffle_partitions=800
    spark-submit --master k8s://https://k8s-api.example:6443 --deploy-mode cluster \\
        --conf spark.kubernetes.container.image=registry.example/cascade:0.1.0 \\
        local:///opt/cascade/jobs/build_features.py --dataset s3a://bucket/data --out s3a://bucket/features

Config: defaults <- `--config` YAML <- `key.sub=value` overrides, into
`features.spark.config.FeatureBuildConfig` (unknown keys are rejected).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from features import layout

log = logging.getLogger("cascade.build_features")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="canonical dataset directory or URI (cascade data import|synth)")
    p.add_argument("--out", required=True, help="features directory or URI to write")
    p.add_argument("--master", default=None,
                   help="Spark master (local[*], local[2], spark://..., yarn, k8s://...); default: local[*], "
                        "or the one spark-submit was given")
    p.add_argument("--config", type=Path, default=None, help="YAML file with FeatureBuildConfig values")
    p.add_argument("--only", default=None,
                   help="comma-separated stages to run (default: all): events, items, users, timelines, sequences, "
                        "popularity, retrieval_samples, ranking_samples, stats, report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing features directory")
    p.add_argument("--versioned", action="store_true",
                   help="--out is a versioned root: write a new OUT/v-<UTC time>-<id>/, then point OUT/current.json "
                        "at it atomically (features/versions.py); readers never see a directory being rewritten")
    p.add_argument("--keep-versions", type=int, default=3,
                   help="with --versioned: versions kept after the run (older ones are deleted unless a running "
                        "job has leased them)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. sequence.long_cap=2000")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-features", help="Spark jobs: sequences, samples, statistics, splits, validation report")
    add_arguments(p)
    p.set_defaults(func=run)


def _launched_by_spark_submit() -> bool:
    # pyspark's own test for "the JVM started this Python driver" (see pyspark.java_gateway)
    return "PYSPARK_GATEWAY_PORT" in os.environ


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from features.config import dump_config, load_config
    from features.spark.config import FeatureBuildConfig

    cfg = load_config(FeatureBuildConfig, args.config, args.overrides)
    if args.master is not None:
        cfg = replace(cfg, spark=replace(cfg.spark, master=args.master))
    elif _launched_by_spark_submit():
        cfg = replace(cfg, spark=replace(cfg.spark, master=None))
    if cfg.spark.master is not None and cfg.spark.master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode: loopback only (and no hostname warning)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip()) if args.only else None
    log.info("build-features %s -> %s\n%s", args.dataset, args.out, dump_config(cfg))

    from features.spark.pipeline import STAGES, build_features
    from features.spark.session import build_session

    if only:
        unknown = sorted(set(only) - set(STAGES))
        if unknown:
            raise ValueError(f"--only: unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
    from features import versions

    reserved = None
    if args.versioned:
        if "://" in args.out:
            raise ValueError(f"--versioned needs a local or mounted directory for --out (leases use file locks), "
                             f"got {args.out}")
        if args.overwrite or args.keep_versions < 1:
            raise ValueError("--versioned never overwrites (drop --overwrite) and keeps at least 1 version "
                             f"(--keep-versions {args.keep_versions})")
        reserved = versions.reserve(args.out, job="build-features")
    t0 = time.perf_counter()
    print(f"starting Spark ({cfg.spark.master or 'master from spark-submit'}) ...", flush=True)
    session = build_session(cfg.spark)
    print(f"Spark {session.spark.version} on {session.spark.sparkContext.master} ready in {time.perf_counter() - t0:.1f}s",
          flush=True)
    n_stages = len(only) if only else len(STAGES)
    bar = tqdm(total=n_stages, unit="stage", desc="build-features", dynamic_ncols=True)

    def progress(name: str, i: int, n: int, status: str, secs: float, rows: dict[str, int]) -> None:
        if status == "start":
            bar.set_description(f"[{i}/{n}] {name}")
            return
        shown = ", ".join(f"{k}={v:,}" for k, v in rows.items())
        tqdm.write(f"[{i}/{n}] {name:<18} {secs:7.1f}s  {shown}")
        bar.update(1)

    try:
        if reserved is None:
            res = build_features(session.spark, args.dataset, args.out, cfg, only=only, overwrite=args.overwrite,
                                 progress=progress)
        else:
            res = build_features(session.spark, args.dataset, str(reserved[0].path), cfg, only=only,
                                 overwrite=False, progress=progress)
            pointer = versions.commit_version(args.out, reserved[0].version)
    finally:
        bar.close()
        session.stop()
        if reserved is not None:
            reserved[1].release()
    if reserved is not None:
        removed = versions.collect_garbage(args.out, args.keep_versions)
        print(f"committed {pointer['version']} as {Path(args.out) / versions.POINTER}; "
              f"removed {', '.join(removed) if removed else 'no old versions'}")
    total = time.perf_counter() - t0
    print()
    print(f"{'stage':<18} {'seconds':>8}  rows")
    for s in res.stages:
        print(f"{s.name:<18} {s.seconds:8.1f}  {', '.join(f'{k}={v:,}' for k, v in s.rows.items())}")
    print(f"{'total':<18} {total:8.1f}  (Spark start included)")
    print(f"features  {res.out}")
    print(f"manifest  {res.out}/{layout.MANIFEST}")
    if res.report is not None:
        print(f"report    {res.out}/report/validation.txt (+ .json, .png)")
        for w in res.report["warnings"]:
            print(f"warning   {w}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for spark-submit / python jobs/build_features.py."""
    parser = argparse.ArgumentParser(prog="build_features.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if args.verbose:
            raise
        print(f"build_features: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
