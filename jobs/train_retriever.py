"""`cascade train-retriever`: train the two-tower retriever on a features directory, evaluate it, export it.

Local, one process or N loopback workers (gloo, 127.0.0.1 only)::

    cascade train-retriever --features data/ml-1m-features --config retrieval/configs/ml-1m.yaml \\
        --out runs/retriever-ml1m [--world-size 2] [train.epochs=5 loss.mode=sampled ...]

Cluster, under torchrun or a PyTorchJob (one process per CPU slot; training runs on
CPU tensors, so the process group is gloo)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id r1 \\
        -m jobs.train_retriever --features /data/features --config retrieval/configs/ml-1m.yaml --out /runs/r1

(torchrun's stores listen on every interface: use it on a cluster network,
`--world-size` on a workstation; `features.train.launch` shows a loopback-only
two-"node" launch.) The flags and the config layering (defaults <- each `--config`
in order <- `key.sub=value` overrides) are those of `cascade train-ranker`
(jobs/training.py); `--nproc` is the deprecated name of `--world-size`. The same
`retrieval.train.train_retriever` runs in every case (`train` here is the entry
point the pipeline calls too); `--resume` continues from OUT/checkpoints/last.
After training, the best checkpoint is loaded unsharded (whatever world size
wrote it) and exported to OUT/export (`retrieval.export.export_from_checkpoint`),
with the ANN index's recall@500 against exact search measured on the test users.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from jobs.training import add_arguments as add_training_arguments
from jobs.training import load_layered, quiet_fbgemm, run_ranks, setup_rank, write_run_config

if TYPE_CHECKING:
    from features.train.launch import TorchrunEnv
    from retrieval.config import RetrieverConfig
    from retrieval.train import RetrieverTrainResult

log = logging.getLogger("cascade.train_retriever")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-retriever", help="train, evaluate and export the two-tower retriever")
    add_arguments(p)
    p.set_defaults(func=run)


class _DeprecatedNproc(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[no-untyped-def]
        log.warning("--nproc is deprecated: use --world-size (the flag of both training jobs)")
        setattr(namespace, self.dest, values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p, features_required=True, features_help="features directory (`cascade build-features`)")
    p.add_argument("--nproc", dest="world_size", type=int, default=argparse.SUPPRESS, action=_DeprecatedNproc,
                   help=argparse.SUPPRESS)


def load_retriever_config(paths: Sequence[Path | str], overrides: Sequence[str]) -> RetrieverConfig:
    """defaults <- each YAML file in order <- overrides (`cascade train-retriever --config A --config B k=v`)."""
    from retrieval.config import RetrieverConfig

    return load_layered(RetrieverConfig, paths, overrides)


def _train_rank(rank: int, world_size: int, features: str, cfg: RetrieverConfig, out: Path, resume: bool,
                progress: bool) -> RetrieverTrainResult:
    from retrieval.train import train_on_features

    setup_rank(rank)
    if rank == 0:
        write_run_config(out, cfg)
    return train_on_features(rank, world_size, cfg, Path(features), out, resume=resume, progress=progress)


def train(cfg: RetrieverConfig, features: Path | str, out: Path | str, world_size: int = 1, *, resume: bool = False,
          export: bool = True, progress: bool = True, launcher: TorchrunEnv | None = None) -> RetrieverTrainResult | None:
    """Trains the retriever on `features` into `out` and exports the best epoch to OUT/export.

    world_size: loopback ranks, or `launcher`: the torchrun world this process is a rank of. Returns rank 0's
    result (its `export_dir` set when exported); None on the other ranks of a torchrun world.
    """
    from retrieval.data import open_data
    from retrieval.export import export_from_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(world_size, 1))
    with contextlib.ExitStack() as held:  # a versioned features root stays pinned to one version for the run
        result, pinned = run_ranks(held, "train-retriever", features, out, resume, world_size, launcher, _train_rank,
                                   cfg, out, resume, progress, threads_per_rank=threads)
        if result is None or not export:
            return result
        export_from_checkpoint(out / "checkpoints" / "best", cfg, open_data(Path(pinned), cfg), out / "export",
                               extra={"metrics": {"test": result.test, "valid": result.best_valid},
                                      "best_epoch": result.best_epoch})
    result = dataclasses.replace(result, export_dir=str(out / "export"))
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "export_dir": result.export_dir}, indent=2) + "\n")
    return result


def run(args: argparse.Namespace) -> int:
    from features.train.launch import TorchrunEnv

    quiet_fbgemm()
    cfg = load_retriever_config(args.config, args.overrides)
    if not args.features.is_dir():
        raise FileNotFoundError(f"features directory {args.features} does not exist (run `cascade build-features`)")
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    t0 = time.perf_counter()
    result = train(cfg, args.features, args.out, args.world_size, resume=args.resume, export=not args.no_export,
                   progress=not args.quiet, launcher=TorchrunEnv.parse(os.environ))  # set by torchrun or a PyTorchJob
    if result is not None:
        print_summary(result, args.out, time.perf_counter() - t0)
    return 0


def print_summary(result: Any, out: Path, seconds: float) -> None:
    keys = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "recall@100", "recall@500")
    print()
    print(f"{'split':<8}" + "".join(f"{k:>11}" for k in keys))
    for name, m in (("valid", result.best_valid), ("test", result.test)):
        print(f"{name:<8}" + "".join(f"{m.get(k, float('nan')):>11.4f}" for k in keys))
    print(f"best epoch   {result.best_epoch} of {result.epochs_run} (stopped: {result.stopped})")
    print(f"time         training {result.train_seconds:.0f}s wall ({result.train_cpu_seconds:.0f} CPU-s), "
          f"run {result.wall_seconds:.0f}s, with export {seconds:.0f}s")
    print(f"sharding     {result.plan}")
    c = result.collisions
    print(f"id hashing   {c['items']} items, {c['hashes']} x {c['buckets']} buckets: "
          f"{c['items_sharing_all_rows']} items share all rows with another item")
    if result.export_dir is not None:
        ann = json.loads((Path(result.export_dir) / "manifest.json").read_text())["ann"]
        rec = {k: v for k, v in ann.items() if k.startswith("recall@")}
        print(f"export       {result.export_dir}  ({ann['kind']} index over {ann['items']} items, {rec})")
    print(f"metrics      {out / 'metrics.json'}, {out / 'curves.png'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m jobs.train_retriever` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="jobs.train_retriever", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
