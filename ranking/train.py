"""The ranker's training loop: sharded embeddings, per-epoch evaluation, DCP checkpoints, export.

`train_ranker(rank, world_size, cfg, data, out_dir)` is one rank's work; the
same function runs at world size 1 in-process, on loopback workers
(`features.train.launch.run_distributed`) and under torchrun
(jobs/train_ranker.py). Per epoch: one pass over the training split (each
rank its share), then AUC / GAUC / logloss on valid and test; the epoch with
the best valid `train.select_metric` is the `best` checkpoint and its test
metrics are the result (model selection on valid only). The best checkpoint
is gathered into an unsharded export (ranking.export) at the end. The
skeleton it shares with the retriever's loop (data contract, result fields,
lock-step collectives, the checkpoint swap) is `features.train.loop`.

Output directory::

    OUT/checkpoints/best/, last/   DCP checkpoints (model + fused/dense optimizers + loop state)
    OUT/metrics.json, curves.png   per-epoch loss, throughput and valid/test metrics (rank 0)
    OUT/summary.json               best epoch, its valid and test metrics, timings, sharding plan
    OUT/export/                    the unsharded inference export (config.json, weights.pt, manifest.json)
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from features.batch import Batch
from features.config import to_dict
from features.train.checkpoint import load_checkpoint, replace_checkpoint
from features.train.loop import (
    TrainData, TrainResult, aligned, all_reduce_float, gather_arrays, improves, scheduled_lr, set_lr, should_stop_early,
    split_metrics,
)
from features.train.metrics import topk_metrics
from features.train.report import MetricsLog
from features.train.sharding import dense_optimizer, describe_plan, make_optimizer, shard_model
from ranking.config import ModelConfig, RankerConfig
from ranking.export import export_from_checkpoint
from ranking.model import RankerModel
from ranking.task import RankerTrainTask, ranking_metrics

log = logging.getLogger(__name__)

PLOT_KEYS = ("loss", "contrastive", "valid_auc", "valid_gauc", "valid_logloss", "examples_per_s")


class RankingData(TrainData, Protocol):
    """What the loop reads (ranking.data: the shared feature reader, or batches in memory; ranking.lists:
    candidate lists): `features.train.loop.TrainData` of `Batch`es, and the dense widths."""

    user_dense_dim: int
    candidate_dense_dim: int

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[Batch]:
        ...


@dataclass(kw_only=True)
class RankerTrainResult(TrainResult):
    """`TrainResult` (stopped: "epochs" | "patience" | "time budget") and the ranker's own fields."""

    examples_per_s: float  # training examples per second over all ranks
    model: dict[str, Any]  # the resolved ModelConfig


def resolve_model_config(cfg: ModelConfig, data: RankingData) -> ModelConfig:
    """Fills the dense widths from the data; a width set in the config must match it."""
    out = cfg
    for name, got in (("user_dense_dim", data.user_dense_dim), ("candidate_dense_dim", data.candidate_dense_dim),
                      ("retrieval_products", getattr(data, "retrieval_products", 0)),
                      ("retrieval_similarity", getattr(data, "retrieval_similarity", 0))):
        want = getattr(cfg, name)
        if want >= 0 and want != got:
            raise ValueError(f"model.{name}={want} but the data has {got} columns (use -1 to take it from the data)")
        out = replace(out, **{name: got})
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: RankingData, split: str, rank: int, world_size: int) -> dict[str, float]:
    """Main-task AUC / GAUC / logloss of `model` (the sharded train task) on a split, over all ranks."""
    model.eval()
    probs, labels, users, ranks, longest = [], [], [], [], 0
    for batch, real in aligned(data.eval_batches(split, rank, world_size)):
        _, out = model(batch)
        if not real:
            continue
        probs.append(torch.sigmoid(out.logits[:, 0].float()).numpy())
        labels.append(batch.labels[:, 0].numpy())
        users.append(batch.user_ids()[batch.candidate_user_index()].numpy())
        ranks.append(list_ranks(out.logits[:, 0].float().numpy(), labels[-1], batch.num_candidates.numpy()))
        longest = max(longest, int(batch.num_candidates.max()) if batch.num_candidates.numel() else 0)
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    got = gather_arrays({"p": cat(probs, np.float32), "y": cat(labels, np.float32), "u": cat(users, np.int64),
                         "r": cat(ranks, np.float64), "longest": np.array([longest], np.int64)})
    if got["y"].size == 0:
        raise ValueError(f"the {split} split is empty")
    out = ranking_metrics(got["p"], got["y"], got["u"])
    if got["longest"].max() > 1:  # list metrics only where requests carry lists: with one candidate each they
        lm = topk_metrics(got["r"], ks=(10, 50), recall_ks=())  # would just restate the positive rate
        out.update({"hr@10": lm["hr@10"], "ndcg@10": lm["ndcg@10"], "hr@50": lm["hr@50"], "ndcg@50": lm["ndcg@50"]})
    return out


