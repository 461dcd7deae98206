"""The training-loop skeleton both trainers use (features/train/loop.py, `replace_checkpoint`): lock-step
iteration and collectives on a real 2-rank gloo group, the checkpoint swap, model selection, batch counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from features.train.checkpoint import load_checkpoint, replace_checkpoint
from features.train.launch import run_distributed
from features.train.loop import (
    aligned, all_reduce_float, all_reduce_sums, broadcast_flag, gather_arrays, improves, reader_batches_per_rank,
    scheduled_lr, should_stop_early, split_metrics,
)


def _collectives(rank: int, world: int) -> dict:
    items = ["a", "b", "c"][: 3 - rank]  # rank 0: 3 items, rank 1: 2
    return {
        "aligned": list(aligned(items)),
        "max": all_reduce_float(float(len(items)), dist.ReduceOp.MAX),
        "sums": all_reduce_sums([1.0, rank + 0.5]),
        "flag": broadcast_flag(rank == 0),
        "gathered": gather_arrays({"x": np.full(rank + 1, rank)})["x"].tolist(),
    }


def test_ranks_step_in_lock_step_and_reduce_together():
    r0, r1 = run_distributed(_collectives, 2)
    assert r0["aligned"] == [("a", True), ("b", True), ("c", True)]
    assert r1["aligned"] == [("a", True), ("b", True), ("b", False)]  # the short rank repeats its last, as padding
    assert r0["max"] == r1["max"] == 3.0
    assert r0["sums"] == r1["sums"] == [2.0, 2.0]
    assert r0["flag"] is r1["flag"] is True  # rank 0's decision on every rank
    assert r0["gathered"] == r1["gathered"] == [0, 1, 1]


def test_without_a_process_group_the_collectives_are_the_identity():
    assert list(aligned([1, 2])) == [(1, True), (2, True)]
    assert all_reduce_float(2.5, dist.ReduceOp.SUM) == 2.5 and all_reduce_sums([1, 2]) == [1.0, 2.0]
    assert broadcast_flag(False) is False


def _swap(rank: int, world: int, root: str) -> dict:
    from pathlib import Path

    path = Path(root) / "last"
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    replace_checkpoint(path, model, None, {"epoch": 1})
    (path.with_name("last.tmp")).mkdir()  # what a crash in the middle of the next save leaves behind
    with torch.no_grad():
        model.weight.fill_(2.0)
    replace_checkpoint(path, model, None, {"epoch": 2})
    with torch.no_grad():
        model.weight.zero_()
    state = load_checkpoint(path, model, None, restore_rng=False)
    return {"epoch": int(state["epoch"]), "weight": model.weight.detach().tolist(),
            "left": sorted(p.name for p in Path(root).iterdir())}


def test_a_checkpoint_is_written_beside_and_swapped_in(tmp_path):
    res = run_distributed(_swap, 1, str(tmp_path))[0]
    assert res == {"epoch": 2, "weight": [[2.0, 2.0]], "left": ["last"]}  # the stale .tmp is gone


def test_logloss_improves_downwards_and_nan_never_wins():
    assert improves("auc", 0.7, 0.6) and not improves("auc", 0.6, 0.6)
    assert improves("logloss", 0.4, 0.5) and not improves("logloss", 0.5, 0.4)
    assert improves("ndcg@10", 0.1, None) and improves("auc", 0.5, math.nan)
    assert not improves("auc", math.nan, None) and not improves("ndcg@10", math.nan, -math.inf)


def test_split_metrics_takes_one_splits_entries_of_an_epoch_record():
    rec = {"epoch": 3, "loss": 0.2, "valid_auc": 0.7, "valid_hr@10": 0.1, "test_auc": 0.69}
    assert split_metrics(rec, "valid") == {"auc": 0.7, "hr@10": 0.1} and split_metrics(rec, "test") == {"auc": 0.69}


@pytest.mark.parametrize("rows, batch, world, want", [(10, 4, 1, 3), (10, 4, 2, 1), (7, 4, 2, 0), (16, 4, 2, 2)])
def test_reader_batches_per_rank_keeps_the_partial_batch_only_at_world_size_one(rows, batch, world, want):
    assert reader_batches_per_rank(rows, batch, world) == want


def _hist(scores: list[float | None]) -> list[dict]:
    return [{"epoch": i + 1, **({"valid_ndcg@10": s} if s is not None else {})} for i, s in enumerate(scores)]


def test_early_stopping_waits_patience_evaluations_after_the_best():
    assert not should_stop_early(_hist([0.1, 0.2, 0.19, 0.18]), "ndcg@10", 3)
    assert should_stop_early(_hist([0.1, 0.2, 0.19, 0.18, 0.2]), "ndcg@10", 3)  # a tie is no improvement
    assert not should_stop_early(_hist([0.1, 0.2, 0.19, 0.18, 0.21]), "ndcg@10", 3)
    assert not should_stop_early(_hist([0.3, 0.1, 0.1, 0.1]), "ndcg@10", 0)  # 0: never
    # epochs without an evaluation do not count
    assert not should_stop_early(_hist([0.2, None, 0.1, None, 0.1]), "ndcg@10", 3)
    assert should_stop_early(_hist([0.2, None, 0.1, None, 0.1, 0.1]), "ndcg@10", 3)
    # lower-is-better metrics stop when the loss stops falling
    logloss = [{"epoch": i + 1, "valid_logloss": s} for i, s in enumerate([0.5, 0.4, 0.45, 0.41])]
    assert should_stop_early(logloss, "logloss", 2) and not should_stop_early(logloss[:3] + [
        {"epoch": 4, "valid_logloss": 0.39}], "logloss", 2)


def test_scheduled_lr_warms_up_then_holds_or_follows_the_cosine_to_its_floor():
    assert scheduled_lr(0.01, 0, 100, warmup_steps=10) == pytest.approx(0.001)
    assert scheduled_lr(0.01, 9, 100, warmup_steps=10) == scheduled_lr(0.01, 99, 100, warmup_steps=10) == 0.01
    cos = dict(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert scheduled_lr(0.01, 10, 110, **cos) == pytest.approx(0.01)
    assert scheduled_lr(0.01, 60, 110, **cos) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
    assert scheduled_lr(0.01, 110, 110, **cos) == scheduled_lr(0.01, 500, 110, **cos) == pytest.approx(0.001)
    assert all(scheduled_lr(0.01, s, 110, **cos) >= scheduled_lr(0.01, s + 1, 110, **cos) for s in range(10, 110))
    # a spent time budget takes the cosine to its floor before the steps do
    assert scheduled_lr(0.01, 20, 110, budget_spent=1.0, **cos) == pytest.approx(0.001)
    # no warmup, cosine over the whole run
    assert scheduled_lr(0.01, 0, 4, schedule="cosine") == pytest.approx(0.01)


def test_scheduled_lr_names_an_unknown_schedule():
    with pytest.raises(ValueError, match="'linear'"):
        scheduled_lr(0.01, 0, 10, schedule="linear")
