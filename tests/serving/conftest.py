"""Serving fixtures: model bundles from the real exporters (once per session), real tansu + redis-server per
module, and a real in-process gRPC server per test with its own topics, consumer group and key prefix."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from features.messages import KafkaTopics

REPO = Path(__file__).resolve().parents[2]
# The ML-100K configurations the pipeline trains, made small: the serving tests check plumbing, not quality.
RETRIEVER_SMALL = ["model.dim=16", "model.user.max_len=20", "model.user.num_heads=2", "model.user.num_layers=1",
                   "index.kind=flat"]
# The full ranker (DARE's decoupled attention/representation tables, SDIM long-term interest, a 4-expert
# AW-MoE): SDIM so that the server's signatures-at-ingest path runs.
RANKER_SMALL = ["model.embedding.dim=16", "model.embedding.attention_dim=8", "model.sequence.long=sdim",
                "model.sequence.long_len=200", "model.moe.expert_hidden=[32]", "model.moe.gate_hidden=16"]


def write_real_bundle(catalog, out: Path, version: str, seed: int, second_stage: bool = False,
                      context=None, retriever_vectors: bool = False, retriever_similarity: int = 0,
                      item_item=None, item_item_history: int = 10) -> tuple[Path, str]:
    """`jobs.random_bundle.write_random_bundle` with the ML-100K configs made small (RETRIEVER_SMALL,
    RANKER_SMALL). second_stage: the ranker is `ranking/configs/two-stage.yaml`'s, its zero-initialised heads
    randomised so that it reorders the list; with `context` it also reads the list's context features, with
    `retriever_vectors` the retriever's per-dimension logit terms, with `retriever_similarity` the retriever-space
    similarities to the last behaviors, with `item_item` the item-item model's features over the last
    `item_item_history` behaviors."""
    from jobs.random_bundle import RandomBundleSpec, write_random_bundle

    spec = RandomBundleSpec(retriever_overrides=tuple(RETRIEVER_SMALL),
                            ranker_configs=("ranking/configs/ml-100k.yaml", "ranking/configs/ablations/full.yaml",
                                            *(("ranking/configs/two-stage.yaml",) if second_stage else ())),
                            ranker_overrides=tuple(RANKER_SMALL), second_stage=second_stage,
                            randomize_heads_std=2.0 if second_stage else 0.0, retriever_vectors=retriever_vectors,
                            retriever_similarity=retriever_similarity, item_item_history=item_item_history)
    return write_random_bundle(catalog, out, version, seed, spec, context, item_item)


@pytest.fixture(scope="session")
def model_bundles(catalog, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{version: (bundle dir, manifest sha256)} for v1 and v2: real exports of randomly initialised real models
    (v2 another seed, so other weights and other answers)."""
    root = tmp_path_factory.mktemp("models")
    return {v: write_real_bundle(catalog, root, v, seed) for seed, v in enumerate(("v1", "v2"))}


@pytest.fixture(scope="module")
def applier_parts(ml100k_dataset):
    """(StateConfig, CatalogRef, ModelHolder) for an `EventApplier` in the store tests."""
    from serving.catalog import load_catalog
    from serving.config import StateConfig
    from serving.models import ModelHolder
    from serving.runtime import CatalogRef

    return StateConfig(), CatalogRef(load_catalog(ml100k_dataset)), ModelHolder()


@pytest.fixture(scope="session")
def catalog(ml100k_dataset: Path):
    from serving.catalog import load_catalog

    return load_catalog(ml100k_dataset)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory):
    """Real tansu + redis-server on free loopback ports, shared by a module's tests (isolated by prefix/topics)."""
    from jobs.services import LocalServices

    with LocalServices(tmp_path_factory.mktemp("svc")) as svc:
        yield svc


def unique_topics() -> KafkaTopics:
    u = uuid.uuid4().hex[:8]
    return KafkaTopics(events=f"events-{u}", items=f"items-{u}", models=f"models-{u}", dead_letter=f"dlq-{u}")