def list_ranks(scores: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) 0-based rank of each request's best-scored positive within its list; inf when it has none.

    scores, labels: (N,) grouped by request, `counts` (B,) candidates per request. A list without a positive
    is a request whose target the first stage did not retrieve: a miss at every cutoff. Ties count against
    the positive (a constant scorer ranks it last among equals, never first).
    """
    counts = np.asarray(counts, np.int64)
    out = np.full(len(counts), np.inf)
    nz = np.flatnonzero(counts > 0)
    if nz.size == 0:
        return out
    starts = (np.cumsum(counts) - counts)[nz]
    pos = labels > 0
    best = np.maximum.reduceat(np.where(pos, scores, -np.inf), starts)  # (B',) best positive per request
    req = np.repeat(np.arange(nz.size), counts[nz])
    above = np.add.reduceat((~pos & (scores >= best[req])).astype(np.int64), starts)
    has = np.logical_or.reduceat(pos, starts)
    out[nz] = np.where(has, above, np.inf)
    return out


def train_ranker(rank: int, world_size: int, cfg: RankerConfig, data: RankingData, out_dir: str | Path,
                 *, resume: bool = False, export: bool = True, progress: bool = True) -> RankerTrainResult:
    """One rank's training run (see the module docstring). Collective: every rank calls it."""
    t_wall = time.perf_counter()
    out = Path(out_dir)
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    model_cfg = resolve_model_config(cfg.model, data)
    device = torch.device("cpu")
    task = RankerTrainTask(RankerModel(model_cfg, embedding_device="meta"), cfg.loss)
    dmp = shard_model(task, tc.sharding, device)
    opt = make_optimizer(dmp, tc.dense_lr, tc.weight_decay, sharding=tc.sharding)
    dense_opt = dense_optimizer(opt)
    plan = describe_plan(dmp)
    torch.manual_seed(tc.seed + 1000 * rank)  # per-rank streams for the contrastive masks
    start_epoch, best_epoch, best_score = 0, -1, None
    history: list[dict[str, Any]] = []
    ckpt_best, ckpt_last = out / "checkpoints" / "best", out / "checkpoints" / "last"
    if resume and (ckpt_last / ".metadata").exists():
        state = load_checkpoint(ckpt_last, dmp, opt)
        start_epoch, best_epoch = int(state["epoch"]) + 1, int(state["best_epoch"])
        best_score = float(state["best_score"]) if best_epoch >= 0 else None
        history = json.loads(state["history"])
    metrics_log = MetricsLog(out, f"ranker: {model_cfg.sequence.long} long, {model_cfg.moe.num_experts} expert(s)",
                             PLOT_KEYS, history) if rank == 0 else None
    if metrics_log is not None:
        log.info("sharding plan: %s", plan)
    steps = int(all_reduce_float(float(data.num_train_batches(rank, world_size)), dist.ReduceOp.MIN))
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)
    if steps <= 0:
        raise ValueError("no training batches: the training split is empty (or smaller than one batch per rank)")
    train_seconds, examples_total, stopped = 0.0, 0.0, "epochs"
    deadline = t_wall + tc.max_minutes * 60 if tc.max_minutes else math.inf
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.epochs):
        dmp.train()
        t0 = time.perf_counter()
        loss_sum = cl_sum = 0.0
        n_examples = 0
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", disable=not (progress and rank == 0),
                   dynamic_ncols=True)
        it = data.train_batches(epoch, rank, world_size)
        for step in range(steps):
            batch = next(it)
            if dense_opt is not None:
                lr = scheduled_lr(tc.dense_lr, epoch * steps + step, tc.epochs * steps, warmup_steps=tc.warmup_steps,
                                  schedule=tc.lr_schedule, min_lr_ratio=tc.min_lr_ratio)
                set_lr(dense_opt, lr)
            loss, o = dmp(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(o.bce)
            cl_sum += float(o.contrastive)
            n_examples += batch.total_candidates
            bar.update(1)
            if (step + 1) % tc.log_every == 0:
                el = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / (step + 1):.4f}", ex_s=f"{n_examples * world_size / el:,.0f}")
                if all_reduce_float(float(time.perf_counter() > deadline), dist.ReduceOp.MAX) > 0:
                    stopped = "time budget"
                    break
        bar.close()
        done = step + 1
        ep_seconds = time.perf_counter() - t0
        train_seconds += ep_seconds
        ex = all_reduce_float(float(n_examples), dist.ReduceOp.SUM)
        examples_total += ex
        valid = evaluate(dmp, data, "valid", rank, world_size)
        test = evaluate(dmp, data, "test", rank, world_size)
        rec = {"epoch": epoch + 1, "steps": done, "loss": loss_sum / done, "contrastive": cl_sum / done,
               "examples_per_s": ex / ep_seconds, "epoch_seconds": ep_seconds,
               "lr": float(dense_opt.param_groups[0]["lr"]) if dense_opt is not None else tc.dense_lr,
               **{f"valid_{k}": v for k, v in valid.items()}, **{f"test_{k}": v for k, v in test.items()}}
        history.append(rec)
        if tc.select_metric not in valid:
            raise ValueError(f"train.select_metric={tc.select_metric} ranks candidate lists, but every request in "
                             f"{cfg.data.features_dir} carries one candidate: select on auc, gauc or logloss")
        improved = improves(tc.select_metric, valid[tc.select_metric], best_score)
        if improved:
            best_epoch, best_score = epoch, valid[tc.select_metric]
        state = {"epoch": epoch, "best_epoch": best_epoch, "best_score": best_score if best_score is not None else 0.0,
                 "history": json.dumps(history)}
        replace_checkpoint(ckpt_last, dmp, opt, state)
        if improved:
            replace_checkpoint(ckpt_best, dmp, opt, state)
        if metrics_log is not None:
            metrics_log.append(rec)
            log.info("epoch %d: loss %.4f  valid auc %.4f gauc %.4f logloss %.4f  test auc %.4f  %.0f ex/s%s",
                     epoch + 1, rec["loss"], valid["auc"], valid["gauc"], valid["logloss"], test["auc"],
                     rec["examples_per_s"], "  (best)" if improved else "")
        if stopped == "epochs" and should_stop_early(history, tc.select_metric, tc.patience):
            stopped = "patience"
        if stopped != "epochs":
            break
    if best_epoch < 0:
        raise RuntimeError("no epoch produced a finite valid metric")
    best = next(r for r in history if r["epoch"] == best_epoch + 1)
    export_dir = None
    if export:
        if rank == 0:
            meta = {"best_epoch": best_epoch + 1, "valid": split_metrics(best, "valid"), "plan": plan}
            export_dir = str(export_from_checkpoint(ckpt_best, model_cfg, out / "export", meta,
                                                    getattr(data, "context", None), getattr(data, "item_item", None),
                                                    getattr(data, "item_item_history", 0)))
        if dist.is_initialized():
            dist.barrier()
    result = RankerTrainResult(
        best_epoch=best_epoch + 1, best_valid=split_metrics(best, "valid"), test=split_metrics(best, "test"),
        epochs_run=len(history), stopped=stopped, train_seconds=train_seconds,
        examples_per_s=examples_total / train_seconds if train_seconds else 0.0,
        wall_seconds=time.perf_counter() - t_wall, plan=plan, model=to_dict(model_cfg), export_dir=export_dir,
        history=history,
    )
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(asdict(result), indent=2, default=float) + "\n")
    return result
