"""`cascade train-ranker`: train the CTR ranker on a features directory, sharded, and export it.

Local (loopback-only worker processes, gloo; `--world-size 1` runs in this process):

    cascade train-ranker --features features/ml-1m-ctr --config ranking/configs/ml-1m.yaml --out runs/ranker-ml1m
    cascade train-ranker --config ranking/configs/ml-1m.yaml --config ranking/configs/ablations/din.yaml \\
        --out runs/ml1m-din --world-size 2 train.epochs=2 train.seed=1

A cluster (torchrun, or a PyTorchJob, sets RANK / WORLD_SIZE / MASTER_ADDR; the
training runs on CPU tensors, so the process group is gloo on every node):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id ranker-1 \\
        jobs/train_ranker.py --config ranking/configs/ml-1m.yaml --out /shared/runs/ranker \\
        data.features_dir=/shared/features/ml-1m

Two "nodes" on one machine, loopback only (tests/jobs/test_multinode.py; see
`features.train.launch` for why the rendezvous store is hosted apart):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 GLOO_SOCKET_IFNAME=lo torchrun --nnodes 2 --nproc-per-node 1 \\
        --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400 --rdzv-id r1 --rdzv-conf is_host=false \\
        --local-addr 127.0.0.1 -m jobs.train_ranker --out runs/r1 ...       # run twice

Config: defaults <- each `--config` YAML in order <- `key.sub=value` overrides,
into `ranking.config.RankerConfig` (unknown keys are rejected); `--features DIR` is
`data.features_dir=DIR`. The flags are those of `cascade train-retriever`
(jobs/training.py); `train` here is the entry point the pipeline calls too. Output
layout: see `ranking.train` (checkpoints/, metrics.json, curves.png, summary.json, export/).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from jobs.training import add_arguments as add_training_arguments
from jobs.training import load_layered, run_ranks, setup_rank, write_run_config

if TYPE_CHECKING:
    from features.train.launch import TorchrunEnv
    from ranking.config import RankerConfig
    from ranking.train import RankerTrainResult

log = logging.getLogger("cascade.train_ranker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_training_arguments(p, features_required=False,
                           features_help="features directory (`cascade build-features`); default: data.features_dir")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-ranker", help="train the CTR ranker (DIN/DARE/SDIM/AW-MoE), sharded, and export it")
    add_arguments(p)
    p.set_defaults(func=run)


def load_ranker_config(paths: Sequence[Path | str], overrides: Sequence[str]) -> RankerConfig:
    """defaults <- each YAML file in order <- overrides (`cascade train-ranker --config A --config B k=v`)."""
    from ranking.config import RankerConfig

    return load_layered(RankerConfig, paths, overrides)


def _train_rank(rank: int, world_size: int, features: str, cfg: RankerConfig, out: Path, resume: bool, export: bool,
                progress: bool) -> RankerTrainResult:
    from dataclasses import replace

    from ranking.data import open_ranking_data
    from ranking.train import train_ranker

    setup_rank(rank)
    cfg = replace(cfg, data=replace(cfg.data, features_dir=features))
    if rank == 0:
        write_run_config(out, cfg)  # the features version actually read
    data = open_ranking_data(cfg.data, cfg.model)
    return train_ranker(rank, world_size, cfg, data, out, resume=resume, export=export, progress=progress)


def train(cfg: RankerConfig, features: Path | str | None, out: Path | str, world_size: int = 1, *,
          resume: bool = False, export: bool = True, progress: bool = True,
          launcher: TorchrunEnv | None = None) -> RankerTrainResult | None:
    """Trains the ranker on `features` (None: `cfg.data.features_dir`) into `out` and exports the best epoch to
    OUT/export.

    world_size: loopback ranks, or `launcher`: the torchrun world this process is a rank of. Returns rank 0's
    result; None on the other ranks of a torchrun world.
    """
    import contextlib

    if cfg.model.residual_column >= 0:
        raise ValueError("a second-stage ranker (model.residual_column >= 0) learns from the retriever's candidate "
                         "lists: train it with `cascade pipeline run` (its ranker stage, jobs/second_stage.py) or "
                         "benchmarks/two_stage_bench.py")
    features = str(features) if features else cfg.data.features_dir
    if not features:
        raise ValueError("data.features_dir is not set: pass --features DIR or data.features_dir=PATH "
                         "(a `cascade build-features` output)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:  # a versioned features root stays pinned to one version for the run
        result, _ = run_ranks(held, "train-ranker", features, out, resume, world_size, launcher, _train_rank,
                              cfg, out, resume, export, progress)
    return result


def _print_summary(res: RankerTrainResult, out: Path) -> None:
    v, t = res.best_valid, res.test
    print(f"best epoch   {res.best_epoch} of {res.epochs_run} ({res.stopped})")
    print(f"valid        auc {v['auc']:.4f}   gauc {v['gauc']:.4f}   logloss {v['logloss']:.4f}")
    print(f"test         auc {t['auc']:.4f}   gauc {t['gauc']:.4f}   logloss {t['logloss']:.4f}   (n={t['n']:,})")
    print(f"throughput   {res.examples_per_s:,.0f} training examples/s over {res.train_seconds:.0f}s of steps "
          f"({res.wall_seconds:.0f}s wall)")
    print(f"sharding     {json.dumps(res.plan)}")
    print(f"export       {res.export_dir or '-'}")
    print(f"summary      {out / 'summary.json'}   curves {out / 'curves.png'}")


def run(args: argparse.Namespace) -> int:
    from features.train.launch import TorchrunEnv

    cfg = load_ranker_config(args.config, args.overrides)
    res = train(cfg, args.features, args.out, args.world_size, resume=args.resume, export=not args.no_export,
                progress=not args.quiet, launcher=TorchrunEnv.parse(os.environ))  # set by torchrun or a PyTorchJob
    if res is not None:
        _print_summary(res, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """torchrun entry point: `torchrun ... jobs/train_ranker.py --config ... --out ...`."""
    p = argparse.ArgumentParser(prog="train_ranker", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
