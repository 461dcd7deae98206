"""Process launch for distributed training, loopback-only for local runs and tests.

`torchrun` opens its rendezvous store on all interfaces, so local runs and the
tests use `run_distributed`: `torch.multiprocessing.spawn` with a `file://`
rendezvous and gloo bound to the loopback interface (STACK.md). On a cluster,
jobs are launched by torchrun and call `init_from_torchrun_env` instead; the
training function is the same either way: fn(rank, world_size, *args).
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

R = TypeVar("R")
log = logging.getLogger(__name__)


def _init(rank: int, world_size: int, init_file: str, backend: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo picks an interface to connect over; keep it on loopback
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def _worker(rank: int, fn: Callable[..., Any], world_size: int, init_file: str, out_dir: str, backend: str,
            threads: int, args: tuple) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    _init(rank, world_size, init_file, backend)
    try:
        result = fn(rank, world_size, *args)
        with open(Path(out_dir) / f"result-{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., R], world_size: int, *args: Any, backend: str = "gloo", threads_per_rank: int = 0,
    max_restarts: int = 1,
) -> list[R]:
    """Runs fn(rank, world_size, *args) on `world_size` loopback processes; returns each rank's result.

    world_size == 1 runs in this process (with a one-rank process group, so the
    same sharded code path is exercised). `fn` and its results must be picklable
    for world_size > 1 (a module-level function).

    Like torchrun's ``--max-restarts``, a group whose rank was killed by a signal
    (not a Python exception, which is raised at once) is restarted from the
    beginning up to `max_restarts` times, with a warning naming the signal: we have
    seen a rare SIGABRT ("terminate called without an active exception") in a
    gloo rank on this 2-core CPU machine that does not reproduce on a rerun.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="cascade-dist-") as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        if world_size == 1:
            if dist.is_initialized():
                return [fn(0, 1, *args)]
            _init(0, 1, init_file, backend)
            try:
                return [fn(0, 1, *args)]
            finally:
                dist.destroy_process_group()
        if threads_per_rank <= 0:
            threads_per_rank = max(1, torch.get_num_threads() // world_size)
        for attempt in range(max_restarts + 1):
            init_file = str(Path(tmp) / f"rendezvous-{attempt}")
            try:
                mp.spawn(_worker, args=(fn, world_size, init_file, tmp, backend, threads_per_rank, args),
                         nprocs=world_size, join=True)
                break
            except mp.ProcessExitedException as e:
                if not e.signal_name or attempt == max_restarts:
                    raise
                log.warning("rank %d of %d was killed by %s; restarting the group (%d of %d restarts)",
                            e.error_index, world_size, e.signal_name, attempt + 1, max_restarts)
        results = []
        for r in range(world_size):
            with open(Path(tmp) / f"result-{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


def init_from_torchrun_env(backend: str, rank: int, world_size: int) -> None:
    """Joins the process group torchrun set up (MASTER_ADDR/PORT in the environment)."""
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
