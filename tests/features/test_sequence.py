import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from features.schema import EVENT_TYPE_NAMES, Event, EventType
from features.sequence import (
    SequenceConfig, SequenceState, action_code, action_codes, append_behaviors, append_event, category_id, fold_events,
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
@given(st.lists(st.tuples(st.sampled_from(EVENT_TYPE_NAMES),
                          st.one_of(st.floats(width=32), st.sampled_from([0.0, 0.5, 0.4999, 1.0]))),
                max_size=20))
def test_action_codes_equal_action_code_elementwise(rows):
    types, labels = [t for t, _ in rows], np.array([x for _, x in rows], np.float64)
    want = [action_code(t, x) for t, x in rows]
    for given_types in (types, np.array(types, object), np.array(types, str)):
        got = action_codes(given_types, labels)
        assert got.dtype == np.int64 and got.tolist() == want
    codes = np.array([EventType.parse(t).value for t in types], np.int32)
    assert action_codes(codes, labels.astype(np.float32)).tolist() == want
    assert action_codes(types, (labels >= 0.5).astype(np.uint8)).tolist() == want  # labels given as 0/1


def test_action_codes_reject_unknown_types_and_mismatched_lengths():
    with pytest.raises(ValueError, match="not one of"):
        action_codes(["click", "CLICK"], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 event types but 1 labels"):
        action_codes(["click", "rating"], [1.0])


def test_in_order_behaviors_are_appended_at_once_and_late_ones_inserted():
    cfg = SequenceConfig(long_cap=3, short_cap=1)

    def arrays(*rows):  # (item, ts)
        return (np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.int64),
                np.full(len(rows), 5, np.int64), np.zeros(len(rows), np.int64))

    s, in_order = append_behaviors(SequenceState.empty(), *arrays((1, 10), (2, 20)), cfg)
    assert in_order and s.item_ids.tolist() == [1, 2]
    s, in_order = append_behaviors(s, *arrays((3, 20), (4, 30)), cfg)  # a tie with the newest: still in order
    assert in_order and s.item_ids.tolist() == [2, 3, 4]  # capped from the front
    s, in_order = append_behaviors(s, *arrays((5, 25), (6, 15)), cfg)  # 6: older than all of a full sequence
    assert not in_order and s.item_ids.tolist() == [3, 5, 4] and s.ts_ms.tolist() == [20, 25, 30]
    assert append_behaviors(s, *arrays(), cfg) == (s, True)


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
