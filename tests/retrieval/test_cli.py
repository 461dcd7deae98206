"""`cascade train-retriever`: 2 loopback ranks (gloo) with a row-wise item table, the checkpoint gathered at
world size 1 for the export, the summary; bad input gets a clear error."""
from __future__ import annotations

import json

import pytest

from features.config import load_config
from jobs.cli import main
from retrieval.config import RetrieverConfig
from retrieval.data import open_data
from retrieval.evaluate import evaluate
from retrieval.export import load_retriever, load_unsharded
from retrieval.task import item_keys

TWO_RANKS = ["train.epochs=1", "train.batch_size=64",
             "train.sharding.constraints={item_id: [row_wise], category: [table_wise]}"]


@pytest.mark.integration
def test_two_rank_row_wise_run_exports_from_a_checkpoint_loaded_at_world_one(
        retrieval_features, tiny_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train-retriever", "--features", str(retrieval_features), "--out", str(out), "--nproc", "2",
               "--quiet", *tiny_overrides, *TWO_RANKS])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["item_id"].startswith("row_wise on ranks [0, 1]")
    assert summary["plan"]["category"].startswith("table_wise")
    assert summary["test"]["n"] == 943  # every user, although the two ranks' last batches differ in size
    printed = capsys.readouterr().out
    assert "test" in printed and "row_wise on ranks [0, 1]" in printed and str(out / "export") in printed

    # the row-wise sharded checkpoint, gathered into one unsharded model, scores exactly like the 2-rank run
    cfg = load_config(RetrieverConfig, None, [*tiny_overrides, *TWO_RANKS])
    model = load_unsharded(out / "checkpoints" / "best", cfg)
    data = open_data(retrieval_features, cfg)
    again = evaluate(model, data.catalog, item_keys(cfg.model), data.eval_batches("test", 0, 1), cfg.eval,
                     progress=False)
    assert again == pytest.approx(summary["test"], abs=1e-5)  # float sums in another thread layout

    r = load_retriever(out / "export")
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["metrics"]["test"] == summary["test"] and manifest["ann"]["recall@500_vs_exact"] >= 0.99
    assert len(r.item_ids) == 1682


def test_a_missing_features_directory_is_a_clear_error(tmp_path, capsys):
    rc = main(["train-retriever", "--features", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert rc == 1
    assert f"features directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_an_unknown_config_key_is_named(retrieval_features, tmp_path, capsys):
    rc = main(["train-retriever", "--features", str(retrieval_features), "--out", str(tmp_path / "run"),
               "model.user.max_lenn=5"])
    assert rc == 1
    assert "unknown key(s) ['max_lenn']" in capsys.readouterr().err
