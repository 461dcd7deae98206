"""Sharded training on real gloo process groups, DCP checkpoints, the export, and the inference module."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from features.train.checkpoint import load_checkpoint
from features.train.launch import run_distributed
from features.train.loop import scheduled_lr
from features.train.sharding import ShardingConfig, shard_model
from ranking.config import DataConfig, LossConfig, RankerConfig, TrainConfig
from ranking.data import InMemoryRankingData
from ranking.export import RankerExportError, export_ranker, load_ranker
from ranking.model import RankerModel
from ranking.task import RankerTrainTask
from ranking.train import train_ranker

from tests.ranking.batches import random_batch, tiny_config


def _data(seed: int) -> InMemoryRankingData:
    def batches(s: int, n: int, users: int = 6):
        g = torch.Generator().manual_seed(s)
        return [random_batch(1000 * s + i, torch.randint(0, 30, (users,), generator=g).tolist(),
                             torch.randint(1, 4, (users,), generator=g).tolist()) for i in range(n)]
    # valid: 3 batches of different sizes, so at world size 2 the ranks hold batches of different sizes
    # in one evaluation step (and one rank pads)
    return InMemoryRankingData(batches(seed, 6), batches(seed + 1, 2) + batches(seed + 3, 1, users=3),
                               batches(seed + 2, 2), seed=seed)


def _cfg() -> RankerConfig:
    model = tiny_config(decoupled=True, long="dare", experts=3)
    return RankerConfig(
        model=model, loss=LossConfig(contrastive_weight=0.1), data=DataConfig(),
        train=TrainConfig(epochs=2, dense_lr=3e-3, log_every=1,
                          sharding=ShardingConfig(constraints={"item_rep": ("row_wise",), "item_att": ("table_wise",)})),
    )


def _train(rank: int, world: int, out: str):
    return train_ranker(rank, world, _cfg(), _data(0), out, progress=False)


def _probe_checkpoint(rank: int, world: int, ckpt: str, model_cfg):
    task = RankerTrainTask(RankerModel(model_cfg, "meta"), LossConfig())
    dmp = shard_model(task, ShardingConfig(), torch.device("cpu"))
    load_checkpoint(Path(ckpt), dmp, None, restore_rng=False)
    dmp.eval()
    with torch.no_grad():
        return torch.sigmoid(dmp(random_batch(77, [5, 0, 28], [3, 1, 2]))[1].logits[:, 0])


@pytest.mark.integration
def test_two_rank_training_checkpoint_and_export(tmp_path):
    out = tmp_path / "run"
    res = run_distributed(_train, 2, str(out))
    assert res[0].test == res[1].test  # metrics are computed over both ranks' predictions
    assert res[0].plan["item_rep"].startswith("row_wise on ranks [0, 1]")
    assert res[0].plan["item_att"].startswith("table_wise")
    assert res[0].epochs_run == 2 and 0.0 <= res[0].test["auc"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == res[0].best_epoch
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2
    assert (out / "curves.png").stat().st_size > 0
    # the world-size-2 checkpoint resharded to one rank and the gathered export score identically
    from ranking.config import ModelConfig
    from features.config import from_mapping

    model_cfg = from_mapping(ModelConfig, res[0].model)
    probe = run_distributed(_probe_checkpoint, 1, str(out / "checkpoints" / "best"), model_cfg)[0]
    ranker = load_ranker(out / "export")
    torch.testing.assert_close(ranker.forward(random_batch(77, [5, 0, 28], [3, 1, 2])), probe, rtol=1e-5, atol=1e-6)


def test_inference_module_equals_training_forward(tmp_path):
    torch.manual_seed(0)
    model = RankerModel(tiny_config(decoupled=True, long="dare", experts=3), embedding_device="cpu")
    task = RankerTrainTask(model, LossConfig(contrastive_weight=0.2)).eval()
    batch = random_batch(21, [3, 17, 0, 44], [2, 2, 1, 3])
    with torch.no_grad():
        train_logits = task(batch)[1].logits
    ranker = load_ranker(export_ranker(model, tmp_path / "export"))
    torch.testing.assert_close(ranker.predict(batch), torch.sigmoid(train_logits))
    assert ranker.forward(batch).shape == (8,)
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["history"] == {"short_len": 6, "long_len": 40, "reads_last": 40, "long_module": "dare"}
    assert not hasattr(ranker, "behavior_signatures")  # only SDIM rankers have signatures


def test_tampered_export_is_refused(tmp_path):
    torch.manual_seed(0)
    out = export_ranker(RankerModel(tiny_config(False, "sdim", 2), embedding_device="cpu"), tmp_path / "e")
    assert hasattr(load_ranker(out), "behavior_signatures")
    weights = out / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-3] + b"xyz")
    with pytest.raises(RankerExportError, match="sha256"):
        load_ranker(out)
    with pytest.raises(RankerExportError, match="not a ranker export"):
        load_ranker(tmp_path / "nothing")


def test_inference_names_a_missing_feature(tmp_path):
    from features.batch import BatchValidationError, build_batch

    torch.manual_seed(0)
    ranker = load_ranker(export_ranker(RankerModel(tiny_config(False, "none", 1), embedding_device="cpu"), tmp_path / "e"))
    b = random_batch(1, [4], [2])
    no_tag = build_batch(
        user={k: (b.user[k].values(), b.user[k].lengths()) for k in b.user.keys()},
        history={k: b.history_values(k) for k in b.history.keys()}, history_lengths=b.history_lengths(),
        candidates={k: (b.candidates[k].values(), b.candidates[k].lengths()) for k in ("item_id", "item_category")},
        num_candidates=b.num_candidates, request_ts=b.request_ts, user_dense=b.user_dense,
        candidate_dense=b.candidate_dense,
    )
    with pytest.raises(BatchValidationError, match=r"candidates lacks feature\(s\) \['item_tag'\]"):
        ranker.forward(no_tag)


def _train_epochs(rank: int, world: int, out: str, epochs: int, resume: bool):
    from dataclasses import replace

    cfg = _cfg()
    cfg = replace(cfg, train=replace(cfg.train, epochs=epochs, sharding=ShardingConfig()))
    return train_ranker(rank, world, cfg, _data(0), out, resume=resume, export=False, progress=False)


def test_resumed_training_equals_uninterrupted(tmp_path):
    straight = run_distributed(_train_epochs, 1, str(tmp_path / "a"), 2, False)[0]
    run_distributed(_train_epochs, 1, str(tmp_path / "b"), 1, False)
    resumed = run_distributed(_train_epochs, 1, str(tmp_path / "b"), 2, True)[0]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert resumed.test == straight.test and resumed.epochs_run == 2


def _train_cosine(rank: int, world: int, out: str):
    from dataclasses import replace

    cfg = _cfg()
    cfg = replace(cfg, train=replace(cfg.train, epochs=3, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1,
                                     sharding=ShardingConfig()))
    return train_ranker(rank, world, cfg, _data(0), out, export=False, progress=False)


def test_cosine_schedule_drives_the_dense_rate_over_all_epochs_steps(tmp_path):
    res = run_distributed(_train_cosine, 1, str(tmp_path))[0]
    steps = res.history[0]["steps"]
    lrs = [h["lr"] for h in res.history]
    for epoch, lr in enumerate(lrs):  # the rate each epoch ended at: its last step's on the run's one horizon
        last = (epoch + 1) * steps - 1
        assert lr == pytest.approx(scheduled_lr(3e-3, last, 3 * steps, warmup_steps=2, schedule="cosine",
                                                min_lr_ratio=0.1))
    assert lrs[0] > lrs[1] > lrs[2] >= 3e-4


def _pointwise_data() -> InMemoryRankingData:
    def batches(s: int, n: int):
        g = torch.Generator().manual_seed(s)
        return [random_batch(1000 * s + i, torch.randint(0, 30, (6,), generator=g).tolist(), [1] * 6)
                for i in range(n)]
    return InMemoryRankingData(batches(0, 3), batches(1, 2), batches(2, 2), seed=0)


def _train_pointwise(rank: int, world: int, out: str, select: str):
    cfg = _cfg()
    cfg = RankerConfig(model=cfg.model, loss=cfg.loss, data=cfg.data,
                       train=TrainConfig(epochs=1, dense_lr=3e-3, select_metric=select))
    try:
        return train_ranker(rank, world, cfg, _pointwise_data(), out, progress=False, export=False)
    except ValueError as e:
        return e


def test_one_candidate_requests_report_no_list_metrics(tmp_path):
    """With one candidate per request a list's HR@10 would only restate the positive rate: it is not reported,
    and selecting on it is refused with the reason."""
    res = run_distributed(_train_pointwise, 1, str(tmp_path / "a"), "auc")[0]
    assert {"auc", "gauc", "logloss"} <= set(res.test) and not any(k.startswith(("hr@", "ndcg@")) for k in res.test)
    err = run_distributed(_train_pointwise, 1, str(tmp_path / "b"), "hr@10")[0]
    assert isinstance(err, ValueError) and "one candidate" in str(err)
