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


# ---------------------------------------------------------------------------------------------------------------
# The Redis store on a real redis-server and on a real three-master Redis Cluster (tests/conftest.py)

@pytest.fixture(scope="module")
def _single_redis(tmp_path_factory):
    from jobs.services import LocalServices

    with LocalServices(tmp_path_factory.mktemp("redis"), kafka=False) as svc:
        yield svc.redis


def _store_cfg(request, groups: int | None = None):
    import uuid

    from serving.config import RedisConfig

    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "single":
        return RedisConfig(url=request.getfixturevalue("_single_redis").address, key_prefix=prefix,
                           item_groups=groups or 1)
    return RedisConfig(url=request.getfixturevalue("redis_cluster").address, key_prefix=prefix, cluster=True,
                       item_groups=groups or 8)


@pytest.fixture(params=["single", "cluster"])
def store(request):
    """A RedisOnlineStore on its own key prefix, on one Redis and on a Redis Cluster."""
    from serving.state.redis_store import RedisOnlineStore

    s = RedisOnlineStore(_store_cfg(request))
    yield s
    s.flush_prefix()
    s.close()


def _applier(store, parts):
    from serving.metrics import ServingMetrics
    from serving.stream.events import EventApplier

    state, catalog, models = parts
    return EventApplier(state, store, catalog, models, ServingMetrics(), None)


def _msgs(events):
    """Kafka records as the consumer sees them (the fields EventApplier reads)."""
    import time
    from types import SimpleNamespace

    from features.messages import encode_event

    now = int(time.time() * 1000)
    return [SimpleNamespace(topic="events", partition=0, offset=i, timestamp=now, value=encode_event(e))
            for i, e in enumerate(events)]


def _stream(n: int, users: int = 7, items: int = 11, seed: int = 0, tag: str = "e"):
    """n events of a few users and items, in time order, stamped within the last hour."""
    import time

    rng = np.random.default_rng(seed)
    t0 = int(time.time() * 1000) - 3_600_000
    types = ["click", "impression", "rating", "purchase"]
    return [Event(f"{tag}{i:05d}", int(rng.integers(1, users + 1)), int(rng.integers(1, items + 1)), t0 + i * 1000,
                  types[int(rng.integers(0, len(types)))], float(rng.integers(0, 2))) for i in range(n)]


def _expected(events, state):
    """users' sequences, items' counted totals and popularity, from the events (each applied once)."""
    from collections import Counter, defaultdict

    counted = set(state.stats.counted_event_types())
    behaviors = set(state.sequence.behavior_event_types)
    seqs = defaultdict(list)
    for e in events:
        if e.event_type in behaviors:
            seqs[e.user_id].append(e.item_id)
    return (dict(seqs), Counter(e.item_id for e in events if e.event_type in counted),
            Counter(e.item_id for e in events if e.event_type in behaviors))


def _assert_state(store, events, state):
    seqs, counts, pop = _expected(events, state)
    for u, items in seqs.items():
        assert store.read_user(u).seq.item_ids.tolist() == items[-state.sequence.long_cap:], f"user {u}"
    ids = np.array(sorted(counts), np.int64)
    assert dict(zip(ids.tolist(), store.read_item_stats(ids).total_cnt.tolist())) == dict(counts)
    top_ids, top_counts = store.top_items(1000)
    assert dict(zip(top_ids.tolist(), top_counts.tolist())) == dict(pop)


def test_ingest_writes_users_items_and_popularity_and_a_redelivery_is_a_no_op(store, applier_parts):
    events = _stream(300)
    a = _applier(store, applier_parts)
    for s in range(0, len(events), 64):  # poll batches
        out = a.apply(_msgs(events[s:s + 64]))
        assert out.applied == len(events[s:s + 64]) and out.conflicts == 0
    _assert_state(store, events, applier_parts[0])
    before = {u: store._slow.get(store.keys.user(u)) for u in range(1, 8)}
    out = a.apply(_msgs(events[100:250]))  # redelivered from an older offset
    assert (out.applied, out.deduplicated) == (0, 150)
    assert {u: store._slow.get(store.keys.user(u)) for u in range(1, 8)} == before
    _assert_state(store, events, applier_parts[0])


