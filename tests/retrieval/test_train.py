"""Training on a small real sample (ML-100K features): the loss decreases and resume is bit-identical."""
from __future__ import annotations

import json

import pytest

from features.config import load_config
from features.train.launch import run_distributed
from retrieval.config import RetrieverConfig
from retrieval.train import train_on_features


def test_loss_decreases_and_the_retriever_learns(two_epochs):
    cfg, out, res = two_epochs
    losses = [r["loss"] for r in res.history]
    assert losses[1] < losses[0]
    assert res.best_valid["hr@50"] > 3 * 50 / 1682  # well above a random ranking of the 1,682 items
    assert res.test["n"] == 943 and res.best_epoch in (1, 2)
    log = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2] and "valid_ndcg@10" in log["epochs"][0]
    assert (out / "curves.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["test"] == res.test


def test_resume_gives_identical_results(two_epochs, retrieval_features, tiny_overrides, tmp_path):
    cfg2, _, full = two_epochs
    cfg1 = load_config(RetrieverConfig, None, [*tiny_overrides, "train.epochs=1"])
    first = run_distributed(train_on_features, 1, cfg1, retrieval_features, tmp_path, False, False)[0]
    assert first.history[0]["loss"] == full.history[0]["loss"]
    resumed = run_distributed(train_on_features, 1, cfg2, retrieval_features, tmp_path, True, False)[0]
    assert resumed.epochs_run == 2
    assert resumed.history[1]["loss"] == full.history[1]["loss"]
    assert {k: v for k, v in resumed.history[1].items() if k.startswith("valid_")} == \
        {k: v for k, v in full.history[1].items() if k.startswith("valid_")}
    assert resumed.test == full.test


def test_sparse_adam_trains_replicated_tables_on_two_ranks_and_resumes_exactly(retrieval_features, tiny_overrides,
                                                                                tmp_path):
    """The CPU route to Adam for the tables: unsharded replicas, sparse gradients averaged by DDP, SparseAdam."""
    adam = [*tiny_overrides, "train.sharding.embedding_optimizer=sparse_adam", "train.sharding.embedding_lr=0.02"]
    cfg2 = load_config(RetrieverConfig, None, [*adam, "train.epochs=2"])
    full = run_distributed(train_on_features, 2, cfg2, retrieval_features, tmp_path / "full", False, False)[0]
    assert all(v.startswith("replicated on all 2 ranks") for v in full.plan.values()) and "item_id" in full.plan
    assert full.history[1]["loss"] < full.history[0]["loss"]
    assert full.best_valid["hr@50"] > 3 * 50 / 1682
    cfg1 = load_config(RetrieverConfig, None, [*adam, "train.epochs=1"])
    run_distributed(train_on_features, 2, cfg1, retrieval_features, tmp_path / "resumed", False, False)
    resumed = run_distributed(train_on_features, 2, cfg2, retrieval_features, tmp_path / "resumed", True, False)[0]
    assert resumed.history[1]["loss"] == full.history[1]["loss"]  # SparseAdam's moments came back from the checkpoint
    assert resumed.test == full.test