def serving_overrides(svc, topics: KafkaTopics, prefix: str, **extra: object) -> list[str]:
    ov = {
        "redis.url": svc.redis.address, "redis.key_prefix": prefix, "redis.health_interval_s": 0.2,
        "kafka.bootstrap": svc.kafka.address, "kafka.topics.events": topics.events, "kafka.topics.items": topics.items,
        "kafka.topics.models": topics.models, "kafka.topics.dead_letter": topics.dead_letter,
        "kafka.events_group": f"g-{prefix}", "kafka.session_timeout_ms": 2000, "kafka.heartbeat_interval_ms": 200,
        "kafka.poll_timeout_ms": 50, "grpc.address": "127.0.0.1:0", "metrics.address": "127.0.0.1:0",
        "runtime.popularity_refresh_s": 0.5,
        "models.allow_any_root": "true",  # tests load bundles from tmp dirs; a test of the roots sets its own
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


class Harness:
    """A started ServingApp plus a channel/stub to it and a producer to its topics."""

    def __init__(self, app, topics: KafkaTopics, bootstrap: str) -> None:
        import grpc

        from serving.proto import ranking_pb2_grpc

        self.app = app
        self.topics = topics
        self.bootstrap = bootstrap
        self.channel = grpc.insecure_channel(app.addresses.grpc)
        self.stub = ranking_pb2_grpc.RankingStub(self.channel)
        self._producer = None

    @property
    def producer(self):
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=1)
        return self._producer

    def rank(self, user_id: int, k: int = 10, **kw):
        from serving.proto import ranking_pb2

        return self.stub.Rank(ranking_pb2.RankRequest(user_id=user_id, k=k, **kw), timeout=10)

    def send_events(self, events) -> None:
        from features.messages import encode_event, event_key

        for e in events:
            self.producer.send(self.topics.events, key=event_key(e), value=encode_event(e))
        self.producer.flush()

    def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.producer.send(topic, key=key, value=value)
        self.producer.flush()

    def metric(self, name: str, labels: dict | None = None) -> float:
        v = self.app.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def close(self) -> None:
        self.channel.close()
        if self._producer is not None:
            self._producer.close(timeout=5)
        self.app.stop(grace_s=1.0)


def _wait_until(pred, timeout_s: float = 20.0, interval_s: float = 0.05, what: str = "condition"):
    """Polls `pred` until it returns a truthy value (returned) or fails the test after `timeout_s`.

    A bound for eventually-consistent effects (Kafka -> Redis), not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s}s")
        time.sleep(interval_s)


@pytest.fixture()
def wait_until():
    """wait_until(pred, timeout_s=20, what=...): poll until pred() is truthy (returned) or fail the test."""
    return _wait_until


@pytest.fixture()
def make_server(services, model_bundles, catalog, ml100k_dataset):
    """Factory: make_server(bootstrap=True, bundle="v1", **overrides) -> Harness (stopped at teardown)."""
    from jobs.services import create_topics
    from serving.app import ServingApp, load_serving_config
    from serving.bootstrap import bootstrap_dataset

    made: list[Harness] = []

    def make(bootstrap: bool = True, bundle: str | None = "v1", consume: bool = True, **overrides: object) -> Harness:
        topics = unique_topics()
        create_topics(services.kafka.address, {topics.events: 2, topics.items: 1, topics.models: 1, topics.dead_letter: 1})
        prefix = f"t{uuid.uuid4().hex[:10]}"
        extra = dict(overrides)
        if bundle is not None:
            extra["models.initial_bundle"] = str(model_bundles[bundle][0])
        if not consume:
            extra.update({"kafka.consume_events": False, "kafka.consume_items": False, "kafka.consume_models": False})
        cfg = load_serving_config(None, serving_overrides(services, topics, prefix, **extra), env={})
        app = ServingApp(cfg, catalog)
        if bootstrap:
            bootstrap_dataset(app.store, ml100k_dataset, cfg.state, catalog)
        app.start(wait_for_partitions_s=15.0)
        h = Harness(app, topics, services.kafka.address)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture(scope="module")
def _single_redis(tmp_path_factory):
    """One real redis-server on a free loopback port for a module's store tests (isolated by key prefix)."""
    from jobs.services import LocalServices

    with LocalServices(tmp_path_factory.mktemp("redis"), kafka=False) as svc:
        yield svc.redis


def applier(store, parts):
    """An `EventApplier` over `store`; parts: (StateConfig, CatalogRef, ModelHolder) (`applier_parts`)."""
    from serving.metrics import ServingMetrics
    from serving.stream.events import EventApplier

    state, catalog, models = parts
    return EventApplier(state, store, catalog, models, ServingMetrics(), None)


def kafka_records(events):
    """Kafka records of `events` as the consumer sees them (the fields EventApplier reads)."""
    from types import SimpleNamespace

    from features.messages import encode_event

    now = int(time.time() * 1000)
    return [SimpleNamespace(topic="events", partition=0, offset=i, timestamp=now, value=encode_event(e))
            for i, e in enumerate(events)]


def format1_value(blob: bytes) -> bytes:
    """A format-2 user value as a format-1 writer (before generations) stored it: version byte 1, no generation."""
    from serving.state.codec import GEN_OFFSET, HEADER_BYTES

    return blob[:4] + b"\x01" + blob[5:GEN_OFFSET] + blob[HEADER_BYTES:]
