"""The cheap epoch: a shared pool of uniform negatives (its logQ math), bf16 towers with a float32 loss,
the dot-product score, early stopping and the budget-relative lr schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_TS, ITEM_CATEGORY, ITEM_ID, USER_ID, \
    build_batch, make_kjt
from retrieval.catalog import Catalog
from retrieval.config import ItemTowerConfig, LossConfig, ModelConfig, TrainConfig, UserTowerConfig
from retrieval.loss import CandidateSet, sampled_softmax_loss
from retrieval.model import TwoTowerRetriever
from retrieval.task import CandidateSampler, RetrievalTask
from retrieval.train import dense_lr

N = 12
IDS = np.arange(500, 500 + N, dtype=np.int64)


def _catalog() -> Catalog:
    return Catalog(IDS, make_kjt({ITEM_ID: (IDS, np.ones(N, np.int64))}), torch.full((N,), math.log(1.0 / N)))


def _train_batch(pos: list[int]):
    m = len(pos)
    e = np.zeros(m, np.int64)
    return build_batch(user={}, history={HIST_ITEM_ID: e}, history_lengths=[m], candidates={ITEM_ID: (pos, [1] * m)},
                       num_candidates=[m], request_ts=[0], candidate_dense=np.full((m, 1), math.log(1 / N), np.float32))


def _vectors(seed: int, n: int, d: int = 4) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _item_vecs(table: torch.Tensor, cands: CandidateSet) -> torch.Tensor:
    """The catalog table's rows for the items the candidate set embeds (what the item tower would return)."""
    return table[torch.as_tensor(np.searchsorted(IDS, cands.items[ITEM_ID].values().numpy()))]


def test_a_pool_covering_the_catalog_is_the_exact_softmax():
    table, q = _vectors(0, N), _vectors(1, 3)
    batch = _train_batch([503, 507, 503])
    pool = CandidateSampler(LossConfig(in_batch=False, uniform_negatives=N), _catalog(), [ITEM_ID])(batch, step=2)
    assert not pool.negative_log_q.any() and not pool.positive_log_q.any()
    got = sampled_softmax_loss(q, _item_vecs(table, pool), pool, torch.tensor(0.2))
    exact = F.cross_entropy(q @ table.T / 0.2, torch.tensor([3, 7, 3]))
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)


@pytest.mark.parametrize("dedupe", [False, True], ids=["per-draw", "inclusion"])
def test_pool_log_q_makes_the_partition_estimate_unbiased(dedupe):
    # loss = log(exp(s_y) + S) - s_y with S the pool's corrected sum: S must estimate sum_{i != y} exp(s_i)
    table, q = _vectors(2, N), _vectors(3, 1)
    tau = torch.tensor(1.0)
    logits = (q @ table.T / tau)[0]  # (N,)
    y = 4
    want = float(logits.exp().sum() - logits[y].exp())
    cfg = LossConfig(in_batch=False, uniform_negatives=5, dedupe=dedupe)
    sampler = CandidateSampler(cfg, _catalog(), [ITEM_ID], seed=0)
    raw = CandidateSampler(LossConfig(in_batch=False, uniform_negatives=5, dedupe=dedupe, logq_correction=False),
                           _catalog(), [ITEM_ID], seed=0)
    batch = _train_batch([int(IDS[y])])
    est, est_raw = [], []
    for step in range(600):
        for s, out in ((sampler, est), (raw, est_raw)) if step < 200 else ((sampler, est),):
            c = s(batch, step=step)
            assert c.positive_log_q.tolist() == [0.0]  # the positive is certain, not a draw of the pool
            loss = sampled_softmax_loss(q, _item_vecs(table, c), c, tau)
            out.append(math.exp(loss.item() + logits[y].item()) - math.exp(logits[y].item()))
    assert np.mean(est) == pytest.approx(want, rel=0.05)
    assert np.mean(est_raw) < 0.6 * want  # uncorrected: the partition sum is about K / N of the truth


def test_without_in_batch_negatives_the_correction_is_a_constant_on_the_pool_only():
    c = CandidateSampler(LossConfig(in_batch=False, uniform_negatives=4, dedupe=False), _catalog(), [ITEM_ID])(
        _train_batch([501, 502]), step=0)
    assert torch.allclose(c.negative_log_q, torch.full((4,), math.log(4 / N)))
    assert c.positive_log_q.tolist() == [0.0, 0.0]


def test_the_loss_is_float32_under_autocast():
    table, q = _vectors(4, N), _vectors(5, 6)
    c = CandidateSampler(LossConfig(mode="full"), _catalog(), [ITEM_ID])(_train_batch([501, 502, 503, 504, 505, 506]))
    plain = sampled_softmax_loss(q, table, c, torch.tensor(0.05))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = sampled_softmax_loss(q.bfloat16(), table, c, torch.tensor(0.05))
    assert cast.dtype == torch.float32
    assert cast.item() == pytest.approx(sampled_softmax_loss(q.bfloat16().float(), table, c, torch.tensor(0.05)).item(),
                                        rel=1e-6)
    assert plain.dtype == torch.float32


