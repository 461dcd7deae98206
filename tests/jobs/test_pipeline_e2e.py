"""The whole loop, for real: Spark features -> sharded training of both models -> evaluation gate -> publish
on Kafka -> a running gRPC server hot-swaps -> an event on Kafka changes a user's ranking.

ML-100K, tiny configs (a few seconds of training each). Three pipeline versions:
v1 (first publish), v2 deliberately worse (the ranker stops after 2 steps: refused, never announced),
v3 better (two ranker epochs: published, and the running server swaps to it)."""
from __future__ import annotations

import json
import uuid

import pytest

from tests.retrieval.conftest import TINY
from tests.serving.conftest import Harness, _wait_until, serving_overrides, unique_topics

pytestmark = pytest.mark.integration

RANKER_SMALL = ["model.embedding.dim=16", "model.embedding.attention_dim=8", "model.sequence.long_len=200",
                "model.moe.expert_hidden=[64]", "data.batch_size=512", "train.epochs=1"]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from jobs.services import LocalServices

    with LocalServices(tmp_path_factory.mktemp("svc")) as svc:
        yield svc


@pytest.fixture(scope="module")
def catalog(ml100k_dataset):
    from serving.catalog import load_catalog

    return load_catalog(ml100k_dataset)


def _cfg(dataset, artifacts, kafka, topic, features_dir="", ranker_extra=()):
    from jobs.pipeline import FeaturesStage, PipelineConfig, PublishConfig, TrainStage

    return PipelineConfig(
        dataset=str(dataset), artifacts=str(artifacts),
        features=FeaturesStage(dir=str(features_dir), spark_master="local[2]",
                               overrides=("spark.shuffle_partitions=4", "spark.driver_memory=2g", "report.plot=false")),
        retriever=TrainStage(configs=("retrieval/configs/ml-100k.yaml",), overrides=(*TINY, "train.epochs=1")),
        ranker=TrainStage(configs=("ranking/configs/ml-100k.yaml",), overrides=(*RANKER_SMALL, *ranker_extra)),
        publish=PublishConfig(kafka_bootstrap=kafka, models_topic=topic),
    )


def test_pipeline_gate_publish_hot_swap_and_live_event(ml100k_dataset, catalog, services, tmp_path):
    from features.schema import Event
    from jobs.pipeline import read_published, run_pipeline
    from jobs.services import create_topics
    from serving.app import ServingApp, load_serving_config
    from serving.bootstrap import bootstrap_dataset

    art = tmp_path / "artifacts"
    topics = unique_topics()
    create_topics(services.kafka.address, {topics.events: 2, topics.items: 1, topics.models: 1, topics.dead_letter: 1})
    log: list[str] = []

    # v1: features built by Spark, both models trained and exported; nothing published yet -> published
    v1 = run_pipeline(_cfg(ml100k_dataset, art, services.kafka.address, topics.models), "v1", log.append)
    assert v1.passed and v1.published, v1.reasons
    pub = read_published(art)
    assert pub["version"] == "v1" and pub["metrics"]["ranker"]["auc"] > 0.6
    manifest = json.loads((art / "versions" / "v1" / "manifest.json").read_text())
    assert manifest["stages"]["features"]["snapshot"]["tables"]["events"] == 100_000
    assert {s: r["status"] for s, r in manifest["stages"].items()} == dict.fromkeys(
        ("features", "retriever", "ranker", "evaluate", "publish"), "done")
    features_dir = manifest["stages"]["features"]["dir"]

    # re-running the day is idempotent: every stage is skipped, nothing is republished
    again = run_pipeline(_cfg(ml100k_dataset, art, services.kafka.address, topics.models), "v1", log.append)
    assert again.published and sum("skipped" in line for line in log[-8:]) == 5
    assert len((art / "history.jsonl").read_text().splitlines()) == 1

    # a running server on v1 (real Redis state, Kafka consumers)
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    cfg = load_serving_config(None, serving_overrides(services, topics, prefix,
                                                       **{"models.initial_bundle": pub["bundle"]}), env={})
    app = ServingApp(cfg, catalog)
    bootstrap_dataset(app.store, ml100k_dataset, cfg.state, catalog)
    app.start(wait_for_partitions_s=15.0)
    h = Harness(app, topics, services.kafka.address)
    try:
        assert h.rank(1, k=10).model_version == "v1"

        # v2: deliberately worse ranker -> the gate refuses, nothing is published or announced
        v2 = run_pipeline(_cfg(ml100k_dataset, art, services.kafka.address, topics.models, features_dir,
                               ["train.max_steps_per_epoch=2"]), "v2", log.append)
        assert not v2.passed and not v2.published
        assert any("ranker auc" in r and "regresses" in r for r in v2.reasons), v2.reasons
        assert read_published(art)["version"] == "v1" and not (art / "versions" / "v2" / "bundle").exists()
        ev2 = json.loads((art / "versions" / "v2" / "evaluation.json").read_text())
        assert ev2["published_version"] == "v1" and ev2["candidate"]["ranker"]["auc"] < ev2["published"]["ranker"]["auc"]

        # v3: a better ranker (two epochs) -> published, announced, and the running server swaps to it
        v3 = run_pipeline(_cfg(ml100k_dataset, art, services.kafka.address, topics.models, features_dir,
                               ["train.epochs=2"]), "v3", log.append)
        assert v3.passed and v3.published, v3.reasons
        assert read_published(art)["version"] == "v3"
        _wait_until(lambda: h.rank(1, k=10).model_version == "v3", timeout_s=60, what="hot swap to v3")
        # the swap is counted once the loader returns, after the heap is settled for the new model
        _wait_until(lambda: h.metric("cascade_model_swaps_total") == 2, timeout_s=10, what="the swap counted")

        # a live event on Kafka changes the user's ranking: the top item, once consumed, is seen and excluded
        before = h.rank(1, k=10, exclude_seen=True)
        top = before.items[0].item_id
        h.send_events([Event(event_id=f"e2e-{uuid.uuid4().hex}", user_id=1, item_id=top,
                             ts_ms=_now_ms(), event_type="rating", label=1.0)])
        after = _wait_until(lambda: (r := h.rank(1, k=10, exclude_seen=True)).history_length
                            == before.history_length + 1 and r, timeout_s=30, what="the event applied")
        assert top not in [it.item_id for it in after.items]
        assert [it.item_id for it in after.items] != [it.item_id for it in before.items]
    finally:
        h.close()


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
