"""The retriever's training loop: sharded two-tower training, leave-one-out model selection, DCP checkpoints.

`train_retriever(rank, world_size, cfg, data, out_dir)` is one rank's work; the
same function runs at world size 1 in-process, on loopback workers
(`features.train.launch.run_distributed`) and under torchrun. Per epoch: one
pass over every user's training prefix (every position is a next-item sample),
then the valid metrics (full ranking, history masked); the best epoch by
`train.select_metric` is kept as the `best` checkpoint, training stops after
`train.patience` evaluations without improvement or when `train.max_minutes`
is spent, and the best checkpoint is evaluated on `test`. The skeleton it
shares with the ranker's loop (data contract, result fields, lock-step
collectives, the checkpoint swap) is `features.train.loop`.

Output directory::

    OUT/checkpoints/best/, last/   DCP checkpoints (model + optimizers + loop state), reshardable
    OUT/metrics.json, curves.png   per-epoch loss, throughput and valid metrics (rank 0)
    OUT/summary.json               test metrics of the best epoch, timings, sharding plan
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from features.batch import Batch
from features.config import to_dict
from features.train.checkpoint import load_checkpoint, replace_checkpoint
from features.train.loop import (TrainData, TrainResult, aligned, all_reduce_sums, broadcast_flag, improves,
                                 scheduled_lr, set_lr, should_stop_early, split_metrics)
from features.train.report import MetricsLog, write_convergence
from features.train.sharding import describe_plan, dense_optimizer, make_optimizer, shard_model, table_optimizer
from retrieval.catalog import Catalog, validate_catalog
from retrieval.config import RetrieverConfig, TrainConfig
from retrieval.evaluate import EvalBatch, evaluate
from retrieval.model import TwoTowerRetriever, id_hash_features
from retrieval.task import CandidateSampler, RetrievalTask, item_keys
from kernels import bucketize

log = logging.getLogger(__name__)

PLOT_KEYS = ("loss", "valid_hr@10", "valid_ndcg@10", "valid_recall@500", "rows_per_s", "temperature")


class RetrievalData(TrainData, Protocol):
    """What the training loop reads (features.reader's FeatureStore through retrieval.data):
    `features.train.loop.TrainData` (training batches: every training user once per epoch; evaluation
    batches: `EvalBatch`es) and the catalog."""

    catalog: Catalog

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[EvalBatch]:
        ...


@dataclass(kw_only=True)
class RetrieverTrainResult(TrainResult):
    """`TrainResult` (stopped: "epochs", "patience" or "time budget"; wall_seconds: training, evaluation and
    checkpoints) and the retriever's own fields."""

    train_cpu_seconds: float  # CPU time of the training steps, all threads of all ranks (contention-independent)
    collisions: dict[str, int]
    loop_seconds: float = 0.0  # the training loop (steps + valid evaluations + checkpoints): the budget's clock
    budget_minutes: float = 0.0  # train.max_minutes (0: none)
    best_minutes: float = 0.0  # loop minutes when the best epoch ended


def _rank0(rank: int) -> bool:
    return rank == 0


def id_collisions(catalog: Catalog, num_hashes: int, buckets: int) -> dict[str, int]:
    """How many catalog items share id-table rows with another item (per hash, and all hashes at once)."""
    ids = catalog.ids
    rows = torch.stack([bucketize(ids, f, buckets) for f in id_hash_features(num_hashes)], dim=1)  # (N, H)
    out: dict[str, int] = {"items": len(catalog), "buckets": buckets, "hashes": num_hashes}
    for h in range(num_hashes):
        _, inv, counts = torch.unique(rows[:, h], return_inverse=True, return_counts=True)
        out[f"items_sharing_row_hash{h}"] = int((counts[inv] > 1).sum())
    _, inv, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    out["items_sharing_all_rows"] = int((counts[inv] > 1).sum())
    return out


def train_retriever(
    rank: int, world_size: int, cfg: RetrieverConfig, data: RetrievalData, out_dir: Path,
    resume: bool = False, progress: bool = True,
) -> RetrieverTrainResult:
    """One rank of a training run (see the module docstring). Needs torch.distributed initialized."""
    t_wall = time.perf_counter()
    tc = cfg.train
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    catalog = validate_catalog(data.catalog)
    keys = item_keys(cfg.model)
    torch.manual_seed(tc.seed)  # identical dense init on every rank

    dmp, opt, sampler = build_training(cfg, catalog)
    dense_opt = dense_optimizer(opt)
    table_opt = table_optimizer(opt)
    dense_params = [p for g in dense_opt.param_groups for p in g["params"]] if dense_opt is not None else []
    core: RetrievalTask = _unwrap(dmp)
    plan = describe_plan(dmp)
    collisions = id_collisions(catalog, cfg.model.item.id_hashes, cfg.model.item.id_buckets)
    torch.manual_seed(tc.seed * 7 + 1 + rank)  # per-rank dropout streams

    state: dict[str, Any] = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": -1, "bad_evals": 0,
                             "train_seconds": 0.0, "train_cpu_seconds": 0.0, "loop_seconds": 0.0, "history": "[]"}
    if resume and (ckpt_dir / "last" / ".metadata").exists():
        state.update(load_checkpoint(ckpt_dir / "last", dmp, opt))
        log.info("resumed from %s at epoch %d (step %d)", ckpt_dir / "last", state["epoch"], state["step"])
    history: list[dict[str, Any]] = json.loads(state["history"])
    mlog = MetricsLog(out_dir, "retriever", PLOT_KEYS, history) if _rank0(rank) else None
    if mlog is not None:
        log.info("sharding plan: %s", plan)
        log.info("id hash collisions: %s", collisions)

    n_batches = data.num_train_batches(rank, world_size)
    budget_s = 60.0 * tc.max_minutes
    stopped = "epochs"
    for epoch in range(int(state["epoch"]), tc.epochs):
        dmp.train()
        t0, c0 = time.perf_counter(), time.process_time()
        loop_s0 = float(state["loop_seconds"])
        loss_sum, rows, steps = torch.zeros(()), 0, 0
        bar = tqdm(aligned(data.train_batches(epoch, rank, world_size)), total=n_batches, unit="step",
                   desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not (progress and _rank0(rank)), leave=False)
        for batch, real in bar:
            validate_train_batch(batch, cfg.model.user.max_len)
            step = int(state["step"])
            if dense_opt is not None:
                spent = (loop_s0 + time.perf_counter() - t0) / budget_s if tc.lr_horizon == "budget" else 0.0
                lr = dense_lr(tc, step, tc.epochs * n_batches, spent)
                set_lr(dense_opt, lr)
                if table_opt is not None:  # Adam on the tables: the same warmup and decay, at the table's rate
                    set_lr(table_opt, tc.sharding.embedding_lr * lr / tc.lr)
            cands = sampler(batch, step, rank)
            out = dmp(batch, cands)  # the task autocasts the towers when train.bf16; the loss is float32
            loss = out.loss if real else out.loss * 0.0
            opt.zero_grad()
            loss.backward()
            if tc.grad_clip > 0 and dense_params:
                torch.nn.utils.clip_grad_norm_(dense_params, tc.grad_clip)
            opt.step()
            state["step"] = step + 1
            if real:
                loss_sum += out.loss.detach()
                rows += int(out.rows)
                steps += 1
                if steps % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss_sum) / steps:.4f}")
        epoch_s = time.perf_counter() - t0
        state["train_seconds"] = float(state["train_seconds"]) + epoch_s
        totals = all_reduce_sums([float(loss_sum), float(steps), float(rows), time.process_time() - c0])
        record: dict[str, Any] = {
            "epoch": epoch + 1, "loss": float(totals[0] / max(totals[1], 1)), "rows": int(totals[2]),
            "lr": float(dense_opt.param_groups[0]["lr"]) if dense_opt is not None else tc.lr,
            "epoch_seconds": round(epoch_s, 2), "rows_per_s": round(float(totals[2]) / epoch_s, 1),
            "temperature": float(core.temperature()), "train_seconds": round(float(state["train_seconds"]), 1),
            "epoch_cpu_seconds": round(float(totals[3]), 1),
        }
        state["train_cpu_seconds"] = float(state["train_cpu_seconds"]) + float(totals[3])
        improved = False
        last_epoch = epoch + 1 == tc.epochs
        if (epoch + 1) % tc.eval_every == 0 or last_epoch:
            te = time.perf_counter()
            valid = evaluate(core.model, catalog, keys, data.eval_batches("valid", rank, world_size), cfg.eval,
                             desc="valid", progress=progress and _rank0(rank))
            record.update({f"valid_{k}": v for k, v in valid.items() if k != "n"})
            record["eval_seconds"] = round(time.perf_counter() - te, 2)
            score = valid[tc.select_metric]
            if improves(tc.select_metric, score, float(state["best"])):
                state.update(best=score, best_epoch=epoch + 1, bad_evals=0)
                improved = True
            else:
                state["bad_evals"] = int(state["bad_evals"]) + 1
        epoch_loop_s = time.perf_counter() - t0  # steps + evaluation
        state["loop_seconds"] = loop_s0 + epoch_loop_s
        record["minutes"] = round(float(state["loop_seconds"]) / 60.0, 3)  # the budget's clock, for the curves
        history.append(record)
        state["epoch"] = epoch + 1
        state["history"] = json.dumps(history)
        if mlog is not None:
            mlog.append(record)
            log.info("epoch %d: %s", epoch + 1, _fmt(record))
        if improved:
            replace_checkpoint(ckpt_dir / "best", dmp, opt, dict(state))
        out_of_time = budget_s > 0 and float(state["loop_seconds"]) + epoch_loop_s > budget_s
        patience_hit = should_stop_early(history, tc.select_metric, tc.patience)
        stop = broadcast_flag(out_of_time or patience_hit)
        if stop or last_epoch or (epoch + 1) % tc.checkpoint_every == 0:
            replace_checkpoint(ckpt_dir / "last", dmp, opt, dict(state))
        if stop:
            stopped = "patience" if patience_hit else "time budget"
            break
        state["loop_seconds"] = float(state["loop_seconds"]) + (time.perf_counter() - t0 - epoch_loop_s)  # checkpoints

    if (ckpt_dir / "best" / ".metadata").exists():
        load_checkpoint(ckpt_dir / "best", dmp, None, restore_rng=False)
    test = evaluate(core.model, catalog, keys, data.eval_batches("test", rank, world_size), cfg.eval,
                    desc="test", progress=progress and _rank0(rank))
    best_valid = next((r for r in history if r["epoch"] == state["best_epoch"]), {})
    result = RetrieverTrainResult(
        best_epoch=int(state["best_epoch"]), best_valid=split_metrics(best_valid, "valid"),
        test=test, epochs_run=int(state["epoch"]), stopped=stopped,
        train_seconds=round(float(state["train_seconds"]), 1),
        train_cpu_seconds=round(float(state["train_cpu_seconds"]), 1),
        wall_seconds=round(time.perf_counter() - t_wall, 1),
        plan=plan, collisions=collisions, history=history,
        loop_seconds=round(float(state["loop_seconds"]), 1), budget_minutes=tc.max_minutes,
        best_minutes=float(best_valid.get("minutes", 0.0)),
    )
    if _rank0(rank):
        (out_dir / "summary.json").write_text(json.dumps({**asdict(result), "config": to_dict(cfg)}, indent=2) + "\n")
        write_convergence(out_dir, history, f"valid_{tc.select_metric}", title=f"retriever: valid {tc.select_metric}",
                          extra={"best_epoch": result.best_epoch, "best_minutes": result.best_minutes,
                                 "stopped": stopped, "budget_minutes": tc.max_minutes})
    return result


