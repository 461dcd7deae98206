"""Process launch for distributed training: loopback processes locally, torchrun on a cluster.

* `run_distributed`: `torch.multiprocessing.spawn` with a `file://` rendezvous
  and gloo bound to the loopback interface (STACK.md), for local runs and tests.
* `TorchrunEnv` + `init_from_torchrun_env`: what a job does when torchrun (or
  the Kubeflow training operator's PyTorchJob) started it; rank, world size and
  the master address come from the launcher, and the process group is built on
  them. The training function is the same either way: fn(rank, world_size, *args).

torchrun's stores (the c10d rendezvous store and the one it shares with the
ranks) listen on every interface. On a cluster that is what is wanted; on one
machine (the two-"node" test), `bound_tcp_store` hosts the rendezvous store on
loopback (torchrun ``--rdzv-conf is_host=false`` on every launcher), and with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --local-addr 127.0.0.1`` rank 0
hosts the ranks' store itself, bound to the loopback master address::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 GLOO_SOCKET_IFNAME=lo torchrun --nnodes 2 --nproc-per-node 1 \
        --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400 --rdzv-id r1 --rdzv-conf is_host=false \
        --local-addr 127.0.0.1 -m jobs.train_ranker ...        # (once per "node")
"""
from __future__ import annotations

import ipaddress
import logging
import os
import pickle
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

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


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun (or a PyTorchJob) gives each process: its rank, the world, and where rank 0's store is.

    `agent_store`: torchrun's launcher hosts the store the ranks join (its default);
    otherwise rank 0 hosts it at master_addr:master_port.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool

    @staticmethod
    def parse(environ: Mapping[str, str]) -> "TorchrunEnv | None":
        """The launcher's variables from `environ` (a job passes os.environ); None when no launcher set them."""
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            return None
        try:
            env = TorchrunEnv(
                rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                local_rank=int(environ.get("LOCAL_RANK", "0")), master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(environ.get("MASTER_PORT", "29500")),
                agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            )
        except ValueError as e:
            keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
            raise ValueError(f"torchrun environment: {e} ({', '.join(f'{k}={environ.get(k)!r}' for k in keys)})") from None
        if not 0 <= env.rank < env.world_size:
            raise ValueError(f"torchrun environment: RANK={env.rank} is not in [0, WORLD_SIZE={env.world_size})")
        return env


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def bound_tcp_store(host: str, port: int, world_size: int | None = None,
                    timeout: timedelta = timedelta(minutes=5)) -> dist.TCPStore:
    """A TCPStore server listening on `host` only (torch's own listens on every interface).

    The socket is bound here and handed to the store (``master_listen_fd``); port 0
    picks a free one (`store.port`).
    """
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128)
    bound = sock.getsockname()[1]
    return dist.TCPStore(host, bound, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())  # the store owns the descriptor now


def init_from_torchrun_env(backend: str, env: TorchrunEnv, timeout: timedelta = timedelta(minutes=10)) -> None:
    """Joins the process group of the world torchrun set up.

    A loopback master address whose store rank 0 hosts (no shared launcher store)
    gets a store bound to that address, and gloo on the loopback interface, so
    nothing listens beyond loopback; otherwise torch's ``env://`` rendezvous.
    """
    if dist.is_initialized():
        return
    if env.agent_store or not _is_loopback(env.master_addr):
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # as in `_init`: a local world stays on loopback
    if env.rank == 0:
        store = bound_tcp_store(env.master_addr, env.master_port, env.world_size, timeout)
    else:
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
