"""Lock-step iteration for collective forwards: every rank takes the same number of steps.

Sharded embedding lookups are collectives, so a rank that runs out of
batches before the others must keep stepping: it repeats its last batch with
`real=False` (the caller zeroes the loss or drops the outputs).
"""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def aligned(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yields (item, real) until every rank is exhausted; one tiny all-reduce per step when distributed."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
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
                                   "give every rank at least one (fewer users than ranks?)")
            yield last, False
        else:
            last = item
            yield item, True