def test_a_user_written_by_another_consumer_meanwhile_is_recomputed_not_overwritten(store, applier_parts):
    from serving.state.redis_store import RedisOnlineStore

    mine, theirs = _stream(40, users=3, tag="m"), _stream(10, users=3, seed=1, tag="o")
    other = _applier(RedisOnlineStore(store.cfg), applier_parts)  # another consumer's connection
    calls = []
    inner = store.ingest

    def racing(events, fn, **kw):
        def fn_once_raced(states, seen):
            if not calls:  # between our read and our write, another consumer applies its events
                other.apply(_msgs(theirs))
            calls.append(1)
            return fn(states, seen)
        return inner(events, fn_once_raced, **kw)

    store.ingest = racing
    out = _applier(store, applier_parts).apply(_msgs(mine))
    store.ingest = inner
    assert out.conflicts >= 1 and out.applied == 40 and len(calls) == 1 + out.conflicts
    seqs, counts, pop = _expected(theirs + mine, applier_parts[0])
    for u in seqs:  # both consumers' events, each once (order: theirs landed first)
        got = store.read_user(u).seq.item_ids.tolist()
        assert sorted(got) == sorted(seqs[u][-applier_parts[0].sequence.long_cap:]), f"user {u}"
    ids = np.array(sorted(counts), np.int64)
    assert dict(zip(ids.tolist(), store.read_item_stats(ids).total_cnt.tolist())) == dict(counts)


def test_ingest_for_another_epoch_writes_nothing(store, applier_parts):
    from serving.state.base import EpochChanged

    assert store.create_epoch("e1", {"snapshot": "s"}, replace=False)
    a = _applier(store, applier_parts)
    a.epoch = "e0"
    with pytest.raises(EpochChanged, match="e0"):
        a.apply(_msgs(_stream(20)))
    assert all(store.read_user(u) is None for u in range(1, 8))
    assert store.top_items(10)[0].size == 0 and store.read_item_stats(np.arange(1, 12)).total_cnt.sum() == 0
    a.epoch = "e1"
    assert a.apply(_msgs(_stream(20))).applied == 20


def test_pruning_folds_old_item_records_and_keeps_the_totals(store):
    logs = {i: encode_item_log(np.array([1, 2, 40 * DAY, 41 * DAY], np.int64), np.array([1, 0, 1, 1], np.uint8))
            for i in range(1, 20)}
    store.put_item_logs(logs)
    ids = np.arange(1, 20)
    before = store.read_item_stats(ids)
    assert store.prune_item_logs(ids.tolist(), 35 * DAY) == 2 * 19
    after = store.read_item_stats(ids)
    assert after.total_cnt.tolist() == before.total_cnt.tolist() == [4] * 19 and len(after.ts_ms) == 2 * 19
    assert store.prune_item_logs(ids.tolist(), 35 * DAY) == 0


def test_bulk_loaded_marks_make_those_events_redeliveries(store, applier_parts):
    events = _stream(50)
    store.put_users({u: UserRecord.empty() for u in range(1, 8)})
    assert store.put_marks([e.user_id for e in events[:30]], [e.event_id for e in events[:30]]) == 30
    out = _applier(store, applier_parts).apply(_msgs(events))
    assert (out.applied, out.deduplicated) == (20, 30)
    with pytest.raises(ValueError, match="parallel"):
        store.put_marks([1], ["a", "b"])


def test_epoch_lock_offsets_and_flush_keep_what_a_rebuild_needs(store):
    assert store.get_epoch() is None and store.create_epoch("a", {"k": "v"}, replace=False)
    assert not store.create_epoch("b", {}, replace=False) and store.get_epoch() == "a"
    assert store.create_epoch("c", {"k": "w"}, replace=True) and store.get_epoch() == "c"
    assert store.get_meta()["k"] == "w"
    assert store.acquire_rebuild_lock("tok", 30) and not store.acquire_rebuild_lock("other", 30)
    assert store.set_applied_offsets({"t:0": (None, 5)}) == {}
    assert store.set_applied_offsets({"t:0": (4, 9)}) == {"t:0": 5}
    store.set_partition_epochs({"t:0": "c"})
    assert store.partition_epochs(["t:0", "t:1"]) == {"t:0": "c"} and store.applied_offsets(["t:0"]) == {"t:0": 5}
    store.put_users({u: UserRecord.empty() for u in range(100)})
    assert store.flush_prefix(keep=("rebuild_lock",)) >= 100 + 4
    assert store.get_epoch() is None and store.read_user(1) is None
    assert not store.acquire_rebuild_lock("other", 30)  # kept
    store.release_rebuild_lock("tok")
    assert store.acquire_rebuild_lock("other", 30)
    assert store.ping() and store.instance_id() == store.instance_id()


@pytest.mark.parametrize("groups", [1, 5])
def test_top_items_merges_the_item_groups_in_popularity_order(request, groups):
    from serving.state.redis_store import RedisOnlineStore

    for kind in ("single", "cluster"):
        request.param = kind
        s = RedisOnlineStore(_store_cfg(request, groups))
        try:
            s.add_popularity({i: float(i % 7 + (i == 3) * 100) for i in range(1, 40)})
            ids, counts = s.top_items(10)
            assert ids[0] == 3 and counts[0] == 103 and counts.tolist() == sorted(counts.tolist(), reverse=True)
            assert ids.tolist()[1:4] == [6, 34, 27]  # count 6: ties by member descending (as strings), like ZREVRANGE
        finally:
            s.flush_prefix()
            s.close()
