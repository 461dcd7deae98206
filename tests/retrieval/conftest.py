"""Fixtures of the retriever tests: real ML-100K features (Spark, once per session) and a tiny config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# the stages the retriever reads (`ranking_samples` records dense.prior_rate, which FeatureStore requires)
RETRIEVAL_STAGES = "items,users,timelines,popularity,retrieval_samples,ranking_samples"

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
def retrieval_features(ml100k_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ML-100K through `cascade build-features` (only the stages the retriever reads)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from jobs.cli import main

    out = tmp_path_factory.mktemp("retrieval_features") / "features"
    rc = main(["build-features", "--dataset", str(ml100k_dataset), "--out", str(out), "--master", "local[2]",
               "--only", RETRIEVAL_STAGES, "spark.shuffle_partitions=4"])
    assert rc == 0
    return out


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
