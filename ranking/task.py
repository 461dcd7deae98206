"""The train task: the model plus its losses, one module that DistributedModelParallel wraps.

    loss = sum_t w_t * BCE(logits_t, labels_t; sample weights)  +  lambda * InfoNCE(gate view 1, gate view 2)

or, with `loss.kind = listwise` (the second stage over the retriever's lists), the main task's term is

    - mean over requests r with a positive of  sum_{c in r} y_c / sum(y_r) * log softmax_{c' in r}(logit_c')_c

(softmax cross-entropy over each request's candidates; the other tasks keep BCE).

The contrastive term is AW-MoE's auxiliary loss (Gong et al. 2023): each
behavior of the short-term sequence is dropped with probability p, twice
independently, and the two views' gate outputs of the same sample are pulled
together against the other samples' (in-batch negatives, both directions,
cosine similarity / temperature; at most `contrastive_rows` random samples with
behaviors per batch). Users with few behaviors look like masked
users with many, so their gates learn to agree. Samples without behaviors have
nothing to mask and are left out; when fewer than two samples have behaviors
the loss is an exact zero that still backpropagates (zero-mean-safe: never a
NaN from a mean over nothing).

Offline metrics (AUC, GAUC, logloss) come from `features.train.metrics`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.batch import Batch
from features.train.metrics import ctr_metrics
from ranking.config import LossConfig
from ranking.model import RankerModel


class TrainOutput(NamedTuple):
    logits: torch.Tensor  # (N, T), detached
    bce: torch.Tensor  # scalar, detached: the supervised term (BCE, or the listwise CE + other tasks' BCE)
    contrastive: torch.Tensor  # scalar, detached (0 when off)


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 task_weights: torch.Tensor) -> torch.Tensor:
    """sum_t task_weights[t] * (sum_n w_n BCE_nt) / sum_n w_n; 0 for an empty batch."""
    per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (N, T)
    per_task = (per * weights[:, None]).sum(0) / weights.sum().clamp_min(1e-12)  # (T,)
    return (per_task * task_weights).sum()


def listwise_softmax_ce(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of each request's list: logits, labels (N,) grouped by `counts` (B,) in order.

    The labels of a request, normalised to sum 1, are its target distribution; requests without a positive
    carry no signal and are left out. Returns the mean over the requests that count (an exact,
    differentiable zero when none does).
    """
    b = counts.numel()
    zero = 0.0 * logits.sum()
    if b == 0 or logits.numel() == 0:
        return zero
    width = int(counts.max())
    req = torch.repeat_interleave(torch.arange(b, device=logits.device), counts)  # (N,)
    pos = torch.arange(logits.numel(), device=logits.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)  # (N,) position within the request
    padded = logits.new_full((b, width), float("-inf")).index_put((req, pos), logits.float())  # (B, C)
    target = labels.new_zeros(b, width).index_put((req, pos), labels.float().clamp_min(0))  # (B, C)
    mass = target.sum(1)  # (B,)
    ok = mass > 0
    if not bool(ok.any()):
        return zero
    logp = torch.log_softmax(padded[ok], dim=1)
    t = target[ok] / mass[ok, None]
    return -(torch.where(t > 0, t * logp, torch.zeros_like(logp))).sum(1).mean() + zero


def contrastive_gate_loss(z1: torch.Tensor, z2: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views' gate outputs (N, G) over the rows where `valid` (N,) is True.

    Returns an exact (differentiable) zero when fewer than two rows are valid.
    """
    zero = 0.0 * (z1.sum() + z2.sum())
    if int(valid.sum()) < 2:
        return zero
    a = F.normalize(z1[valid], dim=1)
    b = F.normalize(z2[valid], dim=1)
    sim = a @ b.T / temperature  # (V, V)
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) + zero


class RankerTrainTask(nn.Module):
    """forward(batch) -> (loss, TrainOutput). The module that is sharded and trained.

    Args:
        model: the RankerModel.
        cfg: loss weights, contrastive settings. The masks come from the global torch RNG
            (checkpoints save and restore it, so a resumed run draws the same masks).
    """

    def __init__(self, model: RankerModel, cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        t = len(model.cfg.heads.tasks)
        tw = torch.tensor(cfg.task_weights or (1.0,) * t, dtype=torch.float32)
        self.register_buffer("task_weights", tw, persistent=False)
        self.contrastive = cfg.contrastive_weight > 0 and model.moe.gated

    def forward(self, batch: Batch) -> tuple[torch.Tensor, TrainOutput]:
        f = self.model.encode(batch)
        out = self.model.score(f)
        t = out.logits.shape[1]
        if batch.labels.shape[1] < t:
            raise ValueError(f"the batch has {batch.labels.shape[1]} label column(s), the model has {t} task(s) "
                             f"{list(self.model.cfg.heads.tasks)}")
        if self.cfg.kind == "listwise":
            tw = self.task_weights
            bce = tw[0] * listwise_softmax_ce(out.logits[:, 0], batch.labels[:, 0], batch.num_candidates)
            if t > 1:
                bce = bce + weighted_bce(out.logits[:, 1:], batch.labels[:, 1:t], batch.weights, tw[1:])
        else:
            bce = weighted_bce(out.logits, batch.labels[:, :t], batch.weights, self.task_weights)
        loss = bce
        cl = torch.zeros((), device=bce.device)
        if self.contrastive and self.training and f.short is not None:
            s = f.short.keys.shape[0]
            p = self.cfg.mask_prob
            keep1 = torch.rand(s, device=bce.device) >= p
            keep2 = torch.rand(s, device=bce.device) >= p
            g1 = self.model.gate_logits(f, keep1)
            g2 = self.model.gate_logits(f, keep2)
            valid = f.short.lengths()[f.short.cand_user] > 0
            rows = torch.nonzero(valid).squeeze(1)
            if rows.numel() > self.cfg.contrastive_rows:  # a random subset: the InfoNCE matrix is quadratic
                rows = rows[torch.randperm(rows.numel(), device=rows.device)[: self.cfg.contrastive_rows]]
            cl = contrastive_gate_loss(g1[rows], g2[rows], torch.ones_like(rows, dtype=torch.bool),
                                       self.cfg.contrastive_temperature)
            loss = loss + self.cfg.contrastive_weight * cl
        return loss, TrainOutput(out.logits.detach(), bce.detach(), cl.detach())


def ranking_metrics(probs: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """AUC, GAUC (per user), logloss of the main task's probabilities."""
    return ctr_metrics(probs, labels, users)
