"""What keeps the consumers alive: backoff between retries and per-record failure counts.

Every consumer (events, items, models) runs its loop under the same rules:

* an unexpected error is logged, counted (``cascade_consumer_restarts_total{consumer}``) and retried
  after a backoff that doubles up to a cap (`Backoff`);
* the retry starts again at the first record not yet applied, so a record that breaks the code fails
  again at the same offset; once it has failed `KafkaConfig.max_record_failures` times in a row
  (`RecordFailures`) it is dead-lettered with reason ``consumer_error`` and skipped
  (``cascade_consumer_skipped_records_total{topic}``);
* the state store being down (`StateUnavailable`) or the dead-letter topic refusing writes
  (`DeadLetterUnavailable`) is nobody's record: retried with backoff for as long as it lasts, nothing skipped.

The gRPC handlers never wait on a consumer, so requests are answered throughout.
"""
from __future__ import annotations

from typing import Any


class Backoff:
    """Delays `first_s`, 2 `first_s`, 4 `first_s`, ... capped at `max_s`; `reset` after a success."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self._next = first_s

    def next(self) -> float:
        d = self._next
        self._next = min(self._next * 2.0, self.max_s)
        return d

    def reset(self) -> None:
        self._next = self.first_s


class RecordFailures:
    """Consecutive unexpected failures of the record at the head of each partition.

    Only the first unapplied record of a partition is ever retried, so one counter per partition
    suffices: a failure at another offset starts the count again, a success clears it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_partition: dict[tuple[str, int], tuple[int, int]] = {}  # (topic, partition) -> (offset, failures)

    def __bool__(self) -> bool:
        return bool(self._by_partition)

    def failed(self, msg: Any) -> int:
        """Counts one more failure of `msg` (a ConsumerRecord); returns its consecutive failures."""
        key = (msg.topic, msg.partition)
        off, n = self._by_partition.get(key, (msg.offset, 0))
        n = n + 1 if off == msg.offset else 1
        self._by_partition[key] = (msg.offset, n)
        return n

    def exhausted(self, msg: Any) -> bool:
        off, n = self._by_partition.get((msg.topic, msg.partition), (-1, 0))
        return off == msg.offset and n >= self.limit

    def succeeded(self, msg: Any) -> None:
        self._by_partition.pop((msg.topic, msg.partition), None)

    def failures(self, msg: Any) -> int:
        off, n = self._by_partition.get((msg.topic, msg.partition), (-1, 0))
        return n if off == msg.offset else 0


def describe(e: BaseException) -> str:
    """A bounded one-line description of an exception (dead-letter detail, logs)."""
    return f"{type(e).__name__}: {str(e)[:300]}"
