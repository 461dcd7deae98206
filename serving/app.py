"""The composition root of the ranking server: config in, every part wired, graceful shutdown.

This is the only serving module that reads files or the environment for
configuration (`load_serving_config`): defaults <- YAML <- environment
(`ENV_OVERRIDES`) <- ``--set key=value`` flags. `ServingApp` builds the parts
(Redis store, catalog, model holder and manager, runtime, gRPC server with the
interceptor, health and reflection, Prometheus endpoint, Kafka consumers,
popularity refresher) and stops them in the reverse order.

Shutdown (SIGTERM / SIGINT via `serve_forever`): health -> NOT_SERVING, stop
accepting and drain in-flight requests for `grpc.shutdown_grace_s`, stop the
consumers (each commits after every applied batch, so they stop between
batches with nothing uncommitted), flush the dead letters, log the totals,
close the metrics endpoint and Redis.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from features import storage
from features.config import dump_config, load_config, parse_overrides
from serving.catalog import ItemCatalog, load_catalog
from serving.config import ServingConfig
from serving.errors import StateUnavailable
from serving.heap import settle_heap
from serving.item_features import ItemDenseCache
from serving.lifecycle import ItemUpdater, ModelManager
from serving.metrics import ServingMetrics
from serving.models import ModelHolder, check_model_roots
from serving.rebuild import EpochPositions, StateRebuilder
from serving.runtime import Availability, CatalogRef, Popularity, Runtime
from serving.security import add_server_port, kafka_client_kwargs, redacted
from serving.state.redis_store import RedisOnlineStore

log = logging.getLogger(__name__)

# Environment variables the server reads (only here), and the config key each sets.
ENV_OVERRIDES: dict[str, str] = {
    "CASCADE_REDIS_URL": "redis.url",
    "CASCADE_KAFKA_BOOTSTRAP": "kafka.bootstrap",
    "CASCADE_GRPC_ADDRESS": "grpc.address",
    "CASCADE_PROBE_ADDRESS": "grpc.probe_address",
    "CASCADE_METRICS_ADDRESS": "metrics.address",
    "CASCADE_MODEL_BUNDLE": "models.initial_bundle",
}
# Secrets (from Kubernetes Secrets): taken verbatim as strings, never parsed as YAML, never logged.
SECRET_ENV: dict[str, str] = {
    "CASCADE_REDIS_USERNAME": "redis.username",
    "CASCADE_REDIS_PASSWORD": "redis.password",
    "CASCADE_KAFKA_SASL_USERNAME": "kafka.sasl.username",
    "CASCADE_KAFKA_SASL_PASSWORD": "kafka.sasl.password",
}


def load_serving_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                        env: Mapping[str, str] | None = None) -> ServingConfig:
    """defaults <- YAML file <- environment variables <- key=value overrides (the last wins)."""
    env = os.environ if env is None else env
    from_env = [f"{key}={env[var]}" for var, key in ENV_OVERRIDES.items() if env.get(var)]
    from_env += [f"{key}={json.dumps(env[var], ensure_ascii=False)}" for var, key in SECRET_ENV.items() if env.get(var)]
    for ov in overrides:
        parse_overrides([ov])  # a malformed override fails here with its text
    return load_config(ServingConfig, path, [*from_env, *overrides])


@dataclass
class Addresses:
    grpc: str
    metrics: str | None
    probe: str | None = None  # the health-only probe server (grpc.probe_address)


class ServingApp:
    """Everything of one server process. `start()` returns once it listens; `stop()` is graceful."""

    def __init__(self, cfg: ServingConfig, catalog: ItemCatalog | None = None) -> None:
        check_model_roots(cfg.models)  # no announced bundle from just any directory
        storage.configure(cfg.storage, os.environ)  # s3:// bundle URIs: endpoint, credentials named in the config
        self.cfg = cfg
        self.metrics = ServingMetrics()
        self.store = RedisOnlineStore(cfg.redis)
        self.catalog = CatalogRef(catalog if catalog is not None else
                                  (load_catalog(cfg.catalog) if cfg.catalog else ItemCatalog.empty()))
        self.models = ModelHolder()
        self.availability = Availability()
        self.popularity = Popularity()
        self.manager = ModelManager(self.models, self.catalog, cfg.state, cfg.models, self.metrics)
        self.items = ItemUpdater(self.models, self.catalog, self.metrics)
        # notices an empty Redis and rebuilds the state; `rebuilder.rebuilding` is True meanwhile
        self.rebuilder = (StateRebuilder(cfg.rebuild, self.store, cfg.state, self.catalog, self.models, self.metrics)
                          if cfg.rebuild.enabled else None)
        self.item_dense = ItemDenseCache(self.store)
        self.runtime = Runtime(cfg.limits, cfg.runtime, self.store, self.models, self.catalog, self.popularity,
                               self.availability, self.metrics, self.item_dense)
        self.server = None
        self._probe_server = None
        self.health = None
        self.consumers: list = []
        self.dead_letters = None
        self._metrics_http = None
        self._stop_evt = threading.Event()
        self._threads: list[threading.Thread] = []
        self.addresses: Addresses | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait_for_partitions_s: float = 0.0) -> "ServingApp":
        import grpc
        import torch
        from grpc_health.v1 import health, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from serving.health import HealthMonitor
        from serving.interceptors import bounded_server
        from serving.proto import ranking_pb2_grpc
        from serving.servicer import SERVICE_NAME, RankingServicer

        cfg = self.cfg
        torch.set_num_threads(cfg.runtime.torch_threads)
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the scrape for nothing we alert on
        log.info("serving config:\n%s", dump_config(redacted(cfg)))
        if cfg.models.initial_bundle is not None:
            self.manager.load(cfg.models.initial_bundle)
        if self.rebuilder is not None:  # an empty Redis is rebuilt before anything reads or writes it
            self.rebuilder.check()
            self.rebuilder.start()
        self.refresh_popularity()
        t = threading.Thread(target=self._popularity_loop, name="popularity", daemon=True)
        t.start()
        self._threads.append(t)
        if cfg.runtime.item_stats == "cached":
            self.refresh_item_features()
            t = threading.Thread(target=self._item_features_loop, name="item-features", daemon=True)
            t.start()
            self._threads.append(t)

        reuseport = ("grpc.so_reuseport", 1 if cfg.grpc.processes > 1 else 0)
        self.server = bounded_server(  # load shedding: at most max_in_flight calls accepted (serving/interceptors.py)
            self.metrics, cfg.grpc.max_workers, cfg.grpc.max_in_flight,
            options=[("grpc.max_receive_message_length", cfg.grpc.max_receive_message_bytes),
                     ("grpc.max_send_message_length", 16 << 20), reuseport],
        )
        ranking_pb2_grpc.add_RankingServicer_to_server(
            RankingServicer(self.runtime, self.models, self.catalog, cfg.grpc.default_deadline_s), self.server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        if cfg.grpc.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        port = add_server_port(self.server, cfg.grpc.address, cfg.grpc.tls)  # TLS / mutual TLS when configured
        if port == 0:
            raise RuntimeError(f"gRPC could not bind {cfg.grpc.address} (in use?)")
        host = cfg.grpc.address.rpartition(":")[0]
        probe_addr = None
        if cfg.grpc.probe_address:  # health only, its own threads and no bound: probes are never shed
            self._probe_server = grpc.server(futures.ThreadPoolExecutor(2, thread_name_prefix="probe"),
                                             options=[reuseport])
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._probe_server)
            pport = self._probe_server.add_insecure_port(cfg.grpc.probe_address)
            if pport == 0:
                raise RuntimeError(f"gRPC could not bind grpc.probe_address {cfg.grpc.probe_address} (in use?)")
            probe_addr = f"{cfg.grpc.probe_address.rpartition(':')[0]}:{pport}"
        self.health = HealthMonitor(health_servicer, SERVICE_NAME, self.store, self.models, self.availability,
                                    self.metrics, cfg.redis.health_interval_s)
        if self.rebuilder is not None:  # full health (not readiness) while Redis holds no state epoch
            rb = self.rebuilder
            self.health.add_check("state", lambda: "being rebuilt after Redis came back empty" if rb.rebuilding else None)
        self.health.start()
        metrics_addr = None
        if cfg.metrics.enabled:
            from prometheus_client import start_http_server

            mhost, _, mport = cfg.metrics.address.rpartition(":")
            httpd, _ = start_http_server(int(mport), addr=mhost, registry=self.metrics.registry)
            self._metrics_http = httpd
            metrics_addr = f"{mhost}:{httpd.server_port}"
        self._start_consumers(wait_for_partitions_s)
        self.server.start()
        if self._probe_server is not None:
            self._probe_server.start()
        self.addresses = Addresses(f"{host}:{port}", metrics_addr, probe_addr)
        # what this process serves is loaded: out of full collections from now on, and again after each swap
        gen0 = cfg.runtime.gc_gen0_threshold
        settle_heap(gen0)
        self.models.on_swap(lambda b: settle_heap(gen0, f"model {b.version}"))
        log.info("serving cascade.v1.Ranking on %s (metrics %s), model %s", self.addresses.grpc,
                 metrics_addr or "off", self.models.current.version if self.models.current else "none yet")
        return self

    def _start_consumers(self, wait_s: float) -> None:
        k = self.cfg.kafka
        if not (k.consume_events or k.consume_items or k.consume_models):
            return
        from serving.stream.broadcast import ItemsReader, ModelsReader
        from serving.stream.deadletter import DeadLetters
        from serving.stream.events import EventApplier, EventsConsumer

        self.dead_letters = DeadLetters(k.bootstrap, k.topics.dead_letter, self.metrics, k.client_id,
                                        **kafka_client_kwargs(k))  # SASL / SSL
        if k.consume_models:
            self.consumers.append(ModelsReader(k, self.manager, self.dead_letters))
        if k.consume_items:
            self.consumers.append(ItemsReader(k, self.items, self.dead_letters))
        if k.consume_events:
            applier = EventApplier(self.cfg.state, self.store, self.catalog, self.models, self.metrics,
                                   self.dead_letters, self.cfg.redis.item_log_prune_bytes)
            events = EventsConsumer(k, applier, self.metrics, self.dead_letters)
            if self.rebuilder is not None:
                events.positions = EpochPositions(self.rebuilder, applier, self.metrics)
            self.consumers.append(events)
        for c in self.consumers:
            c.start()
        deadline = time.monotonic() + wait_s
        for c in self.consumers:
            ev = getattr(c, "ready", None) or getattr(c, "caught_up", None)
            if ev is not None and wait_s > 0:
                ev.wait(max(0.0, deadline - time.monotonic()))

    def refresh_popularity(self) -> None:
        try:
            ids, counts = self.store.top_items(self.cfg.runtime.popularity_size)
        except StateUnavailable as e:
            log.warning("popularity not refreshed: %s", e)
            return
        if len(ids):
            self.popularity.set(ids, counts)

    def refresh_item_features(self) -> None:
        bundle = self.models.current
        if bundle is None or not self.availability.redis_up or bundle.ranker.second_stage:
            return  # a second stage reads its list's features, never the counters: nothing to refresh
        try:
            self.item_dense.refresh(self.catalog.current, bundle.dense)
        except StateUnavailable as e:
            log.warning("item features not refreshed (requests read Redis until they are): %s", e)

    def _item_features_loop(self) -> None:
        while not self._stop_evt.wait(self.cfg.runtime.item_stats_refresh_s):
            self.refresh_item_features()

    def _popularity_loop(self) -> None:
        while not self._stop_evt.wait(self.cfg.runtime.popularity_refresh_s):
            self.refresh_popularity()

    def stop(self, grace_s: float | None = None) -> None:
        grace = self.cfg.grpc.shutdown_grace_s if grace_s is None else grace_s
        self._stop_evt.set()
        if self.rebuilder is not None:
            self.rebuilder.stop()
        if self.health is not None:
            self.health.shutdown()
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1.0)  # stop accepting, let in-flight requests finish
        if self._probe_server is not None:
            self._probe_server.stop(0)
        self.runtime.close()
        for c in self.consumers:
            c.stop()
        for c in self.consumers:
            c.join(timeout=10.0)
        if self.dead_letters is not None:
            self.dead_letters.close()
        for c in self.consumers:
            totals = getattr(c, "totals", None)
            if totals is not None:
                log.info("events consumer totals: %s", totals)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.store.close()
        log.info("server stopped")

    def serve_forever(self) -> int:
        """Blocks until SIGTERM/SIGINT, then stops gracefully. Returns the exit code."""
        got: list[int] = []

        def handler(signum: int, frame: object) -> None:
            got.append(signum)
            self._stop_evt.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        while not self._stop_evt.wait(0.5):
            for c in self.consumers:
                if getattr(c, "error", None) is not None and not c.is_alive():
                    log.error("%s died: %s; stopping the server", c.name, c.error)
                    self.stop()
                    return 1
        log.info("received %s: draining", signal.Signals(got[0]).name if got else "stop")
        self.stop()
        return 0


def _worker_main(cfg_dict: dict, index: int) -> None:
    """Entry point of the extra server processes of `serve` (spawned; rebuilds the config from a dict)."""
    import logging as _logging

    from features.config import from_mapping

    _logging.basicConfig(level=_logging.INFO, format=f"%(asctime)s %(levelname)s [server {index}] %(name)s: %(message)s",
                         force=True)  # importing fbgemm already installed a WARNING root handler
    _logging.getLogger("kafka").setLevel(_logging.WARNING)
    cfg = from_mapping(ServingConfig, cfg_dict)
    raise SystemExit(ServingApp(_process_config(cfg, index)).start().serve_forever())


def _process_config(cfg: ServingConfig, index: int) -> ServingConfig:
    import dataclasses

    if index == 0:
        return cfg
    host, _, port = cfg.metrics.address.rpartition(":")
    metrics = dataclasses.replace(cfg.metrics, address=f"{host}:{int(port) + index if int(port) else 0}")
    return dataclasses.replace(cfg, metrics=metrics)


def serve(cfg: ServingConfig, app: ServingApp | None = None, on_started=None) -> int:
    """Runs the server until SIGTERM (`grpc.processes` identical processes; this one is number 0)."""
    import multiprocessing

    from features.config import to_dict

    children = []
    if cfg.grpc.processes > 1:
        ctx = multiprocessing.get_context("spawn")
        children = [ctx.Process(target=_worker_main, args=(to_dict(cfg), i), name=f"cascade-serve-{i}", daemon=False)
                    for i in range(1, cfg.grpc.processes)]
        for c in children:
            c.start()
    app = app or ServingApp(cfg)
    try:
        app.start()
        if on_started is not None:
            on_started(app)
        rc = app.serve_forever()
    finally:
        for c in children:
            if c.is_alive():
                os.kill(c.pid, signal.SIGTERM)
        for c in children:
            c.join(cfg.grpc.shutdown_grace_s + 15)
            if c.is_alive():
                log.error("server process %s did not stop; killing it", c.pid)
                c.kill()
    return rc if all(c.exitcode in (0, None) for c in children) else 1
