"""The training-loop skeleton the retriever and the ranker share: the data contract, the result, the collectives.

Both loops (`retrieval.train.train_retriever`, `ranking.train.train_ranker`) are one
rank's work in a gloo process group of sharded embeddings, so every rank must take
the same number of collective steps. What they have in common lives here, once:

* `TrainData`: what a loop reads — the training split once per epoch, each rank its
  share (`train_batches`, `num_train_batches(rank, world_size)`), and an evaluation
  split dealt to the ranks (`eval_batches`); `reader_batches_per_rank` is that count
  for the feature reader's rank shards;
* `TrainResult`: the fields every run reports (best epoch, its valid metrics, the
  test metrics, why it stopped, timings, the sharding plan, the per-epoch history);
  each model extends it with its own;
* lock-step iteration (`aligned`) and the small collectives (`all_reduce_float`,
  `all_reduce_sums`, `broadcast_flag`, `gather_arrays`), which are no-ops at world
  size 1 and without a process group;
* model selection on valid (`improves`, `split_metrics`);
* the dense learning-rate schedule (`scheduled_lr`: linear warmup, then constant or cosine; `set_lr` applies it).

The checkpoint swap (write beside, then rename) is `features.train.checkpoint.replace_checkpoint`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from features.batch import Batch

T = TypeVar("T")

LOWER_IS_BETTER = frozenset({"logloss"})


class TrainData(Protocol):
    """What a training loop reads. Every rank calls each method with its own rank."""

    def train_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        """The training split once, shuffled by epoch; each rank its own share."""
        ...

    def num_train_batches(self, rank: int, world_size: int) -> int:
        """How many batches `train_batches(epoch, rank, world_size)` yields (the loop aligns the ranks on it)."""
        ...

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[Any]:
        """`split` ("valid" | "test") once, in a fixed order; each rank its own share."""
        ...


def reader_batches_per_rank(rows: int, batch_size: int, world_size: int) -> int:
    """Batches per rank of the feature reader's training shards (`features.reader.FeatureStore`): at world size 1
    every row (the last batch may be partial); with several ranks each its equal share of full batches."""
    if world_size == 1:
        return -(-rows // batch_size)
    return (rows // world_size) // batch_size


@dataclass(kw_only=True)
class TrainResult:
    """What every training run reports (rank 0 writes it to OUT/summary.json)."""

    best_epoch: int  # 1-based; the epoch whose valid `select_metric` was best
    best_valid: dict[str, float]  # its valid metrics
    test: dict[str, float]  # the test metrics of the best epoch
    epochs_run: int
    stopped: str  # why training stopped: "epochs", "patience", "time budget"
    train_seconds: float  # training steps only (wall clock)
    wall_seconds: float  # the whole run
    plan: dict[str, str]  # table -> sharding type (features.train.sharding.describe_plan)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    export_dir: str | None = None  # the unsharded export, when one was written


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_float(value: float, op: dist.ReduceOp) -> float:
    """`value` reduced over the ranks with `op` (MIN / MAX / SUM)."""
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """Element-wise sums over the ranks, in float64 (one collective for several totals)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(value: bool) -> bool:
    """Rank 0's `value` on every rank (a decision rank 0 takes for all, e.g. to stop)."""
    if not _distributed():
        return value
    t = torch.tensor([int(value)])
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's arrays, concatenated in rank order, on every rank."""
    if not _distributed():
        return arrays
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, arrays)
    return {k: np.concatenate([o[k] for o in out]) for k in arrays}


def aligned(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yields (item, real) until every rank is exhausted; one tiny all-reduce per step when distributed.

    Sharded embedding lookups are collectives, so a rank that runs out of items before the others
    keeps stepping: it repeats its last item with real=False (the caller zeroes the loss or drops
    the outputs).
    """
    distributed = _distributed()
    it = iter(items)
    last: T | None = None
    while True:
        item = next(it, None)
        if not distributed:
            if item is None:
                return
            yield item, True
            continue
        flag = torch.tensor([0 if item is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) == 0:
            return
        if item is None:
            if last is None:
                raise RuntimeError(f"rank {dist.get_rank()} has no batches while other ranks do; "
                                   "give every rank at least one (fewer users or lists than ranks?)")
            yield last, False
        else:
            last = item
            yield item, True


def improves(metric: str, new: float, best: float | None) -> bool:
    """Whether valid `metric` = `new` beats `best` (None or NaN: nothing yet); logloss is lower-is-better."""
    if best is None or math.isnan(best):
        return not math.isnan(new)
    return new < best if metric in LOWER_IS_BETTER else new > best


def should_stop_early(history: list[dict[str, Any]], metric: str, patience: int) -> bool:
    """True when none of the last `patience` evaluations of valid `metric` improves on the best one before them
    (`improves`: a tie is no improvement; logloss is lower-is-better).

    history: the per-epoch records (epochs without an evaluation have no `valid_<metric>`). patience 0: never.
    """
    if patience <= 0:
        return False
    scores = [r[f"valid_{metric}"] for r in history if f"valid_{metric}" in r]
    if len(scores) <= patience:
        return False
    best = None
    for s in scores[:-patience]:
        if improves(metric, s, best):
            best = s
    return not any(improves(metric, s, best) for s in scores[-patience:])


def split_metrics(record: dict[str, Any], split: str) -> dict[str, Any]:
    """The `<split>_<metric>` entries of an epoch record, without the prefix."""
    prefix = split + "_"
    return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}


def set_lr(optimizer: Any, lr: float) -> None:
    """Sets every param group of `optimizer` to `lr` (the step's `scheduled_lr`)."""
    for g in optimizer.param_groups:
        g["lr"] = lr


def scheduled_lr(base_lr: float, step: int, total_steps: int, *, warmup_steps: int = 0,
                 schedule: str = "constant", min_lr_ratio: float = 0.0, budget_spent: float = 0.0) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine down to `min_lr_ratio * base_lr` at the horizon.

    The cosine's progress is the larger of the steps' (step / total_steps) and `budget_spent` (the
    fraction of a time budget used), so the rate reaches its floor when either the steps or the
    budget run out, and stays there.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "constant" or total_steps <= warmup_steps:
        return base_lr * warm
    t = min(1.0, max(max(0, step - warmup_steps) / (total_steps - warmup_steps), budget_spent))
    return base_lr * warm * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
