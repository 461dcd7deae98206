"""The shared training machinery on real gloo process groups (loopback): planning with
constraints, fused optimizers, DCP checkpoints that reshard from world size 2 to 1."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.train.checkpoint import load_checkpoint, save_checkpoint
from features.train.launch import run_distributed
from features.train.sharding import ShardingConfig, describe_plan, make_optimizer, shard_model


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = EmbeddingCollection(tables=[EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=64,
                                                                feature_names=["hist"])], device=torch.device("meta"))
        self.user = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=32,
                                                                      feature_names=["uid"])], device=torch.device("meta"))
        self.mlp = nn.Linear(16, 1)

    def forward(self, hist: KeyedJaggedTensor, uid: KeyedJaggedTensor) -> torch.Tensor:
        jt = self.seq(hist)["hist"]
        lengths = jt.lengths()
        seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        pooled = torch.zeros(lengths.numel(), 8).index_add_(0, seg, jt.values())
        return self.mlp(torch.cat([pooled, self.user(uid)["uid"]], dim=1)).squeeze(1)


def _data(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    b = 8
    lengths = torch.randint(0, 5, (b,), generator=g)
    hist = KeyedJaggedTensor.from_lengths_sync(["hist"], torch.randint(0, 64, (int(lengths.sum()),), generator=g), lengths)
    uid = KeyedJaggedTensor.from_lengths_sync(["uid"], torch.randint(0, 32, (b,), generator=g), torch.ones(b, dtype=torch.int64))
    y = torch.rand(b, generator=g)
    return hist, uid, y


def _train(rank: int, world: int, constraints: dict, ckpt: str, steps: int, resume: bool) -> dict:
    torch.manual_seed(0)
    dmp = shard_model(Toy(), ShardingConfig(constraints=constraints, embedding_lr=0.1), torch.device("cpu"))
    opt = make_optimizer(dmp, dense_lr=0.01)
    start = 0
    if resume:
        start = load_checkpoint(ckpt, dmp, opt)["step"]
    losses = []
    for step in range(start, steps):
        hist, uid, y = _data(step, rank, world)
        loss = nn.functional.mse_loss(dmp(hist, uid), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 2 and not resume:
            save_checkpoint(ckpt, dmp, opt, {"step": step + 1})
    with torch.no_grad():
        hist, uid, _ = _data(999, 0, 1)
        probe = dmp(hist, uid)
    return {"plan": describe_plan(dmp), "losses": losses, "probe": probe}


def _load_and_probe(rank: int, world: int, ckpt: str) -> torch.Tensor:
    dmp = shard_model(Toy(), ShardingConfig(), torch.device("cpu"))
    opt = make_optimizer(dmp, dense_lr=0.01)
    load_checkpoint(ckpt, dmp, opt)
    with torch.no_grad():
        hist, uid, _ = _data(999, 0, 1)
        return dmp(hist, uid)


@pytest.mark.integration
def test_row_wise_plan_checkpoint_reshards_to_world_one(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    res = run_distributed(_train, 2, {"item": ("row_wise",), "user": ("table_wise",)}, ckpt, 3, False)
    assert res[0]["plan"]["item"].startswith("row_wise on ranks [0, 1]")
    assert res[0]["plan"]["user"].startswith("table_wise")
    assert torch.allclose(res[0]["probe"], res[1]["probe"])
    # the world-size-2 checkpoint (written after step 3) loads at world size 1 with identical outputs
    probe1 = run_distributed(_load_and_probe, 1, ckpt)[0]
    assert torch.allclose(probe1, res[0]["probe"], atol=1e-6)


def test_resume_gives_identical_results(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    full = run_distributed(_train, 1, {}, ckpt, 6, False)[0]
    resumed = run_distributed(_train, 1, {}, ckpt, 6, True)[0]
    assert resumed["losses"] == full["losses"][3:]
    assert torch.equal(resumed["probe"], full["probe"])


def test_unknown_table_in_constraints_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tables \['items'\]"):
        run_distributed(_train, 1, {"items": ("row_wise",)}, str(tmp_path / "c"), 1, False)


def test_bad_sharding_type_is_rejected():
    with pytest.raises(ValueError, match="allowed"):
        ShardingConfig(constraints={"item": ("diagonal",)})


def _abort_once(rank: int, world_size: int, marker: str) -> int:
    """Rank 1 dies by SIGABRT the first time (as a crashed C++ thread would), then succeeds."""
    import os
    from pathlib import Path

    if rank == 1 and not Path(marker).exists():
        Path(marker).touch()
        os.abort()
    return rank * 10


def _raise(rank: int, world_size: int) -> int:
    raise RuntimeError(f"rank {rank} failed")


def test_a_group_with_a_signal_killed_rank_is_restarted_once(tmp_path):
    from features.train.launch import run_distributed

    assert run_distributed(_abort_once, 2, str(tmp_path / "aborted")) == [0, 10]
    assert (tmp_path / "aborted").exists()


def test_a_python_exception_in_a_rank_is_not_retried():
    import torch.multiprocessing as mp

    from features.train.launch import run_distributed

    with pytest.raises(mp.ProcessRaisedException, match="failed"):
        run_distributed(_raise, 2, max_restarts=3)
