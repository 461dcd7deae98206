"""Micro-batching of the ranker: concurrent requests' ranker forwards run as one.

Every request builds its own ranker batch (one user, its candidates); handler
threads hand them to one `RankerBatcher`, whose worker takes the first waiting
request, then every other one already waiting (up to `max_batch`), waiting at
most `max_wait_ms` for more, concatenates the batches
(`features.batch.concat_batches`), runs the model once and hands each request
its rows of the scores. At concurrency 1 nothing waits (a lone request runs at
once unless `max_wait_ms` > 0); under load the requests that queued while the
model ran form the next batch, so one forward over B users replaces B forwards
competing for the same cores, and the per-operator overhead (hundreds of small
kernels per forward on the CPU) is paid once per batch.

Only requests the same model version answers, with the same feature keys and
dense widths and either all or none carrying SDIM bucket sums, share a forward;
the rest of the drained requests run in groups of their own. A model failure
fails exactly the requests of that forward (their handlers re-raise it); the
worker keeps running. ``cascade_ranker_batch_size`` counts the requests per
forward.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from features.batch import Batch, concat_batches

log = logging.getLogger(__name__)

Score = Callable[[Any, Batch], torch.Tensor]  # (ranker, batch) -> (N,) scores


@dataclass
class _Job:
    ranker: Any
    batch: Batch
    score: Score
    future: Future = field(default_factory=Future)

    def group(self) -> tuple:
        b = self.batch
        return (id(self.ranker), self.score, tuple(b.user.keys()), tuple(b.history.keys()),
                tuple(b.candidates.keys()), b.user_dense.shape[1], b.candidate_dense.shape[1], b.labels.shape[1],
                b.sdim_sums is None)


class RankerBatcher:
    """One worker thread running the ranker over the batches handler threads submit (`score`)."""

    def __init__(self, max_batch: int = 8, max_wait_ms: float = 0.0, observe: Callable[[int], None] | None = None,
                 name: str = "ranker-batcher") -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._observe = observe or (lambda n: None)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def score(self, ranker: Any, batch: Batch, score: Score) -> torch.Tensor:
        """`score(ranker, batch)` computed together with the other requests waiting now; blocks until done."""
        if self._closed:
            raise RuntimeError("the ranker batcher is closed")
        job = _Job(ranker, batch, score)
        self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        """Stops the worker after the requests already submitted."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the worker
    def _drain(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job, every job already waiting and those arriving within max_wait, up to max_batch."""
        jobs, stop = [first], False
        until = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            try:
                left = until - time.monotonic()
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._drain(first)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.group(), []).append(job)
            for group in groups.values():
                self._forward(group)
            if stop:
                return

    def _forward(self, jobs: list[_Job]) -> None:
        try:
            batch = concat_batches([j.batch for j in jobs])
            scores = jobs[0].score(jobs[0].ranker, batch)
            parts = torch.split(scores, [j.batch.total_candidates for j in jobs])
        except BaseException as e:  # noqa: BLE001 - the requests of this forward get the error, the worker lives
            if len(jobs) > 1:
                log.warning("a micro-batched ranker forward over %d requests failed (%s); running them one by one",
                            len(jobs), e)
                for j in jobs:  # a bad batch fails only its own request
                    self._forward([j])
                return
            jobs[0].future.set_exception(e)
            return
        self._observe(len(jobs))
        for job, part in zip(jobs, parts):
            job.future.set_result(part)
