"""serving.heap: what a serving process does to the garbage collector once its model is loaded."""
from __future__ import annotations

import gc

import pytest

from serving.config import RuntimeConfig
from serving.heap import settle_heap


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settling_freezes_what_is_alive_and_raises_the_young_threshold(restore_gc):
    gc.unfreeze()
    alive = [[i] for i in range(1000)]  # container objects: tracked by the collector
    settle_heap(5000)
    assert gc.get_freeze_count() >= len(alive)
    assert gc.get_threshold()[0] == 5000


def test_a_cycle_left_by_frozen_objects_is_collected_at_the_next_settling(restore_gc):
    class Node:
        pass

    import weakref

    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only the cyclic collector frees it
    gone = weakref.ref(a)
    settle_heap(5000)  # frozen while alive
    del a, b
    gc.collect()
    assert gone() is not None  # frozen garbage is not collected ...
    settle_heap(5000, "model swap")
    assert gone() is None  # ... until the next settling unfreezes and collects it


def test_zero_keeps_the_interpreters_collector(restore_gc):
    gc.unfreeze()
    before = gc.get_threshold()
    assert settle_heap(0) == 0.0
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


def test_the_config_refuses_a_negative_threshold():
    assert RuntimeConfig().gc_gen0_threshold > 700
    with pytest.raises(ValueError, match="gc_gen0_threshold"):
        RuntimeConfig(gc_gen0_threshold=-1)
