"""Online state without services: the packed layout, the ingest transitions and the windowed counters."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from features.schema import Event
from features.sequence import SequenceConfig, SequenceState, append_event, fold_events
from features.transforms import StatsConfig
from serving.state.codec import (
    CounterLog, StateDecodeError, UserAttrs, UserRecord, decode_item_logs, decode_user, encode_item_log, encode_user,
    prune_item_log, summary_records,
)
from serving.state.stats import window_counters
from serving.state.update import EventArrays, apply_user_batch, apply_user_events, extend_log
from tests.serving.conftest import format1_value

DAY = 86_400_000


def _rec(n: int, sigs: bool = True) -> UserRecord:
    rng = np.random.default_rng(n)
    seq = SequenceState(rng.integers(-5, 10**12, n), np.sort(rng.integers(0, 10**12, n)), rng.integers(0, 18, n),
                        rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64))
    log = CounterLog(np.sort(rng.integers(0, 10**12, 7)), rng.integers(0, 2, 7).astype(np.uint8), 40, 11)
    return UserRecord(seq, log, UserAttrs({"user_attr_gender": (123, -4)}, {"age": 31.0}),
                      rng.integers(0, 2**40, n) if sigs else None, 987654321 if sigs else 0)


@pytest.mark.parametrize("n, sigs", [(0, False), (1, True), (10_000, True), (37, False)])
def test_user_record_round_trips(n, sigs):
    rec = _rec(n, sigs)
    got = decode_user(encode_user(rec))
    assert got.seq.equals(rec.seq) and got.sig_spec == rec.sig_spec
    assert (got.sigs is None) == (rec.sigs is None) and (rec.sigs is None or np.array_equal(got.sigs, rec.sigs))
    assert np.array_equal(got.log.ts_ms, rec.log.ts_ms) and np.array_equal(got.log.pos, rec.log.pos)
    assert (got.log.total_cnt, got.log.total_pos) == (40, 11)
    assert got.attrs == rec.attrs
    assert got.seq.item_ids.flags.writeable  # torch.from_numpy needs writable memory


def test_truncated_or_foreign_values_fail_naming_the_key():
    blob = encode_user(_rec(5))
    with pytest.raises(StateDecodeError, match=r"cascade:v1:u:7: .* the header says"):
        decode_user(blob[:-3], where="cascade:v1:u:7")
    with pytest.raises(StateDecodeError, match="bad magic"):
        decode_user(b"X" * 60, where="k")
    with pytest.raises(StateDecodeError, match="shorter than"):
        decode_user(b"CSU1", where="k")


def test_format_1_values_still_decode_and_compare_by_hash_format_2_by_generation():
    import hashlib

    from serving.state.codec import GEN_OFFSET, HEADER_BYTES, cas_token

    rec = _rec(9)
    a, b = encode_user(rec), encode_user(rec)
    assert a[4] == 2 and a != b and a[:GEN_OFFSET] == b[:GEN_OFFSET] and a[HEADER_BYTES:] == b[HEADER_BYTES:]
    assert cas_token(a) == a[GEN_OFFSET:HEADER_BYTES] != cas_token(b) and len(cas_token(a)) == 8
    assert encode_user(rec, gen=bytes(8)) == encode_user(rec, gen=bytes(8))
    v1 = format1_value(a)
    got = decode_user(v1)
    assert got.seq.equals(rec.seq) and np.array_equal(got.sigs, rec.sigs) and got.attrs == rec.attrs
    assert cas_token(v1) == hashlib.sha1(v1).hexdigest().encode() and cas_token(None) == b""
    with pytest.raises(ValueError, match="8"):
        encode_user(rec, gen=b"x")


def _events(rows, user=1):
    return [Event(f"e{i:04d}", user, item, ts, etype, float(label)) for i, (item, ts, etype, label) in enumerate(rows)]


event_rows = st.lists(st.tuples(st.integers(1, 3), st.integers(1, 30), st.integers(0, 40),
                                st.sampled_from(["click", "impression", "rating"]), st.booleans()), max_size=40)


@settings(max_examples=200, deadline=None)
@given(event_rows, st.integers(1, 8), st.integers(1, 6), st.randoms(use_true_random=False))
def test_the_consumer_transition_equals_folding_append_event(rows, cap, batch, rnd):
    """`apply_user_batch` fed as the consumer feeds it (`EventApplier.apply`: one `EventArrays` per poll batch,
    each user's events a span of it, or a selection when a redelivery brought events applied before), over any
    split into poll batches and any arrival order (in time order or not, equal timestamps, past the cap) ==
    folding `append_event` event by event in arrival order == the offline fold (ties arrive in event_id
    order); the signatures follow the sequence and the counter log has every counted event once."""
    cfg, stats = SequenceConfig(long_cap=cap, short_cap=1), StatsConfig()
    counted = frozenset(stats.counted_event_types())
    events = [Event(f"e{i:04d}", u, item, ts, etype, float(lab)) for i, (u, item, ts, etype, lab) in enumerate(rows)]
    arrival = sorted(events, key=lambda e: (rnd.random(), e.event_id))
    arrival = sorted(arrival, key=lambda e: (e.ts_ms, e.event_id)) if rnd.random() < 0.5 else _tie_ordered(arrival)
    sig = lambda ids: np.asarray(ids, np.int64) * 10 + 1  # noqa: E731 - a stand-in signature table
    recs: dict[int, UserRecord] = {}
    refs: dict[int, SequenceState] = {}
    applied: list[Event] = []
    for s in range(0, len(arrival), batch):
        new = arrival[s:s + batch]
        polled = new + rnd.sample(applied, min(len(applied), rnd.randint(0, 2)))  # a redelivery brings old ones
        rnd.shuffle(polled)
        by_user: dict[int, list[Event]] = {}
        for e in sorted(polled, key=lambda e: new.index(e) if e in new else -1):  # new ones in arrival order
            by_user.setdefault(e.user_id, []).append(e)
        flat = [e for evs in by_user.values() for e in evs]
        arrays = EventArrays.of_events(flat, lambda items: items * 7, cfg.behavior_event_types, counted)
        cuts = np.cumsum([0, *map(len, by_user.values())]).tolist()
        spans = arrays.spans(cuts)
        seen = {e.event_id for e in applied}
        for k, (u, evs) in enumerate(by_user.items()):
            keep = np.array([e.event_id not in seen for e in evs], bool)
            if not keep.any():
                continue
            ub = spans[k] if keep.all() else arrays.select(cuts[k] + np.flatnonzero(keep))
            recs[u] = apply_user_batch(recs.get(u, UserRecord.empty()), ub, cfg, 365 * DAY, 5, sig)
            for e in (e for e, x in zip(evs, keep) if x):
                refs[u] = append_event(refs.get(u, SequenceState.empty()), e, e.item_id * 7, cfg)
            assert recs[u].seq.equals(refs[u]), f"user {u}"
            assert recs[u].sigs.tolist() == sig(recs[u].seq.item_ids).tolist() and recs[u].sig_spec == 5
        applied += new
    for u, rec in recs.items():
        mine = [e for e in arrival if e.user_id == u]
        assert rec.seq.equals(fold_events(mine, {e.item_id: e.item_id * 7 for e in mine}, cfg)), f"user {u}"
        assert rec.log.ts_ms.tolist() == [e.ts_ms for e in mine if e.event_type in counted]
        assert rec.log.pos.tolist() == [int(e.label >= 0.5) for e in mine if e.event_type in counted]
        assert (rec.log.total_cnt, rec.log.total_pos) == (len(rec.log), int(rec.log.pos.sum()))


def _tie_ordered(events):
    """Keeps the shuffled order but puts equal timestamps in event_id order (the producer contract)."""
    by_ts: dict[int, list] = {}
    for e in events:
        by_ts.setdefault(e.ts_ms, []).append(e)
    for v in by_ts.values():
        v.sort(key=lambda e: e.event_id)
    return [by_ts[e.ts_ms].pop(0) for e in events]


def test_signatures_follow_the_sequence_and_are_rebuilt_for_another_model():
    cfg, stats = SequenceConfig(long_cap=4, short_cap=1), StatsConfig()
    sig = lambda ids: np.asarray(ids, np.int64) * 10 + 1  # noqa: E731 - a stand-in signature table
    rec = UserRecord.empty()
    rec = apply_user_events(rec, _events([(i, i, "click", 1) for i in range(1, 4)]), [0] * 3, cfg, stats, DAY, 5, sig)
    assert rec.sigs.tolist() == [11, 21, 31] and rec.sig_spec == 5
    rec = apply_user_events(rec, _events([(i, i, "click", 1) for i in range(4, 7)]), [0] * 3, cfg, stats, DAY, 5, sig)
    assert rec.seq.item_ids.tolist() == [3, 4, 5, 6] and rec.sigs.tolist() == [31, 41, 51, 61]
    other = lambda ids: np.asarray(ids, np.int64) * 100  # noqa: E731 - a new model's signatures
    rec = apply_user_events(rec, _events([(7, 7, "click", 1)]), [0], cfg, stats, DAY, 6, other)
    assert rec.sigs.tolist() == [400, 500, 600, 700] and rec.sig_spec == 6
    rec = apply_user_events(rec, _events([(8, 8, "click", 1)]), [0], cfg, stats, DAY, 0, None)
    assert rec.sigs is None and rec.sig_spec == 0


def _brute(ts, pos, t, windows_ms):
    out = []
    for ms in windows_ms:
        m = (ts < t) if ms is None else (ts >= t - ms) & (ts < t)
        out += [int(m.sum()), int(pos[m].sum())]
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60 * DAY), st.booleans()), max_size=60), st.integers(0, 70 * DAY))
def test_window_counters_from_a_pruned_log_equal_brute_force(rows, t_off):
    """Counters at any t within the retention of the newest event == counting the raw events."""
    stats = StatsConfig()
    retention = 31 * DAY
    ts = np.array([r[0] for r in rows], np.int64)
    pos = np.array([r[1] for r in rows], np.uint8)
    log = CounterLog.empty()
    for s in range(0, len(rows), 7):  # arrives in poll batches
        log = extend_log(log, ts[s:s + 7], pos[s:s + 7], retention)
    newest = int(ts.max()) if len(ts) else 0
    t = max(t_off, newest - retention + 30 * DAY)  # at least 30d (the longest window) inside the retention
    got = window_counters("user", stats, t, log.ts_ms, log.pos, np.zeros(len(log), np.int64),
                          np.array([log.total_cnt]), np.array([log.total_pos]))
    want = _brute(ts, pos, t, stats.window_ms())
    assert [int(got[k][0]) for k in got] == want


def test_item_logs_fold_old_events_into_summary_records():
    ts = np.array([1, 5, 10 * DAY, 40 * DAY, 41 * DAY], np.int64)
    pos = np.array([1, 0, 1, 1, 0], np.uint8)
    blob = encode_item_log(ts, pos)
    pruned, folded = prune_item_log(blob, 35 * DAY)
    assert folded == 3
    again, folded2 = prune_item_log(pruned + encode_item_log(np.array([80 * DAY]), np.array([1])), 50 * DAY)
    assert folded2 == 2
    ts2, pos2, owner, cnt, posc = decode_item_logs([blob, pruned, again, None, summary_records(0, 0)])
    assert cnt.tolist() == [5, 5, 6, 0, 0] and posc.tolist() == [3, 3, 4, 0, 0]
    assert ts2[owner == 1].tolist() == [40 * DAY, 41 * DAY] and ts2[owner == 2].tolist() == [80 * DAY]
    stats = StatsConfig()
    t = 42 * DAY
    a = window_counters("item", stats, t, ts2, pos2, owner, cnt, posc)
    assert a["item_cnt_30d"][:2].tolist() == [2, 2] and a["item_cnt_all"][:2].tolist() == [5, 5]
    assert prune_item_log(pruned, 35 * DAY) is None
    with pytest.raises(StateDecodeError, match="not a multiple of 9"):
        decode_item_logs([b"12345"])

