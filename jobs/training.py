"""What `cascade train-retriever` and `cascade train-ranker` share: their flags, config layering and launch.

Both jobs take the same flags::

    --features DIR        features directory (`cascade build-features`); a versioned root is pinned for the run
    --config FILE         YAML config; repeat to layer (dataset file, then an ablation): later files win
    --out DIR             run directory: checkpoints, metrics, summary, export/
    --world-size N        local loopback ranks (gloo); ignored under torchrun, which sets the world itself
    --resume              continue from OUT/checkpoints/last
    --no-export           skip the unsharded export at the end
    --quiet               no progress bars
    key.sub=value ...     config overrides, applied after the files

and launch the same way (`run_ranks`): under torchrun (or a PyTorchJob) this process is one
rank of the world the launcher set up; otherwise the job spawns `--world-size` loopback ranks
(`features.train.launch.run_distributed`). Either way rank 0 pins the features once for the whole
run (`features.versions.pin_on_rank0`) and every rank gets the pinned path.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

if TYPE_CHECKING:
    from features.train.launch import TorchrunEnv

R = TypeVar("R")
T = TypeVar("T")
log = logging.getLogger("cascade.training")


def add_arguments(p: argparse.ArgumentParser, *, features_required: bool, features_help: str) -> None:
    """The training jobs' flags (module docstring)."""
    p.add_argument("--features", type=Path, required=features_required, default=None, help=features_help)
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="YAML config; repeat to layer (dataset file, then an ablation file): later files win")
    p.add_argument("--out", required=True, type=Path, help="run directory: checkpoints, metrics, export")
    p.add_argument("--world-size", type=int, default=1,
                   help="local loopback ranks, sharded training over gloo (ignored under torchrun, which sets the "
                        "world itself)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    p.add_argument("--no-export", action="store_true", help="skip the unsharded export at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=3")


def load_layered(cls: type[T], paths: Sequence[Path | str], overrides: Sequence[str]) -> T:
    """defaults <- each YAML file in order <- `key.sub=value` overrides, validated into `cls`."""
    from features.config import load_config

    cfg = None
    for path in paths:
        cfg = load_config(cls, path, base=cfg)
    return load_config(cls, None, list(overrides), base=cfg)


def quiet_fbgemm() -> None:
    """FBGEMM logs every table's full argument list on the root logger at INFO; keep the job's log readable."""
    class _NoTBE(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("[TBE=")
    for h in logging.getLogger().handlers:
        h.addFilter(_NoTBE())
    for name in ("torchrec", "torch.distributed", "c10d-NullHandler-dcp_logger", "MethodLogger-NullHandler"):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_rank(rank: int) -> None:
    """Logging of one training rank (a spawned rank starts with none): INFO on rank 0, warnings elsewhere."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_fbgemm()


def write_run_config(out: Path, cfg: Any) -> None:
    """OUT/config.yaml: the config the run trains with (rank 0); its path logged (the whole text at DEBUG)."""
    from features.config import dump_config

    text = dump_config(cfg)
    (Path(out) / "config.yaml").write_text(text)
    log.info("config: %s", Path(out) / "config.yaml")
    log.debug("config:\n%s", text)


def run_ranks(held: contextlib.ExitStack, job: str, features: str | Path, out: Path, resume: bool, world_size: int,
              launcher: TorchrunEnv | None, fn: Callable[..., R], *args: Any,
              threads_per_rank: int = 0) -> tuple[R | None, str]:
    """Runs ``fn(rank, world_size, features, *args)`` on every rank of the run; returns (rank 0's result, or None
    on the other ranks of a torchrun world; the pinned features path, held pinned until `held` closes).

    launcher: the torchrun world this process is a rank of (`TorchrunEnv.parse(os.environ)`, read by the job);
    None: `world_size` loopback ranks (world size 1 runs in this process). `fn` must be a module-level function.
    """
    from features.train.launch import init_from_torchrun_env, run_distributed
    from features.versions import pin_on_rank0

    if launcher is None:
        pinned = pin_on_rank0(held, features, job, 0, out, resume)
        return run_distributed(fn, world_size, pinned, *args, threads_per_rank=threads_per_rank)[0], pinned
    import torch.distributed as dist

    # the training loops run on CPU tensors, so gloo even where CUDA is present (NCCL needs CUDA tensors)
    init_from_torchrun_env("gloo", launcher)
    try:
        pinned = pin_on_rank0(held, features, job, launcher.rank, out, resume)
        result = fn(launcher.rank, launcher.world_size, pinned, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return (result if launcher.rank == 0 else None), pinned
