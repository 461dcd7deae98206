"""Python's cyclic garbage collector in a serving process.

A full (generation 2) collection traverses every container object the process
tracks. After startup most of them are long-lived and never garbage: the model
bundle's modules and parameters, the catalog, imported modules (~450k objects
for the ML-1M bundle). The events consumer allocates a few container objects
per event (decoded events, per-user lists and records) that outlive the young
collections of their batch, so with Python's defaults a full collection runs
about once a second and takes ~150-200 ms of GIL time each: a fifth of the
consumer's wall time on ML-1M (results/serving/serving-ml1m-stop20-consumer-gc0.json:
17 full collections, 3.35 s of a 16 s backlog), and a pause for every request meanwhile.

`settle_heap` is called once a process has loaded what it serves (and again
after every model swap): one full collection, then `gc.freeze()` moves every
surviving object to the permanent generation, which later collections skip
(~10 ms instead of ~150 ms). The young-generation threshold is raised from
700 to `RuntimeConfig.gc_gen0_threshold` allocations, so that a batch's
objects are collected a few times per batch rather than hundreds (one young
collection then takes ~0.7 ms).

What a frozen object costs: nothing while it is alive, and reference counting
still frees it when the last reference goes (a swapped-out model's tensors are
freed as before). Only garbage *cycles* among frozen objects wait, until the
next `settle_heap` unfreezes and collects them first.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle_heap(gen0_threshold: int, reason: str = "startup") -> float:
    """Collects everything, freezes what survives, sets the young-generation threshold (0: Python's default,
    no freezing either: the process keeps the interpreter's behavior). Returns the seconds it took."""
    if gen0_threshold <= 0:
        return 0.0
    t0 = time.perf_counter()
    gc.unfreeze()  # cycles left by objects frozen last time (a swapped-out model) are collectable again
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, g1, g2)
    dt = time.perf_counter() - t0
    log.info("heap settled (%s): %d objects frozen in %.0f ms, young-generation threshold %d",
             reason, gc.get_freeze_count(), dt * 1e3, gen0_threshold)
    return dt
