"""Standard gRPC health (grpc.health.v1) driven by what the server can actually do.

SERVING only when a model is loaded and Redis answers a PING; otherwise
NOT_SERVING (Kubernetes probes use this). The same probe tells the runtime when
Redis is back, so degraded answers stop by themselves (automatic recovery).
Both the overall status ("") and ``cascade.v1.Ranking`` are set.
"""
from __future__ import annotations

import logging
import threading

from grpc_health.v1 import health, health_pb2

from serving.metrics import ServingMetrics
from serving.models import ModelHolder
from serving.runtime import Availability
from serving.state.base import OnlineStore

log = logging.getLogger(__name__)


class HealthMonitor(threading.Thread):
    def __init__(self, servicer: health.HealthServicer, service_name: str, store: OnlineStore, models: ModelHolder,
                 availability: Availability, metrics: ServingMetrics, interval_s: float) -> None:
        super().__init__(name="health", daemon=True)
        self.servicer = servicer
        self.services = ("", service_name)
        self.store = store
        self.models = models
        self.availability = availability
        self.metrics = metrics
        self.interval_s = interval_s
        self._stop_evt = threading.Event()
        self._status: int | None = None
        self.check_now()

    def check_now(self) -> bool:
        redis_ok = self.store.ping()
        self.metrics.redis_up.set(1 if redis_ok else 0)
        if redis_ok:
            self.availability.up()
        else:
            self.availability.down("redis does not answer PING")
        serving = redis_ok and self.models.current is not None
        self._set(health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)
        return serving

    def _set(self, status: int) -> None:
        if status != self._status:
            for s in self.services:
                self.servicer.set(s, status)
            log.info("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            self._status = status

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval_s):
            self.check_now()

    def shutdown(self) -> None:
        """Stop probing and report NOT_SERVING (graceful shutdown: load balancers drain first)."""
        self._stop_evt.set()
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
