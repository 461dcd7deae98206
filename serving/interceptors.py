"""The bounded gRPC server and its one interceptor: load shedding, metrics, error mapping.

* Load shedding happens where gRPC accepts calls, not after they have queued:
  `bounded_server` passes ``maximum_concurrent_rpcs = GrpcConfig.max_in_flight``
  to ``grpc.server``, so at most that many calls are accepted at once, queued for
  a handler thread or running (``max_workers`` run, the rest wait), and gRPC
  answers one more RESOURCE_EXHAUSTED at once, from its polling thread, without
  taking a handler thread. Queueing it would only make it miss its deadline
  (and make every request behind it slower). The bound counts every method of
  the server; the Kubernetes probes use a separate probe server
  (``grpc.probe_address``) so they are never shed.
* Metrics: ``cascade_rank_requests_total{method, status}``, ``cascade_requests_in_flight``
  (accepted: queued + running), ``cascade_requests_shed_total``. gRPC rejects
  over-limit calls without running any handler, but it asks the interceptor for
  the handler first (under its lock, right after counting the accepted calls);
  the interceptor reads the same count, kept by `HandlerPool`, and counts the
  call as shed. The count can miss a shed call in the microseconds between a
  finished call leaving `HandlerPool`'s count and gRPC's own, never count one
  that was not shed.
* Errors: a `serving.errors.ServingError` becomes its gRPC status with its
  message; anything else becomes INTERNAL (logged with the traceback; the
  client gets the exception type, not internals).
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any, Callable, Sequence

import grpc

from serving.errors import ServingError
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


class HandlerPool(futures.ThreadPoolExecutor):
    """gRPC's handler threads, counting the calls handed over and not finished yet (queued + running).

    gRPC submits a call here only after admitting it under ``maximum_concurrent_rpcs`` and counts it
    until its future is done; `accepted` is that same number."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "grpc") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._count_lock = threading.Lock()
        self.accepted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        with self._count_lock:
            self.accepted += 1
        try:
            fut = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, _fut: Any) -> None:
        with self._count_lock:
            self.accepted -= 1


class ServingInterceptor(grpc.ServerInterceptor):
    """Counts shed calls (see the module docstring), maps domain errors to statuses once, keeps the metrics."""

    def __init__(self, metrics: ServingMetrics, pool: HandlerPool, max_in_flight: int) -> None:
        self.metrics = metrics
        self.pool = pool
        self.max_in_flight = max_in_flight
        metrics.in_flight.set_function(lambda: pool.accepted)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED, answered by gRPC
        method = details.method.rsplit("/", 1)[-1]
        m = self.metrics
        if self.pool.accepted >= self.max_in_flight:  # gRPC rejects this call as soon as we return
            m.shed.inc()
            m.requests.labels(method=method, status="RESOURCE_EXHAUSTED").inc()
            return handler
        if handler.unary_unary is None:
            return handler  # streaming (Health.Watch, reflection): pass through
        inner = handler.unary_unary

        def wrapper(request: Any, context: Any) -> Any:
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
                m.requests.labels(method=method, status=status).inc()

        return grpc.unary_unary_rpc_method_handler(
            wrapper, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def bounded_server(metrics: ServingMetrics, max_workers: int, max_in_flight: int,
                   options: Sequence[tuple[str, Any]] = ()) -> grpc.Server:
    """A gRPC server with `max_workers` handler threads that accepts at most `max_in_flight` calls at once
    (queued + running) and answers any more RESOURCE_EXHAUSTED at once."""
    if not 0 < max_workers <= max_in_flight:
        raise ValueError(f"need 0 < max_workers ({max_workers}) <= max_in_flight ({max_in_flight})")
    pool = HandlerPool(max_workers)
    return grpc.server(pool, interceptors=[ServingInterceptor(metrics, pool, max_in_flight)], options=list(options),
                       maximum_concurrent_rpcs=max_in_flight)
