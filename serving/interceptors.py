"""Cross-cutting concerns of the gRPC server, in one interceptor: load shedding, metrics, error mapping.

* Load shedding: at most `GrpcConfig.max_in_flight` ranking requests are handled
  at once; one more is rejected at once with RESOURCE_EXHAUSTED (queueing it
  would only make it miss its deadline). Health and reflection are never shed.
* Metrics: ``cascade_rank_requests_total{method, status}``, ``cascade_requests_in_flight``,
  ``cascade_requests_shed_total``.
* Errors: a `serving.errors.ServingError` becomes its gRPC status with its
  message; anything else becomes INTERNAL (logged with the traceback; the
  client gets the exception type, not internals).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import grpc

from serving.errors import ServingError
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


class ServingInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServingMetrics, max_in_flight: int, shed_prefix: str = "/cascade.v1.Ranking/") -> None:
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.shed_prefix = shed_prefix
        self._slots = threading.BoundedSemaphore(max_in_flight)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming (Health.Watch, reflection): pass through
        method = details.method.rsplit("/", 1)[-1]
        shed = details.method.startswith(self.shed_prefix)
        inner = handler.unary_unary
        m = self.metrics

        def wrapper(request: Any, context: Any) -> Any:
            if shed and not self._slots.acquire(blocking=False):
                m.shed.inc()
                m.requests.labels(method=method, status="RESOURCE_EXHAUSTED").inc()
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server overloaded: {self.max_in_flight} requests already in flight; retry with backoff")
            m.in_flight.inc()
            status = "OK"
            try:
                return inner(request, context)
            except ServingError as e:
                status = e.status
                context.abort(grpc.StatusCode[e.status], e.message)
            except Exception as e:
                status = "INTERNAL"
                log.exception("%s failed", details.method)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); see the server log")
            finally:
                m.in_flight.dec()
                if shed:
                    self._slots.release()
                m.requests.labels(method=method, status=status).inc()

        return grpc.unary_unary_rpc_method_handler(
            wrapper, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
