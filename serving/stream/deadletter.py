"""The dead-letter topic: malformed, rejected or poison messages with why and where from (features/messages.py).

Each dead letter is a bounded prefix of the original value (at most `MAX_VALUE_BYTES`; a value
that was None is sent as b"" with header ``value_null``) and of the key, plus headers ``reason``
(a short code), ``detail`` (readable), ``source_topic``, ``source_partition``, ``source_offset``,
``value_bytes`` (the original size) and ``truncated``. Whatever the source message was, its dead
letter is small enough for any broker, so sending it cannot fail on the message itself.

`send` never raises; a send the producer refused or that failed in flight makes the next `flush`
raise `DeadLetterUnavailable`, so the events consumer does not commit offsets past a message
whose dead letter was not written (it retries the batch instead).
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

MAX_VALUE_BYTES = 64 * 1024  # features.messages.MAX_MESSAGE_BYTES: anything decodable is kept whole
MAX_KEY_BYTES = 1024
MAX_HEADER_BYTES = 1000


class DeadLetterUnavailable(Exception):
    """The dead-letter topic did not take a message (broker down, topic missing)."""


def _bounded(b: Any, limit: int) -> tuple[bytes | None, int]:
    """(a prefix of at most `limit` bytes, the original length); None stays None."""
    if b is None:
        return None, 0
    if isinstance(b, str):
        b = b.encode("utf-8", "replace")
    elif not isinstance(b, (bytes, bytearray, memoryview)):
        b = repr(b).encode("utf-8", "replace")
    n = len(b)
    return bytes(b[:limit]), n


def _header(v: Any) -> bytes:
    return str(v).encode("utf-8", "replace")[:MAX_HEADER_BYTES]


def dead_letter_record(msg: Any, reason: str, detail: str) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """(value, key, headers) of the dead letter of `msg` (a ConsumerRecord: topic, partition, offset, key, value)."""
    value, n = _bounded(getattr(msg, "value", None), MAX_VALUE_BYTES)
    key, _ = _bounded(getattr(msg, "key", None), MAX_KEY_BYTES)
    headers = [
        ("reason", _header(reason)),
        ("detail", _header(detail)),
        ("source_topic", _header(getattr(msg, "topic", "?"))),
        ("source_partition", _header(getattr(msg, "partition", -1))),
        ("source_offset", _header(getattr(msg, "offset", -1))),
        ("value_bytes", _header(n)),
        ("truncated", b"1" if n > MAX_VALUE_BYTES else b"0"),
    ]
    if value is None:
        headers.append(("value_null", b"1"))
    return (value if value is not None else b""), key, headers


class DeadLetters:
    def __init__(self, bootstrap: str, topic: str, metrics: ServingMetrics, client_id: str = "cascade-serving",
                 **producer_options: Any) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.metrics = metrics
        # max_block_ms: a missing topic or broker must not hold a consumer for kafka-python's default minute
        opts = dict(acks="all", linger_ms=5, max_block_ms=10_000, client_id=f"{client_id}-dlq")
        opts.update(producer_options)
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, **opts)
        self._lock = threading.Lock()  # the consumers share one producer
        self._futures: list[Any] = []
        self._failed: list[str] = []

    def send(self, msg: Any, reason: str, detail: str) -> None:
        """Queues the dead letter of `msg` (never raises; see `flush`)."""
        topic, part, off = getattr(msg, "topic", "?"), getattr(msg, "partition", -1), getattr(msg, "offset", -1)
        try:
            value, key, headers = dead_letter_record(msg, reason, detail)
            fut = self._producer.send(self.topic, value=value, key=key, headers=headers)
            with self._lock:
                self._futures.append(fut)
        except Exception as e:
            with self._lock:
                self._failed.append(f"{topic}[{part}]@{off}: {type(e).__name__}: {e}")
            log.error("dead letter of %s[%s]@%s not sent: %s", topic, part, off, e)
        self.metrics.events_dead_lettered.labels(topic=str(topic), reason=reason).inc()
        log.warning("dead-lettered %s[%s]@%s: %s: %s", topic, part, off, reason, str(detail)[:300])

    def flush(self, timeout_s: float = 30.0) -> None:
        """Waits for the queued dead letters; raises `DeadLetterUnavailable` if any was not written."""
        with self._lock:
            futures, self._futures = self._futures, []
            failed, self._failed = self._failed, []
        if futures:
            try:
                self._producer.flush(timeout=timeout_s)
            except Exception as e:
                failed.append(f"flush: {type(e).__name__}: {e}")
            for f in futures:
                if not f.is_done:
                    failed.append("not acknowledged in time")
                elif f.failed():
                    failed.append(f"{type(f.exception).__name__}: {f.exception}")
        if failed:
            raise DeadLetterUnavailable(f"{len(failed)} dead letter(s) to {self.topic} not written: {failed[0]}")

    def close(self) -> None:
        try:
            self.flush()
        except DeadLetterUnavailable as e:
            log.error("%s", e)
        self._producer.close(timeout=5)
