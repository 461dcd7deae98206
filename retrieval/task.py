"""The train task: the model plus its loss (what DistributedModelParallel wraps), and the candidate sampler.

    sampler = CandidateSampler(cfg.loss, catalog, item_keys(cfg.model), seed)
    task = RetrievalTask(TwoTowerRetriever(cfg.model), cfg.loss)
    loss = dmp(batch, sampler(batch, step)).loss            # dmp = shard_model(task, ...)

Training batches hold every-prefix next-item samples (features.reader): user b's
history has L_b behaviors and its candidates are the L_b next items, so the
query after history position t is trained to retrieve candidate t.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from features.batch import ITEM_CATEGORY, ITEM_ID, Batch
from features.batch import concat_rows
from retrieval.catalog import Catalog, select_rows
from retrieval.config import LossConfig, ModelConfig
from retrieval.loss import CandidateSet, log_q, sampled_softmax_loss
from retrieval.model import TwoTowerRetriever

LOGQ_COLUMN = 0  # candidate_dense[:, 0] of a retrieval training batch is the positive's logq


def item_keys(cfg: ModelConfig) -> list[str]:
    """The candidate KJT keys the item tower reads."""
    return [ITEM_ID] + ([ITEM_CATEGORY] if cfg.item.category else []) + list(cfg.item.attribute_features)


class TaskOutput(NamedTuple):
    loss: torch.Tensor  # scalar
    rows: torch.Tensor  # scalar int64: training rows (next-item samples) in the step


class RetrievalTask(nn.Module):
    """Model + sampled softmax loss (+ the temperature, learned or fixed).

    bf16: run the towers under bfloat16 autocast (the encoder's matmuls and attention); the
    logits and the loss stay float32 (retrieval/loss.py turns autocast off for them).
    """

    def __init__(self, model: TwoTowerRetriever, cfg: LossConfig, bf16: bool = False) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.bf16 = bf16
        t = torch.tensor(math.log(cfg.temperature))
        if cfg.learn_temperature:
            self.log_temperature = nn.Parameter(t)
        else:
            self.register_buffer("log_temperature", t)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=self.cfg.min_temperature, max=1.0)

    def forward(self, batch: Batch, cands: CandidateSet) -> TaskOutput:
        with torch.autocast(self.log_temperature.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(batch, cands.items)
        loss = sampled_softmax_loss(out.queries, out.items, cands, self.temperature(), batch.weights)
        return TaskOutput(loss, torch.tensor(out.queries.shape[0]))


class CandidateSampler:
    """Builds a step's `CandidateSet` (retrieval/loss.py) from a training batch and the catalog.

    Uniform draws come from a generator seeded by (seed, step, rank), so a
    resumed run draws exactly what the uninterrupted run drew.
    """

    def __init__(self, cfg: LossConfig, catalog: Catalog, keys: Sequence[str], seed: int = 0) -> None:
        missing = [k for k in keys if k not in catalog.keys()]
        if missing:
            raise ValueError(f"the catalog lacks item features {missing} the model reads (has {catalog.keys()})")
        self.cfg = cfg
        self.catalog = catalog
        self.keys = list(keys)
        self.seed = seed
        self._all = catalog.select(torch.arange(len(catalog)), self.keys) if cfg.mode == "full" else None

    def __call__(self, batch: Batch, step: int = 0, rank: int = 0) -> CandidateSet:
        cfg, cat = self.cfg, self.catalog
        n = len(cat)
        pos_ids = batch.candidate_item_ids()  # (M,)
        m = int(pos_ids.numel())
        zeros_m = torch.zeros(m)
        if cfg.mode == "full":
            rows = cat.rows_of(pos_ids)
            return CandidateSet(self._all, rows, pos_ids, zeros_m, torch.arange(n), cat.ids, torch.zeros(n), True)

        if not cfg.in_batch:
            return self._pool(batch, pos_ids, step, rank)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + rank)
        uni_rows = torch.randint(n, (cfg.uniform_negatives,), generator=gen)
        pos_logq = batch.candidate_dense[:, LOGQ_COLUMN]  # (M,) per-draw log p of each positive
        mb, k = m, cfg.uniform_negatives

        def lq(logq: torch.Tensor) -> torch.Tensor:
            if not cfg.logq_correction:
                return torch.zeros_like(logq)
            return log_q(logq, mb, k, n, cfg.dedupe)

        if cfg.dedupe:
            uniq, first, inverse = _unique_first(pos_ids)
            pos_items = select_rows(batch.candidates, first, self.keys)  # (U,) first occurrence of each positive
            uni_rows = torch.unique(uni_rows)
            uni_rows = uni_rows[~torch.isin(cat.ids[uni_rows], uniq)]  # a uniform draw of an in-batch item: same column
            items = concat_rows([pos_items, cat.select(uni_rows, self.keys)], self.keys)
            u = int(uniq.numel())
            ids = torch.cat([uniq, cat.ids[uni_rows]])
            logq_all = torch.cat([pos_logq[first], cat.logq[uni_rows]])
            neg = torch.arange(u + int(uni_rows.numel()))
            corr = lq(logq_all)
            return CandidateSet(items, inverse, pos_ids, corr[inverse], neg, ids[neg], corr[neg], True)

        # one column per draw: the M positives (row i's own positive is column i) and the K uniform draws
        items = concat_rows([select_rows(batch.candidates, torch.arange(m), self.keys),
                             cat.select(uni_rows, self.keys)], self.keys)
        ids = torch.cat([pos_ids, cat.ids[uni_rows]])
        corr = lq(torch.cat([pos_logq, cat.logq[uni_rows]]))
        neg = torch.arange(m + k)
        return CandidateSet(items, torch.arange(m), pos_ids, corr[:m], neg, ids[neg], corr[neg], False)

    def _pool(self, batch: Batch, pos_ids: torch.Tensor, step: int, rank: int) -> CandidateSet:
        """A shared pool of K uniform negatives for every row (loss.py: the positive has Q = 1, the pool K / N).

        The item tower embeds the distinct positives and the pool once; a pool of K >= N items is the
        whole catalog (Q = 1, the exact softmax without the full mode's per-step catalog forward).
        """
        cfg, cat = self.cfg, self.catalog
        n, k = len(cat), cfg.uniform_negatives
        m = int(pos_ids.numel())
        if k >= n:
            if self._all is None:
                self._all = cat.select(torch.arange(n), self.keys)
            return CandidateSet(self._all, cat.rows_of(pos_ids), pos_ids, torch.zeros(m), torch.arange(n), cat.ids,
                                torch.zeros(n), True)
        uniq, first, inverse = _unique_first(pos_ids)
        pos_items = select_rows(batch.candidates, first, self.keys)  # (U,)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + rank)
        pool = torch.randint(n, (k,), generator=gen)
        if cfg.dedupe:
            pool = torch.unique(pool)
        lq = log_q(torch.full((1,), -math.inf), 0, k, n, cfg.dedupe) if cfg.logq_correction else torch.zeros(1)
        items = concat_rows([pos_items, cat.select(pool, self.keys)], self.keys)
        neg = int(uniq.numel()) + torch.arange(int(pool.numel()))
        return CandidateSet(items, inverse, pos_ids, torch.zeros(m), neg, cat.ids[pool],
                            lq.expand(int(pool.numel())).contiguous(), cfg.dedupe)


def _unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique ids, index of each one's first occurrence, inverse index of every id)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
    return uniq, first, inverse
