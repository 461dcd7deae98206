"""`cascade train-ranker`: configuration layering and clear errors (fast), and one end-to-end run on real
ML-100K features built by the Spark jobs (slow tier)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.train_ranker import load_ranker_config

REPO = Path(__file__).resolve().parents[2]


def test_configs_layer_dataset_then_ablation_then_overrides():
    cfg = load_ranker_config([REPO / "ranking/configs/ml-1m.yaml", REPO / "ranking/configs/ablations/full.yaml"],
                             ["train.epochs=1", "model.sequence.top_k=8"])
    assert cfg.model.embedding.decoupled and cfg.model.sequence.long == "dare" and cfg.model.moe.num_experts == 4
    assert cfg.loss.contrastive_weight == 0.1 and cfg.train.epochs == 1 and cfg.model.sequence.top_k == 8
    assert cfg.model.embedding.item_buckets == 16384  # from the dataset file


@pytest.mark.parametrize("override, message", [
    ("train.lr_schedule=linear", "lr_schedule"),
    ("train.min_lr_ratio=1.5", "min_lr_ratio must be in"),
    ("train.warmup_steps=-1", "warmup_steps"),
])
def test_a_bad_schedule_override_is_named(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_ranker_config([REPO / "ranking/configs/two-stage.yaml"], ["train.lr_schedule=cosine", override])


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "ranking/configs/ablations").glob("*.yaml")))
def test_every_ablation_config_loads_on_every_dataset(name):
    for dataset in ("ml-1m", "ml-100k"):
        load_ranker_config([REPO / f"ranking/configs/{dataset}.yaml", REPO / f"ranking/configs/ablations/{name}.yaml"], [])


def test_missing_features_dir_is_a_clear_error(tmp_path, capsys):
    rc = main(["train-ranker", "--config", str(REPO / "ranking/configs/ml-100k.yaml"), "--out", str(tmp_path / "o"),
               "data.features_dir="])
    assert rc == 1
    assert "data.features_dir is not set" in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    rc = main(["train-ranker", "--out", str(tmp_path / "o"), "model.sequence.lenght=3"])
    assert rc == 1
    assert "unknown key(s) ['lenght']" in capsys.readouterr().err


def test_a_feature_the_data_lacks_is_named(tmp_path):
    from features.config import load_config
    from ranking.config import ModelConfig
    from ranking.data import check_features

    cfg = load_config(ModelConfig, None, ["embedding.user_features=[user_id, user_attr_shoe_size]"])
    with pytest.raises(ValueError, match=r"lists \['user_attr_shoe_size'\], which DIR does not have"):
        check_features(cfg, ("user_id", "user_attr_age"), ("item_id",), "DIR")


@pytest.mark.slow
def test_train_ranker_end_to_end_on_ml100k_features(shared_data, tmp_path):
    """Import -> Spark features -> `cascade train-ranker` (2 loopback ranks) -> export -> load_ranker."""
    run = [sys.executable, "-m", "jobs.cli"]
    subprocess.run(run + ["data", "import", "--source", str(shared_data / "ml-100k"), "--out", str(tmp_path / "ds")],
                   check=True, cwd=REPO)
    subprocess.run(run + ["build-features", "--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "f"),
                          "--master", "local[2]", "spark.shuffle_partitions=4"], check=True, cwd=REPO)
    subprocess.run(run + ["train-ranker", "--config", "ranking/configs/ml-100k.yaml", "--config",
                          "ranking/configs/ablations/full.yaml", "--out", str(tmp_path / "run"), "--world-size", "2",
                          f"data.features_dir={tmp_path / 'f'}", "train.epochs=1", "train.max_steps_per_epoch=10",
                          "data.batch_size=512"], check=True, cwd=REPO)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test"]["n"] > 9_000 and 0.5 < summary["test"]["auc"] < 1.0
    from features.reader import FeatureStore, ReaderConfig
    from ranking.export import load_ranker

    ranker = load_ranker(tmp_path / "run" / "export")
    batch = next(FeatureStore(tmp_path / "f").ranking_batches("test", ReaderConfig(batch_size=64, shuffle=False)))
    probs = ranker.forward(batch)
    assert probs.shape == (64,) and bool(((probs > 0) & (probs < 1)).all())
