import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from features.schema import Event
from features.sequence import (
    SequenceConfig, SequenceState, action_code, append_event, category_id, fold_events,
)


def ev(i, ts, etype="click", label=1.0, user=1):
    return Event(f"e{i:04d}", user, 100 + i, ts, etype, label)


def test_append_keeps_time_order_and_cap():
    cfg = SequenceConfig(long_cap=3, short_cap=2)
    st_ = SequenceState.empty()
    for e in [ev(1, 10), ev(2, 30), ev(3, 20)]:  # 3 arrives late
        st_ = append_event(st_, e, 7, cfg)
    assert st_.item_ids.tolist() == [101, 103, 102] and st_.ts_ms.tolist() == [10, 20, 30]
    st_ = append_event(st_, ev(4, 40), 7, cfg)
    assert st_.item_ids.tolist() == [103, 102, 104]  # oldest dropped at the cap
    assert st_.short(2).item_ids.tolist() == [102, 104]
    assert append_event(st_, ev(5, 5), 7, cfg).item_ids.tolist() == [103, 102, 104]  # too old for a full sequence


def test_impressions_are_not_behaviors():
    cfg = SequenceConfig()
    s = append_event(SequenceState.empty(), ev(1, 10, "impression", 0.0), 0, cfg)
    assert len(s) == 0


def test_action_code_and_category():
    assert action_code("rating", 1.0) == 9 and action_code("rating", 0.0) == 8
    assert action_code("click", 1.0) == 5
    assert category_id([]) == 0 and category_id(None) == 0
    assert category_id(["Comedy", "Drama"]) == category_id(["Comedy"]) != category_id(["Drama"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from(["click", "impression", "rating"]), st.booleans()),
                max_size=40),
       st.integers(1, 10), st.randoms(use_true_random=False))
def test_incremental_equals_rebuild_from_scratch(rows, cap, rnd):
    """Applying events in any arrival order == the offline fold, when ties arrive in event_id order."""
    cfg = SequenceConfig(long_cap=cap, short_cap=1)
    events = [ev(i, ts, t, float(l)) for i, (ts, t, l) in enumerate(rows)]
    offline = fold_events(events, {}, cfg)
    # arrival order: any shuffle, except that equal timestamps arrive in event_id order (the producer contract)
    arrival = list(events)
    rnd.shuffle(arrival)
    by_ts: dict[int, list] = {}
    for e in sorted(arrival, key=lambda e: e.event_id):
        by_ts.setdefault(e.ts_ms, []).append(e)
    arrival = [by_ts[e.ts_ms].pop(0) for e in arrival]
    online = SequenceState.empty()
    for e in arrival:
        online = append_event(online, e, 0, cfg)
    assert online.equals(offline)


def test_config_validation():
    with pytest.raises(ValueError, match="short_cap=60 exceeds long_cap=50"):
        SequenceConfig(long_cap=50, short_cap=60)
    with pytest.raises(ValueError, match="not one of"):
        SequenceConfig(behavior_event_types=("teleport",))
