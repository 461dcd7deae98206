"""The scheduled pipeline trains the second stage the way the two-stage benchmark measures it: a lists
retriever with each user's last items held out, its lists, the point-in-time context counts, the item-item
model, the listwise ranker (`jobs.second_stage`), and the gate evaluates the bundle on the validation lists.
The ranker the pipeline selected on its valid lists scores exactly what the gate then measures on the same
lists."""
from __future__ import annotations

import json

import pytest

from tests.retrieval.conftest import TINY
from tests.serving.conftest import RANKER_SMALL

pytestmark = pytest.mark.integration


def test_pipeline_trains_a_second_stage_ranker_on_held_out_lists(retrieval_features, tmp_path):
    from jobs.pipeline import FeaturesStage, PipelineConfig, PublishConfig, TrainStage, run_pipeline
    from ranking.export import load_ranker

    cfg = PipelineConfig(
        artifacts=str(tmp_path / "artifacts"), features=FeaturesStage(dir=str(retrieval_features)),
        retriever=TrainStage(configs=("retrieval/configs/ml-100k.yaml",), overrides=(*TINY, "train.epochs=1")),
        ranker=TrainStage(configs=("ranking/configs/ml-100k.yaml", "ranking/configs/two-stage.yaml"),
                          overrides=(*RANKER_SMALL, "train.epochs=1", "train.max_steps_per_epoch=30",
                                     "lists.holdout=2", "lists.train_width=16")),
        publish=PublishConfig(announce=False))
    log: list[str] = []
    res = run_pipeline(cfg, "v1", log.append)

    vdir = tmp_path / "artifacts" / "versions" / "v1"
    stages = json.loads((vdir / "manifest.json").read_text())["stages"]
    rank = stages["ranker"]
    assert rank["second_stage"] and (vdir / "ranker" / "lists-retriever" / "export" / "manifest.json").is_file()
    held_cfg = (vdir / "ranker" / "lists-retriever" / "config.yaml").read_text()
    assert "holdout_tail: 2" in held_cfg  # the lists retriever never trained on the training lists' targets
    assert sorted(p.name for p in (vdir / "ranker" / "lists").iterdir()) == [
        "lists-test-top100.npz", "lists-train-top100.npz", "lists-valid-top100.npz"]
    # two-stage.yaml's lists.item_item_select: a ranker with the item-item inputs and one without, the one better
    # on the valid lists kept (a tie keeps the one without)
    variants = rank["variants"]
    assert set(variants) == {"item-item", "no-item-item"}
    with_ii, without = (variants[n]["valid"]["ndcg@10"] for n in ("item-item", "no-item-item"))
    kept = "item-item" if with_ii > without else "no-item-item"
    assert rank["kept"] == kept and rank["export"] == variants[kept]["export"]
    assert rank["valid"] == variants[kept]["valid"]
    assert any(f"kept the ranker {kept!r}" in line for line in log)
    ranker = load_ranker(rank["export"])
    assert ranker.second_stage and ranker.context is not None and ranker.context.window == 5
    assert (ranker.item_item is not None) == (kept == "item-item")
    other = load_ranker(variants["item-item"]["export"])
    assert other.item_item is not None and other.item_item_history == 1000  # two-stage.yaml's lists.item_item
    assert load_ranker(variants["no-item-item"]["export"]).item_item is None

    ev = json.loads((vdir / "evaluation.json").read_text())["candidate"]
    assert "ranker" not in ev and ev["two_stage"]["n"] == ev["retriever_valid"]["n"] > 900
    # the gate retrieves the valid lists again from the published parts (top 100, as trained): what the
    # training run selected its epoch on is what the gate measures
    for k in ("hr@10", "ndcg@10", "hr@50"):
        assert ev["two_stage"][k] == pytest.approx(rank["valid"][k], abs=1e-6)
    lift = ev["two_stage"]["ndcg@10"] > ev["retriever_valid"]["ndcg@10"] and \
        ev["two_stage"]["hr@10"] >= ev["retriever_valid"]["hr@10"]
    assert res.passed == lift and res.published == lift, (res.reasons, ev)
    assert any("lists retriever" in line for line in log)
