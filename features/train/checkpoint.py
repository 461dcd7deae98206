"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, resumable.

A checkpoint directory holds the DCP files of the model and optimizer state
(sharded embedding tables are saved by their owners and resharded on load, so
a checkpoint written at world size 2 loads at world size 1 and vice versa)
plus `trainer-<rank>.pt` with the loop position and RNG states, loaded with
`weights_only=True` (never unrestricted pickle). `replace_checkpoint` writes one
beside its destination and swaps it in, the way the training loops keep `best/` and `last/`.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": json.dumps(random.getstate()[1]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))


def save_checkpoint(path: Path, model: nn.Module, optimizer: Any, trainer_state: dict[str, Any]) -> Path:
    """Collective: every rank calls it. trainer_state: epoch/step/metrics (tensors, numbers, strings)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=str(path))
    torch.save({**trainer_state, "rng": rng_state()}, path / f"trainer-{_rank()}.pt")
    if dist.is_initialized():
        dist.barrier()
    return path


def replace_checkpoint(path: Path, model: nn.Module, optimizer: Any, trainer_state: dict[str, Any]) -> Path:
    """`save_checkpoint` beside `path` (``<path>.tmp``), then swapped in: a crash never leaves a half-written one.

    Collective: every rank calls it. The previous checkpoint at `path` stays whole until the new one is
    complete on every rank; rank 0 does the removal and the rename.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()
    save_checkpoint(tmp, model, optimizer, trainer_state)
    if _rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    if dist.is_initialized():
        dist.barrier()
    return path


def _materialize_optimizer_state(optimizer: Any) -> None:
    """Dense optimizers create their state lazily; DCP loads in place, so create it first.

    A zero-gradient step (TorchRec's KeyedOptimizer.init_state) may move weights
    (weight decay), which is harmless: the model state is loaded afterwards.
    The fused embedding optimizer already has its state.
    """
    subs = [o for _, o in optimizer.optimizers] if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for o in subs:
        if isinstance(o, KeyedOptimizerWrapper):
            o.init_state()
            o.zero_grad(set_to_none=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Collective: loads model (and optimizer) state in place, resharding as needed; returns trainer_state."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a DCP checkpoint (no .metadata)")
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    # The loop position is global; RNG streams are per rank (a rank beyond the saved world reuses rank 0's).
    f = path / f"trainer-{_rank()}.pt"
    if not f.exists():
        f = path / "trainer-0.pt"
    trainer = torch.load(f, weights_only=True)
    rng = trainer.pop("rng")
    if restore_rng:
        set_rng_state(rng)
    return trainer