CFG = ModelConfig(dim=16, item=ItemTowerConfig(id_buckets=4096, category_buckets=256),
                  user=UserTowerConfig(max_len=8, num_layers=1, num_heads=2))


def _user_batch():
    hist = np.array([501, 503, 505, 502, 504, 506, 507], np.int64)
    return build_batch(
        user={USER_ID: ([1, 2], [1, 1])},
        history={HIST_ITEM_ID: hist, HIST_TS: np.arange(7), HIST_ACTION: hist % 5 + 8, HIST_CATEGORY: hist % 3},
        history_lengths=[3, 4], num_candidates=[3, 4], request_ts=[10**9, 10**9],
        candidates={ITEM_ID: ([503, 505, 508, 504, 506, 507, 509], [1] * 7),
                    ITEM_CATEGORY: ([1, 2, 0, 1, 2, 0, 1], [1] * 7)},
        candidate_dense=np.full((7, 1), math.log(1 / N), np.float32),
    )


def test_bf16_autocasts_the_towers_and_keeps_the_loss_float32():
    torch.manual_seed(0)
    model = TwoTowerRetriever(CFG, "cpu")
    seen: list[torch.dtype] = []
    model.blocks[0].qkv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    batch = _user_batch()
    cat_ids = np.arange(500, 512, dtype=np.int64)
    catalog = Catalog(cat_ids, make_kjt({ITEM_ID: (cat_ids, np.ones(12, np.int64)),
                                         ITEM_CATEGORY: (cat_ids % 3, np.ones(12, np.int64))}),
                      torch.full((12,), math.log(1 / 12)))
    cands = CandidateSampler(LossConfig(mode="full"), catalog, [ITEM_ID, ITEM_CATEGORY])(batch)
    fp32 = RetrievalTask(model, LossConfig(mode="full")).eval()(batch, cands).loss
    bf16 = RetrievalTask(model, LossConfig(mode="full"), bf16=True).eval()(batch, cands).loss
    half = len(seen) // 2  # one call per length group and task
    assert seen[:half] == [torch.float32] * half and seen[half:] == [torch.bfloat16] * half  # bf16: second task only
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.05)  # bf16 towers, same loss to bf16's precision


def test_the_dot_score_leaves_vectors_unnormalized():
    torch.manual_seed(0)
    from dataclasses import replace

    out = TwoTowerRetriever(replace(CFG, score="dot"), "cpu").eval()(_user_batch(), _user_batch().candidates)
    assert not torch.allclose(out.items.norm(dim=1), torch.ones(7))
    assert not torch.allclose(out.queries.norm(dim=1), torch.ones(7))


def test_the_budget_horizon_anneals_with_the_time_spent_not_the_epochs():
    tc = TrainConfig(lr=0.01, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1, max_minutes=10.0,
                     lr_horizon="budget")
    assert dense_lr(tc, 50, 10_000, budget_spent=0.0) == pytest.approx(0.01, rel=1e-3)
    assert dense_lr(tc, 50, 10_000, budget_spent=0.5) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5), rel=1e-2)
    assert dense_lr(tc, 50, 10_000, budget_spent=1.5) == pytest.approx(0.001)  # past the budget: the floor
    assert dense_lr(tc, 10_000, 10_000, budget_spent=0.1) == pytest.approx(0.001)  # the epochs end first


def test_a_budget_horizon_needs_a_budget():
    with pytest.raises(ValueError, match="lr_horizon=budget needs a time budget"):
        TrainConfig(lr_schedule="cosine", lr_horizon="budget")


def _shard(rank: int, world_size: int, optimizer: str) -> None:
    from features.train.sharding import ShardingConfig, shard_model

    task = RetrievalTask(TwoTowerRetriever(CFG, "meta"), LossConfig())
    shard_model(task, ShardingConfig(embedding_optimizer=optimizer), torch.device("cpu"))


@pytest.mark.parametrize("optimizer", ["adam", "partial_rowwise_adam"])
def test_adam_family_table_optimizers_are_refused_on_cpu_with_the_reason(optimizer):
    from features.train.launch import run_distributed

    with pytest.raises(ValueError, match=f"embedding_optimizer='{optimizer}' has no fused CPU kernel"):
        run_distributed(_shard, 1, optimizer)


def test_sparse_adam_refuses_sharding_constraints():
    from features.train.sharding import ShardingConfig, plan_sharding

    task = RetrievalTask(TwoTowerRetriever(CFG, "meta"), LossConfig())
    cfg = ShardingConfig(embedding_optimizer="sparse_adam", constraints={"item_id": ("row_wise",)})
    with pytest.raises(ValueError, match="replicated on every rank, not sharded"):
        plan_sharding(task, cfg, 1, torch.device("cpu"))
