"""The dead-letter topic: malformed or rejected messages with why, where from (features/messages.py).

Each dead letter is the original bytes (and key) plus headers ``reason`` (a
short code), ``detail`` (readable), ``source_topic``, ``source_partition``,
``source_offset``. `flush` is called before the consumer commits the source
offsets, so a message is never committed without its dead letter written.
"""
from __future__ import annotations

import logging
from typing import Any

from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


class DeadLetters:
    def __init__(self, bootstrap: str, topic: str, metrics: ServingMetrics, client_id: str = "cascade-serving") -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.metrics = metrics
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, client_id=f"{client_id}-dlq")
        self._pending = 0

    def send(self, msg: Any, reason: str, detail: str) -> None:
        """`msg`: a kafka-python ConsumerRecord (topic, partition, offset, key, value)."""
        headers = [
            ("reason", reason.encode()),
            ("detail", detail.encode("utf-8", "replace")[:1000]),
            ("source_topic", msg.topic.encode()),
            ("source_partition", str(msg.partition).encode()),
            ("source_offset", str(msg.offset).encode()),
        ]
        self._producer.send(self.topic, value=msg.value, key=msg.key, headers=headers)
        self.metrics.events_dead_lettered.labels(topic=msg.topic, reason=reason).inc()
        self._pending += 1
        log.warning("dead-lettered %s[%d]@%d: %s: %s", msg.topic, msg.partition, msg.offset, reason, detail)

    def flush(self, timeout_s: float = 30.0) -> None:
        if self._pending:
            self._producer.flush(timeout=timeout_s)
            self._pending = 0

    def close(self) -> None:
        self.flush()
        self._producer.close(timeout=5)
