"""The retriever's typed config: the shipped YAML files load, bad values are named; the lr schedule;
id-hash collision counting."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from features.batch import ITEM_ID, make_kjt
from features.config import ConfigError, load_config
from retrieval.catalog import Catalog
from retrieval.config import RetrieverConfig, TrainConfig
from retrieval.train import dense_lr, id_collisions

CONFIGS = Path(__file__).resolve().parents[2] / "retrieval" / "configs"


@pytest.mark.parametrize("name", ["ml-1m.yaml", "beauty.yaml", "ml-100k.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(RetrieverConfig, CONFIGS / name)
    assert cfg.model.dim > 0 and cfg.train.epochs > 0


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="select_metric 'ndcg@20' is not computed"):
        load_config(RetrieverConfig, None, ["train.select_metric=ndcg@20"])
    with pytest.raises(ConfigError, match="loss.mode"):
        load_config(RetrieverConfig, None, ["loss.mode=exact"])
    with pytest.raises(ConfigError, match="sampled mode needs in_batch negatives or uniform_negatives"):
        load_config(RetrieverConfig, None, ["loss.in_batch=false"])
    with pytest.raises(ConfigError, match="dim=30 must be positive and divisible by user.num_heads=4"):
        load_config(RetrieverConfig, None, ["model.dim=30", "model.user.num_heads=4"])


def test_dense_lr_warms_up_then_follows_the_schedule():
    const = TrainConfig(lr=0.01, warmup_steps=10)
    assert dense_lr(const, 0, 100) == pytest.approx(0.001)
    assert dense_lr(const, 9, 100) == dense_lr(const, 99, 100) == pytest.approx(0.01)
    cos = TrainConfig(lr=0.01, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert dense_lr(cos, 10, 110) == pytest.approx(0.01)
    assert dense_lr(cos, 60, 110) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
    assert dense_lr(cos, 110, 110) == pytest.approx(0.001)
    assert all(dense_lr(cos, s, 110) >= dense_lr(cos, s + 1, 110) for s in range(10, 110))


def test_id_collisions_counts_shared_rows():
    ids = np.arange(1, 2001, dtype=np.int64)
    cat = Catalog(ids, make_kjt({ITEM_ID: (ids, np.ones(len(ids), np.int64))}), torch.full((2000,), math.log(1 / 2000)))
    few = id_collisions(cat, num_hashes=1, buckets=1000)  # 2,000 items in 1,000 rows: most share
    assert few["items_sharing_row_hash0"] == few["items_sharing_all_rows"] > 1000
    many = id_collisions(cat, num_hashes=2, buckets=1 << 20)
    assert many["items_sharing_all_rows"] == 0 and many["items_sharing_row_hash0"] < 20
