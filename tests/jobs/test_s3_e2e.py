"""Artifacts on object storage, end to end against real processes: Spark features -> training of both models ->
gate -> publish to s3:// on an S3-compatible server (moto_server) -> a gRPC server that loads the bundle from
its s3:// URI (confined to an s3:// root, credentials named in its config) answers Rank; the features reader
reads the same features from s3:// as from disk.

Spark writes the features locally (writing s3a:// needs the hadoop-aws jars, which the pinned pyspark does not
ship): the pipeline stages them in its workdir, and this test uploads them to read them back through fsspec."""
from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from features import storage
from tests.jobs.test_pipeline_e2e import RANKER_SMALL
from tests.retrieval.conftest import TINY
from tests.serving.conftest import Harness, serving_overrides, unique_topics

pytestmark = pytest.mark.integration


def test_features_train_publish_to_s3_and_serve_from_the_uri(ml100k_dataset, s3_server, s3_bucket, tmp_path,
                                                             monkeypatch):
    from features.reader import FeatureStore, ReaderConfig
    from jobs.pipeline import FeaturesStage, GateConfig, PipelineConfig, PublishConfig, TrainStage, read_published, run_pipeline
    from jobs.services import LocalServices, create_topics
    from serving.app import ServingApp, load_serving_config
    from serving.bootstrap import bootstrap_dataset
    from serving.catalog import load_catalog

    art = f"{s3_bucket}/artifacts"
    cfg = PipelineConfig(
        dataset=str(ml100k_dataset), artifacts=art, workdir=str(tmp_path / "work"),
        features=FeaturesStage(spark_master="local[2]",
                               overrides=("spark.shuffle_partitions=4", "spark.driver_memory=2g", "report.plot=false")),
        retriever=TrainStage(configs=("retrieval/configs/ml-100k.yaml",), overrides=(*TINY, "train.epochs=1")),
        # a few ranker steps: this test is about where the artifacts go, not about the model's quality
        ranker=TrainStage(configs=("ranking/configs/ml-100k.yaml",),
                          overrides=(*RANKER_SMALL, "train.max_steps_per_epoch=8")),
        gate=GateConfig(min_auc=0.0),
        publish=PublishConfig(announce=False),
    )
    res = run_pipeline(cfg, "v1", print)  # the stage lines show on a failure
    assert res.passed and res.published, res.reasons

    # published to the object store: the bundle's objects, its manifest, then the pointer and the history
    bundle_uri = f"{art}/versions/v1/bundle"
    pub = read_published(art)
    assert res.bundle == pub["bundle"] == bundle_uri and pub["version"] == "v1"
    manifest = json.loads(storage.read_text(f"{bundle_uri}/manifest.json"))
    assert storage.list_files(bundle_uri) == sorted([*manifest["files"], "manifest.json"])
    assert storage.sha256(f"{bundle_uri}/manifest.json") == pub["checksum"]
    assert [json.loads(line)["version"] for line in storage.read_text(f"{art}/history.jsonl").splitlines()] == ["v1"]
    run_manifest = json.loads(storage.read_text(f"{art}/versions/v1/manifest.json"))
    assert {s: r["status"] for s, r in run_manifest["stages"].items()} == dict.fromkeys(
        ("features", "retriever", "ranker", "evaluate", "publish"), "done")
    assert storage.is_file(f"{art}/versions/v1/evaluation.json")
    assert not (tmp_path / "work" / "published.json").exists()  # the pointer lives on the object store only

    # the reader: the same features read from s3:// and from disk give the same batches
    fdir = run_manifest["stages"]["features"]["dir"]
    storage.upload_tree(fdir, f"{s3_bucket}/features/ml-100k")
    local, remote = FeatureStore(fdir), FeatureStore(f"{s3_bucket}/features/ml-100k")
    assert remote.manifest == local.manifest
    rc = ReaderConfig(batch_size=256, shuffle=False)
    for split, batches in (("test", lambda s: s.ranking_batches("test", rc)),
                           ("test", lambda s: s.retrieval_batches("test", rc, max_len=50))):
        a, b = next(iter(batches(local))), next(iter(batches(remote)))
        assert np.array_equal(a.labels.numpy(), b.labels.numpy())
        assert np.array_equal(a.candidates.values().numpy(), b.candidates.values().numpy()), split

    # a real server loads the published bundle from its s3:// URI (only s3://.../artifacts is allowed)
    s3_cfg, environ = s3_server
    for k, v in environ.items():
        monkeypatch.setenv(k, v)  # the server reads the credentials from the variables its config names
    catalog = load_catalog(ml100k_dataset)
    with LocalServices(tmp_path / "svc") as svc:
        topics = unique_topics()
        create_topics(svc.kafka.address, {topics.events: 1, topics.items: 1, topics.models: 1, topics.dead_letter: 1})
        scfg = load_serving_config(None, serving_overrides(
            svc, topics, f"s3e2e{uuid.uuid4().hex[:8]}",
            **{"models.allow_any_root": "false", "models.allowed_roots": json.dumps([art + "/"]),
               "models.initial_bundle": pub["bundle"], "models.cache_dir": str(tmp_path / "bundle-cache"),
               "storage.endpoint_url": s3_cfg.endpoint_url, "storage.access_key_env": s3_cfg.access_key_env,
               "storage.secret_key_env": s3_cfg.secret_key_env}), env={})
        app = ServingApp(scfg, catalog)
        bootstrap_dataset(app.store, ml100k_dataset, scfg.state, catalog)
        app.start(wait_for_partitions_s=15.0)
        h = Harness(app, topics, svc.kafka.address)
        try:
            reply = h.rank(1, k=10)
            assert reply.model_version == "v1" and len(reply.items) == 10
            assert (tmp_path / "bundle-cache" / pub["checksum"] / "manifest.json").is_file()
        finally:
            h.close()
