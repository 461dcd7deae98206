"""Standard gRPC health (grpc.health.v1) that matches the degraded-answer design: three questions, three names.

==========================  ================================================  ==========================
service name                SERVING while                                     used by
==========================  ================================================  ==========================
``cascade.v1.Ranking/live`` the process runs (until it exits)                 liveness probe
``""``, ``cascade.v1.Ranking``  the server can answer Rank: a model is loaded  readiness / startup probes
                            (Redis down -> popularity answers, still SERVING)
``cascade.v1.Ranking/full`` readiness and every dependency is healthy: Redis  alerts, dashboards, humans
                            answers PING, the ANN index has items and its last
                            search worked, and every check added with
                            `add_check` passes
==========================  ================================================  ==========================

Readiness deliberately ignores Redis: when Redis is down the runtime answers
from the in-memory popularity list and says so (``fallback_reason``,
``cascade_degraded_answers_total``), and those answers must reach clients
through the Kubernetes Service. Graceful shutdown turns readiness and full
health NOT_SERVING (load balancers drain first); liveness stays SERVING.

The same probe tells the runtime when Redis is back (`Availability.up`), so
degraded answers stop by themselves. Each status is also the gauge
``cascade_health_serving{check="live|ready|full"}``.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from grpc_health.v1 import health, health_pb2

from serving.metrics import ServingMetrics
from serving.models import ModelHolder
from serving.runtime import Availability
from serving.state.base import OnlineStore

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A full-health check: returns None when healthy, else what is wrong (shown in the log).
Check = Callable[[], str | None]


def live_service(service_name: str) -> str:
    return f"{service_name}/live"


def full_service(service_name: str) -> str:
    return f"{service_name}/full"


class HealthMonitor(threading.Thread):
    """Probes the dependencies every `interval_s` and sets the statuses on every given health servicer
    (the main gRPC server's and, when configured, the probe server's)."""

    def __init__(self, servicers: health.HealthServicer | Iterable[health.HealthServicer], service_name: str,
                 store: OnlineStore, models: ModelHolder, availability: Availability, metrics: ServingMetrics,
                 interval_s: float) -> None:
        super().__init__(name="health", daemon=True)
        self.servicers = [servicers] if isinstance(servicers, health.HealthServicer) else list(servicers)
        self.ready_services = ("", service_name)
        self.live_service = live_service(service_name)
        self.full_service = full_service(service_name)
        self.store = store
        self.models = models
        self.availability = availability
        self.metrics = metrics
        self.interval_s = interval_s
        self._checks: list[tuple[str, Check]] = []
        self._stop_evt = threading.Event()
        self._lock = threading.Lock()  # check_now runs in this thread and in callers (tests, shutdown)
        self._status: dict[str, int] = {}
        self.problems: list[str] = []  # why full health is NOT_SERVING ([] when SERVING)
        self._set("live", (self.live_service,), SERVING)
        self.check_now()

    def add_check(self, name: str, check: Check) -> None:
        """Adds a condition of full health (readiness is unaffected), e.g. "state rebuilding"."""
        with self._lock:
            self._checks.append((name, check))

    def check_now(self) -> bool:
        """Probes once; returns readiness (whether the server can answer Rank)."""
        with self._lock:
            if self._stop_evt.is_set():
                return False
            redis_ok = self.store.ping()
            self.metrics.redis_up.set(1 if redis_ok else 0)
            if redis_ok:
                self.availability.up()
            else:
                self.availability.down("redis does not answer PING")
            bundle = self.models.current
            ready = bundle is not None
            problems = [] if ready else ["no model loaded"]
            if not redis_ok:
                problems.append("redis does not answer PING")
            if bundle is not None and len(bundle.index) == 0:
                problems.append("the ANN index is empty")
            if self.availability.index_error:
                problems.append(f"the last ANN search failed ({self.availability.index_error})")
            for name, check in self._checks:
                try:
                    p = check()
                except Exception as e:  # a broken check is a problem, not a dead health thread
                    p = f"check failed: {type(e).__name__}: {e}"
                if p:
                    problems.append(f"{name}: {p}")
            self.problems = problems
            self._set("ready", self.ready_services, SERVING if ready else NOT_SERVING)
            self._set("full", (self.full_service,), NOT_SERVING if problems else SERVING, "; ".join(problems))
            return ready

    def _set(self, check: str, services: tuple[str, ...], status: int, why: str = "") -> None:
        self.metrics.health_serving.labels(check=check).set(1 if status == SERVING else 0)
        if self._status.get(check) == status:
            return
        for servicer in self.servicers:
            for s in services:
                servicer.set(s, status)
        self._status[check] = status
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        log.info("health: %s %s%s", name, check, f" ({why})" if why else "")

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval_s):
            self.check_now()

    def shutdown(self) -> None:
        """Stop probing; readiness and full health -> NOT_SERVING (load balancers drain first), liveness stays."""
        with self._lock:
            self._stop_evt.set()
            self._set("ready", self.ready_services, NOT_SERVING, "shutting down")
            self._set("full", (self.full_service,), NOT_SERVING, "shutting down")