def build_training(cfg: RetrieverConfig, catalog: Catalog) -> tuple[Any, CombinedOptimizer, CandidateSampler]:
    """The sharded train task (DistributedModelParallel), its optimizer and the candidate sampler."""
    tc = cfg.train
    task = RetrievalTask(TwoTowerRetriever(cfg.model, "meta"), cfg.loss, bf16=tc.bf16)
    dmp = shard_model(task, tc.sharding, torch.device("cpu"))
    opt = make_optimizer(dmp, dense_lr=tc.lr, weight_decay=tc.weight_decay, sharding=tc.sharding)
    return dmp, opt, CandidateSampler(cfg.loss, catalog, item_keys(cfg.model), seed=tc.seed)


def train_on_features(
    rank: int, world_size: int, cfg: RetrieverConfig, features: Path, out_dir: Path, resume: bool = False,
    progress: bool = True,
) -> RetrieverTrainResult:
    """`train_retriever` on a features directory read by the shared reader; a module-level function, so
    `run_distributed` can start it on spawned ranks."""
    from retrieval.data import open_data

    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return train_retriever(rank, world_size, cfg, open_data(Path(features), cfg), out_dir, resume=resume,
                               progress=progress)
    finally:
        torch.set_num_threads(threads)


def dense_lr(tc: TrainConfig, step: int, total_steps: int, budget_spent: float = 0.0) -> float:
    """The dense rate at `step` (`features.train.loop.scheduled_lr` with the retriever's train config);
    `budget_spent` is the fraction of train.max_minutes used, with lr_horizon=budget."""
    return scheduled_lr(tc.lr, step, total_steps, warmup_steps=tc.warmup_steps, schedule=tc.lr_schedule,
                        min_lr_ratio=tc.min_lr_ratio, budget_spent=budget_spent)


def validate_train_batch(batch: Batch, max_len: int) -> None:
    """What the retriever needs beyond the reader's `validate_batch`: every history position paired with its
    next item (every-prefix samples), histories within the model's max_len, the positives' logq."""
    hl = batch.history_lengths()
    if hl.numel() and int(hl.max()) > max_len:
        row = int(hl.argmax())
        raise ValueError(f"training batch: user row {row} has {int(hl[row])} history positions, the model's "
                         f"max_len is {max_len} (read the batches with the same max_len)")
    if not torch.equal(hl, batch.num_candidates.to(hl.dtype)):
        row = int((hl != batch.num_candidates).nonzero()[0])
        raise ValueError(f"training batch: user row {row} has {int(hl[row])} history positions but "
                         f"{int(batch.num_candidates[row])} candidates (expected one next item per position)")
    if batch.candidate_dense.shape[1] < 1:
        raise ValueError("training batch: candidate_dense must hold the positives' logq in column 0")


def _unwrap(dmp: Any) -> RetrievalTask:
    m = dmp.module
    while not isinstance(m, RetrievalTask):
        m = m.module
    return m


def _fmt(record: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "epoch")
