"""`cascade train-retriever`: train the two-tower retriever on a features directory, evaluate it, export it.

Local, one process or N loopback workers (gloo, 127.0.0.1 only)::

    cascade train-retriever --features data/ml-1m-features --config retrieval/configs/ml-1m.yaml \\
        --out runs/retriever-ml1m [--nproc 2] [train.epochs=5 loss.mode=sampled ...]

Cluster, under torchrun or a PyTorchJob (one process per CPU slot; training runs on
CPU tensors, so the process group is gloo)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id r1 \\
        -m jobs.train_retriever --features /data/features --config retrieval/configs/ml-1m.yaml --out /runs/r1

(torchrun's stores listen on every interface: use it on a cluster network,
`--nproc` on a workstation; `features.train.launch` shows a loopback-only
two-"node" launch.) The same `retrieval.train.train_retriever` runs in
every case; `--resume` continues from OUT/checkpoints/last. After training,
the best checkpoint is loaded unsharded (whatever world size wrote it) and
exported to OUT/export (retrieval/export.py), with the ANN index's recall@500
against exact search measured on the test users.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("cascade.train_retriever")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-retriever", help="train, evaluate and export the two-tower retriever")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, type=Path, help="features directory (`cascade build-features`)")
    p.add_argument("--config", type=Path, default=None, help="YAML config, e.g. retrieval/configs/ml-1m.yaml")
    p.add_argument("--out", required=True, type=Path, help="run directory: checkpoints, metrics, export")
    p.add_argument("--nproc", type=int, default=1, help="local worker processes (sharded training over gloo)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    p.add_argument("--no-export", action="store_true", help="skip the export step")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=3")


def _quiet_fbgemm() -> None:
    """FBGEMM logs every table's full argument list on the root logger at INFO; keep the job's log readable."""
    class _NoTBE(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("[TBE=")
    for h in logging.getLogger().handlers:
        h.addFilter(_NoTBE())
    for name in ("torchrec", "torch.distributed", "c10d-NullHandler-dcp_logger", "MethodLogger-NullHandler"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _worker(rank: int, world_size: int, cfg, features: Path, out: Path, resume: bool, progress: bool):
    from retrieval.train import train_on_features

    _quiet_fbgemm()
    return train_on_features(rank, world_size, cfg, features, out, resume=resume, progress=progress)


def export_run(cfg, features: Path, out: Path) -> dict:
    """Gathers the best checkpoint into an unsharded model and writes OUT/export; returns the manifest."""
    import shutil

    import numpy as np

    from retrieval.data import open_data
    from retrieval.evaluate import last_queries
    from retrieval.export import export_retriever, load_unsharded

    model = load_unsharded(out / "checkpoints" / "best", cfg)
    data = open_data(features, cfg)
    queries = np.concatenate([last_queries(model, eb.batch).numpy() for eb in data.eval_batches("test", 0, 1)])
    summary = json.loads((out / "summary.json").read_text())
    dest = out / "export"
    if dest.exists():
        shutil.rmtree(dest)
    return export_retriever(model, cfg, data.catalog, dest, queries=queries,
                            extra={"metrics": {"test": summary["test"], "valid": summary["best_valid"]},
                                   "best_epoch": summary["best_epoch"]})


def run(args: argparse.Namespace) -> int:
    from features.config import dump_config, load_config
    from features.train.launch import TorchrunEnv, init_from_torchrun_env, run_distributed
    from features.versions import pin_on_rank0
    from retrieval.config import RetrieverConfig

    _quiet_fbgemm()
    cfg = load_config(RetrieverConfig, args.config, args.overrides)
    if not args.features.is_dir():
        raise FileNotFoundError(f"features directory {args.features} does not exist (run `cascade build-features`)")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    args.out.mkdir(parents=True, exist_ok=True)
    launcher = TorchrunEnv.parse(os.environ)  # set by torchrun or a PyTorchJob
    rank = launcher.rank if launcher is not None else 0
    if rank == 0:
        (args.out / "config.yaml").write_text(dump_config(cfg))
        log.info("config:\n%s", dump_config(cfg))
    t0 = time.perf_counter()
    with contextlib.ExitStack() as held:
        if launcher is not None:
            import torch.distributed as dist

            world = launcher.world_size
            # retrieval.train trains on CPU tensors, so gloo even where CUDA is present (NCCL needs CUDA tensors)
            init_from_torchrun_env("gloo", launcher)
            features = Path(pin_on_rank0(held, args.features, "train-retriever", rank, args.out, args.resume))
            result = _worker(rank, world, cfg, features, args.out, args.resume, not args.quiet)
            dist.barrier()
            dist.destroy_process_group()
            if rank != 0:
                return 0
        else:
            features = Path(pin_on_rank0(held, args.features, "train-retriever", 0, args.out, args.resume))
            result = run_distributed(_worker, args.nproc, cfg, features, args.out, args.resume, not args.quiet,
                                     threads_per_rank=max(1, (os.cpu_count() or 1) // args.nproc))[0]
        manifest = None if args.no_export else export_run(cfg, features, args.out)
    print_summary(result, manifest, args.out, time.perf_counter() - t0)
    return 0


def print_summary(result, manifest: dict | None, out: Path, seconds: float) -> None:
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
    if manifest is not None:
        ann = manifest["ann"]
        rec = {k: v for k, v in ann.items() if k.startswith("recall@")}
        print(f"export       {out / 'export'}  ({ann['kind']} index over {ann['items']} items, {rec})")
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
