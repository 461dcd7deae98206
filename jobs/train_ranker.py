"""`cascade train-ranker`: train the CTR ranker on a features directory, sharded, and export it.

Local (loopback-only worker processes, gloo; `--world-size 1` runs in this process):

    cascade train-ranker --config ranking/configs/ml-1m.yaml --out runs/ranker-ml1m \\
        data.features_dir=features/ml-1m-ctr
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
into `ranking.config.RankerConfig` (unknown keys are rejected). Output layout:
see `ranking.train` (checkpoints/, metrics.json, curves.png, summary.json, export/).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("cascade.train_ranker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="YAML with RankerConfig values; repeat to layer (dataset file, then an ablation file)")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, metrics, export)")
    p.add_argument("--world-size", type=int, default=1,
                   help="local loopback ranks (ignored under torchrun, which sets the world itself)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    p.add_argument("--no-export", action="store_true", help="skip the unsharded export at the end")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=2")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-ranker", help="train the CTR ranker (DIN/DARE/SDIM/AW-MoE), sharded, and export it")
    add_arguments(p)
    p.set_defaults(func=run)


def load_ranker_config(paths: list[Path], overrides: list[str]) -> Any:
    from features.config import load_config
    from ranking.config import RankerConfig

    cfg = None
    for path in paths:
        cfg = load_config(RankerConfig, path, base=cfg)
    return load_config(RankerConfig, None, overrides, base=cfg)


def _worker(rank: int, world_size: int, cfg: Any, out: str, resume: bool, export: bool) -> dict[str, Any]:
    from dataclasses import asdict

    from ranking.data import open_ranking_data
    from ranking.train import train_ranker

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = open_ranking_data(cfg.data, cfg.model)
    result = train_ranker(rank, world_size, cfg, data, out, resume=resume, export=export)
    return asdict(result)


def _print_summary(res: dict[str, Any], out: Path) -> None:
    v, t = res["best_valid"], res["test"]
    print(f"best epoch   {res['best_epoch']} of {res['epochs_run']} ({res['stopped']})")
    print(f"valid        auc {v['auc']:.4f}   gauc {v['gauc']:.4f}   logloss {v['logloss']:.4f}")
    print(f"test         auc {t['auc']:.4f}   gauc {t['gauc']:.4f}   logloss {t['logloss']:.4f}   (n={t['n']:,})")
    print(f"throughput   {res['examples_per_s']:,.0f} training examples/s over {res['train_seconds']:.0f}s of steps "
          f"({res['wall_seconds']:.0f}s wall)")
    print(f"sharding     {json.dumps(res['plan'])}")
    print(f"export       {res['export_dir'] or '-'}")
    print(f"summary      {out / 'summary.json'}   curves {out / 'curves.png'}")


def _with_features(cfg: Any, features_dir: str) -> Any:
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, features_dir=features_dir))


def run(args: argparse.Namespace) -> int:
    from features.config import dump_config
    from features.train.launch import TorchrunEnv, init_from_torchrun_env, run_distributed
    from features.versions import pin_on_rank0

    cfg = load_ranker_config(args.config, args.overrides)
    if not cfg.data.features_dir:
        raise ValueError("data.features_dir is not set: pass data.features_dir=PATH (a `cascade build-features` output)")
    args.out.mkdir(parents=True, exist_ok=True)
    export = not args.no_export
    launcher = TorchrunEnv.parse(os.environ)
    with contextlib.ExitStack() as held:  # a versioned features root stays pinned to one version for the run
        if launcher is not None:  # launched by torchrun or a PyTorchJob
            import torch.distributed as dist

            rank, world = launcher.rank, launcher.world_size
            init_from_torchrun_env("gloo", launcher)  # ranking.train trains on CPU tensors: gloo on any node
            features = pin_on_rank0(held, cfg.data.features_dir, "train-ranker", rank, args.out, args.resume)
            cfg = _with_features(cfg, features)
            if rank == 0:
                (args.out / "config.yaml").write_text(dump_config(cfg))  # the features version actually read
                log.info("config:\n%s", dump_config(cfg))
            try:
                res = _worker(rank, world, cfg, str(args.out), args.resume, export)
            finally:
                dist.destroy_process_group()
        else:
            features = pin_on_rank0(held, cfg.data.features_dir, "train-ranker", 0, args.out, args.resume)
            cfg = _with_features(cfg, features)
            (args.out / "config.yaml").write_text(dump_config(cfg))
            log.info("config:\n%s", dump_config(cfg))
            res = run_distributed(_worker, args.world_size, cfg, str(args.out), args.resume, export)[0]
            rank = 0
    if rank == 0:
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
