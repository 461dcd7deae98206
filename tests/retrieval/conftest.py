"""Fixtures of the retriever tests: a tiny config and a 2-epoch run (the ML-100K features: tests/conftest.py)."""
from __future__ import annotations

import pytest

TINY = [
    "model.dim=16", "model.item.id_buckets=65536", "model.item.category_buckets=512",
    "model.item.attribute_buckets=512", "model.item.attribute_features=[item_attr_year]",
    "model.user.max_len=20", "model.user.num_layers=1", "model.user.num_heads=2", "model.user.dropout=0.1",
    "model.user.user_features=[user_attr_gender,user_attr_age]", "model.user.user_feature_buckets=512",
    "loss.mode=sampled", "loss.uniform_negatives=64", "loss.dedupe=true",
    "train.batch_size=128", "train.threads=1", "train.lr=0.005", "train.warmup_steps=5", "train.patience=0", "train.seed=3",
    "eval.batch_size=256", "index.hnsw_ef_search=600",
]


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="session")
def two_epochs(retrieval_features, tiny_overrides, tmp_path_factory):
    """(config, run directory, TrainResult) of a 2-epoch world-size-1 run on ML-100K."""
    from features.config import load_config
    from features.train.launch import run_distributed
    from retrieval.config import RetrieverConfig
    from retrieval.train import train_on_features

    cfg = load_config(RetrieverConfig, None, [*tiny_overrides, "train.epochs=2"])
    out = tmp_path_factory.mktemp("two_epochs")
    return cfg, out, run_distributed(train_on_features, 1, cfg, retrieval_features, out, False, False)[0]
