"""Nothing a producer sends stops the server or corrupts its state.

End to end against real tansu, redis-server and the gRPC server: poisoned records on each of the three
topics are dead-lettered with their reason while Rank keeps answering and later good records are applied;
a record that makes the code fail (a fault injected around the real applier / updater) is retried, then
dead-lettered and skipped, with the consumer thread alive throughout. Unit tests cover the pieces: dead
letters of any message, backoff and per-record failure counts, pruning bounded by the wall clock."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from features.messages import ModelAnnouncement, encode_event, encode_item
from features.schema import Event, Item
from features.sequence import SequenceConfig
from features.transforms import StatsConfig
from serving.state.codec import CounterLog, UserRecord
from serving.state.update import apply_user_events, extend_log, prune_cutoff
from serving.stream.deadletter import MAX_VALUE_BYTES, dead_letter_record
from serving.stream.supervise import Backoff, RecordFailures

DAY = 86_400_000
LIVE_TS = 893_286_700_000  # just after the last ML-100K event


def _now_ms() -> int:
    return int(time.time() * 1000)


def _good(eid: str, user: int = 3, item: int = 50, ts: int = LIVE_TS) -> bytes:
    return encode_event(Event(eid, user, item, ts, "click", 1.0))


HOSTILE_EVENTS: list[tuple[bytes | None, str]] = [
    (None, "tombstone"),
    (b"", "empty"),
    (b'{"x":"' + b"a" * (3 << 20) + b'"}', "too_large"),  # a few MB
    (b'{"event_id":"d","context":' + b"[" * 3000 + b"]" * 3000 + b"}", "too_deep"),
    (_good("big-number").replace(b'"label":1.0', b'"label":1' + b"0" * 5000), "number_too_large"),
    (_good("huge-int-label").replace(b'"label":1.0', b'"label":1' + b"0" * 400), "number_too_large"),  # > any float
    (_good("inf-label").replace(b'"label":1.0', b'"label":1e999'), "invalid_field"),
    (_good("caps").replace(b'"click"', b'"CLICK"'), "unknown_event_type"),
    (_good("surrogate").replace(b'"surrogate"', b'"\\ud800"'), "invalid_string"),
    (b"\xff\xfe\x00garbage", "not_json"),
    (_good("future", ts=4_102_444_800_000), "ts_in_future"),  # 2100-01-01
    (_good("seconds", ts=893_286_700), "ts_too_old"),  # seconds written as milliseconds
]


def _dead_letters(bootstrap: str, topic: str, n: int) -> list[dict]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=15_000,
                      max_partition_fetch_bytes=8 << 20, fetch_max_bytes=16 << 20)
    got = []
    try:
        for m in c:
            got.append({k: v.decode() for k, v in m.headers} | {"value": m.value, "key": m.key})
            if len(got) >= n:
                break
    finally:
        c.close()
    return got


def _big_producer(bootstrap: str):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1, max_request_size=8 << 20)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.integration
def test_poisoned_events_are_dead_lettered_and_good_ones_still_applied(make_server, wait_until):
    h = make_server()
    before = h.rank(3, k=5)
    p = _big_producer(h.bootstrap)
    try:
        for value, _ in HOSTILE_EVENTS:
            p.send(h.topics.events, key=b"3", value=value)
        p.send(h.topics.events, key=None, value=_good("fine-after-poison"))  # no key: still an event
        p.flush()
    finally:
        p.close()
    wait_until(lambda: h.metric("cascade_events_applied_total") == 1, what="the good event after the poison applied")
    after = h.rank(3, k=5)
    assert after.history_length == before.history_length + 1 and after.fallback_reason == ""
    consumer = next(c for c in h.app.consumers if c.name == "events-consumer")
    assert consumer.is_alive() and consumer.restarts == 0  # rejections are data, not errors

    got = _dead_letters(h.bootstrap, h.topics.dead_letter, len(HOSTILE_EVENTS))
    assert sorted(g["reason"] for g in got) == sorted(r for _, r in HOSTILE_EVENTS)
    for g in got:
        assert g["source_topic"] == h.topics.events and g["source_offset"].isdigit() and g["detail"]
        assert len(g["value"]) <= MAX_VALUE_BYTES
    big = next(g for g in got if g["reason"] == "too_large")
    assert big["truncated"] == "1" and int(big["value_bytes"]) > 3 << 20 and big["value"].startswith(b'{"x":"aaa')
    assert next(g for g in got if g["reason"] == "tombstone")["value_null"] == "1"
    for _, reason in HOSTILE_EVENTS:
        assert h.metric("cascade_events_dead_lettered_total", {"topic": h.topics.events, "reason": reason}) >= 1


@pytest.mark.integration
def test_a_far_future_event_neither_lands_nor_prunes_real_history(make_server, wait_until):
    h = make_server()
    now = _now_ms()
    real = [Event(f"real-{i}", 7, 100 + i, now - (20 - i) * DAY, "click", 1.0) for i in range(5)]
    h.send_events(real)
    wait_until(lambda: h.metric("cascade_events_applied_total") == 5, what="5 recent events applied")
    log_before = h.app.store.read_user(7).log
    h.send_raw(h.topics.events, _good("from-2100", user=7, ts=4_102_444_800_000), key=b"7")
    h.send_events([Event("real-next", 7, 200, now, "click", 1.0)])
    wait_until(lambda: h.metric("cascade_events_applied_total") == 6, what="the next real event applied")
    rec = h.app.store.read_user(7)
    assert rec.log.ts_ms.tolist() == log_before.ts_ms.tolist() + [now]  # nothing pruned, nothing from 2100
    assert int(rec.seq.ts_ms.max()) == now
    assert h.metric("cascade_events_dead_lettered_total", {"topic": h.topics.events, "reason": "ts_in_future"}) == 1


@pytest.mark.integration
def test_poisoned_items_are_dead_lettered_and_a_later_item_is_added(make_server, wait_until):
    from serving.proto import ranking_pb2

    h = make_server()
    n0 = h.stub.GetModelInfo(ranking_pb2.GetModelInfoRequest()).num_items
    hostile = [
        (None, "tombstone"),
        (b'{"item_id":' + b"9" * 5000 + b"}", "number_too_large"),
        (b'{"item_id":5001,"attributes":["ab"]}', "invalid_field"),  # dict(["ab"]) would be {"a": "b"}
        (b'{"item_id":5002,"numeric":{"year":1e999}}', "invalid_field"),
        (b'{"item_id":5003,"categories":' + b"[" * 50 + b"]" * 50 + b"}", "too_deep"),
        (b'{"item_id":5004,"title":"\\udfff"}', "invalid_string"),
    ]
    for value, _ in hostile:
        h.send_raw(h.topics.items, value, key=b"1")
    h.send_raw(h.topics.items, encode_item(Item(5000, "A New Movie (2026)", ("Drama",), (), {}, {"year": 2026.0})))
    wait_until(lambda: h.stub.GetModelInfo(ranking_pb2.GetModelInfoRequest()).num_items == n0 + 1,
               what="the good item indexed after the poison")
    assert h.rank(1, k=5).fallback_reason == ""
    assert all(c.is_alive() for c in h.app.consumers)
    got = _dead_letters(h.bootstrap, h.topics.dead_letter, len(hostile))
    assert sorted(g["reason"] for g in got) == sorted(r for _, r in hostile)
    assert {g["source_topic"] for g in got} == {h.topics.items}


@pytest.mark.integration
def test_poisoned_model_announcements_are_dead_lettered_and_a_later_one_is_served(make_server, wait_until,
                                                                                model_bundles):
    h = make_server()
    path, checksum = model_bundles["v2"]
    hostile = [
        (None, "tombstone"),
        (b"[" * 60_000, "too_deep"),
        (json.dumps({"version": "v9", "uri": "/x\u0000y", "checksum": "0" * 64}).encode(), "invalid_field"),
        (json.dumps({"version": "v9", "uri": str(path), "checksum": 12}).encode(), "invalid_field"),
        (b'{"version":"v9","uri":"/x","checksum":"' + b"0" * 64 + b'","n":' + b"1" * 5000 + b"}", "number_too_large"),
    ]
    for value, _ in hostile:
        h.send_raw(h.topics.models, value, key=b"m")
    assert h.rank(1, k=5).model_version == "v1"
    h.send_raw(h.topics.models, ModelAnnouncement("v2", str(path), checksum).encode())
    wait_until(lambda: h.rank(1, k=5).model_version == "v2", timeout_s=60, what="v2 served after the poison")
    got = _dead_letters(h.bootstrap, h.topics.dead_letter, len(hostile))
    assert sorted(g["reason"] for g in got) == sorted(r for _, r in hostile)
    assert all(c.is_alive() for c in h.app.consumers)


@pytest.mark.integration
def test_a_record_that_keeps_failing_is_dead_lettered_and_skipped(make_server, wait_until):
    """An event that makes the applier raise (a bug, not bad data): retried, then skipped; its neighbours
    (before and after it, same partition) are applied; a transient failure is retried, not skipped."""
    from serving.stream.events import EventApplier, EventsConsumer

    h = make_server(**{"kafka.consume_events": False})
    app, cfg = h.app, h.app.cfg
    flaky_left = {"transient": 2}

    class FaultyApplier(EventApplier):
        def apply(self, msgs):
            for m in msgs:
                if b'"poison"' in (m.value or b""):
                    raise RuntimeError("the code cannot handle this record")
                if b'"transient"' in (m.value or b"") and flaky_left["transient"] > 0:
                    flaky_left["transient"] -= 1
                    raise ConnectionError("a hiccup")
            return super().apply(msgs)

    applier = FaultyApplier(cfg.state, app.store, app.catalog, app.models, app.metrics, None)
    c = EventsConsumer(cfg.kafka, applier, app.metrics, app.dead_letters or _dlq(h))
    c.start()
    try:
        evs = [("a", 1), ("poison", 2), ("b", 3), ("transient", 4), ("c", 5)]
        for eid, i in evs:  # all on one partition (same key), in this order
            h.send_raw(h.topics.events, _good(eid, user=99009, item=100 + i, ts=LIVE_TS + i), key=b"99009")
        wait_until(lambda: c.totals.applied == 4, timeout_s=60, what="the 4 good events applied around the poison")
        assert c.is_alive() and h.rank(99009, k=3).items
        assert app.store.read_user(99009).seq.item_ids.tolist() == [101, 103, 104, 105]
        assert h.metric("cascade_consumer_skipped_records_total", {"topic": h.topics.events}) == 1
        assert h.metric("cascade_consumer_restarts_total", {"consumer": "events"}) >= cfg.kafka.max_record_failures
        got = _dead_letters(h.bootstrap, h.topics.dead_letter, 1)
        assert got[0]["reason"] == "consumer_error" and "RuntimeError" in got[0]["detail"]
        assert b'"poison"' in got[0]["value"]
    finally:
        c.stop()
        c.join(10)
    # the poison's offset was committed past: a new consumer of the group does not see it again
    applier2 = EventApplier(cfg.state, app.store, app.catalog, app.models, app.metrics, None)
    c2 = EventsConsumer(cfg.kafka, applier2, app.metrics, None)
    c2.start()
    try:
        h.send_raw(h.topics.events, _good("d", user=99009, item=106, ts=LIVE_TS + 6), key=b"99009")
        wait_until(lambda: c2.totals.applied == 1, what="the next event applied by a new group member")
        assert c2.totals.messages == 1 and c2.totals.dead_lettered == 0
    finally:
        c2.stop()
        c2.join(10)


def _dlq(h):
    from serving.stream.deadletter import DeadLetters

    return DeadLetters(h.bootstrap, h.topics.dead_letter, h.app.metrics)


@pytest.mark.integration
def test_an_item_that_keeps_failing_is_skipped_and_the_reader_goes_on(make_server, wait_until):
    from serving.lifecycle import ItemUpdater
    from serving.stream.broadcast import ItemsReader

    h = make_server(**{"kafka.consume_items": False})
    app = h.app

    class FaultyUpdater(ItemUpdater):
        def add(self, items):
            if any(it.item_id == 6666 for it in items):
                raise RuntimeError("index refused the item")
            return super().add(items)

    reader = ItemsReader(app.cfg.kafka, FaultyUpdater(app.models, app.catalog, app.metrics), _dlq(h))
    reader.start()
    try:
        assert reader.caught_up.wait(30)
        for i in (6001, 6666, 6002):
            h.send_raw(h.topics.items, encode_item(Item(i, f"t{i}", ("Drama",), (), {}, {})))
        wait_until(lambda: {6001, 6002} <= set(app.catalog.current.item_ids.tolist()), timeout_s=60,
                   what="the items around the failing one added")
        assert reader.is_alive() and 6666 not in set(app.catalog.current.item_ids.tolist())
        assert h.metric("cascade_consumer_skipped_records_total", {"topic": h.topics.items}) == 1
        assert _dead_letters(h.bootstrap, h.topics.dead_letter, 1)[0]["reason"] == "consumer_error"
    finally:
        reader.stop()
        reader.join(10)


# ---------------------------------------------------------------------------------------------- units


def test_dead_letter_of_any_message_is_small_and_names_its_source():
    for value, key in [(None, None), (b"", b""), (b"x" * (5 << 20), b"k" * 100_000), ("str", 5)]:
        msg = SimpleNamespace(topic="t", partition=1, offset=42, key=key, value=value)
        v, k, headers = dead_letter_record(msg, "too_large", "d" * 10_000)
        h = dict(headers)
        assert isinstance(v, bytes) and len(v) <= MAX_VALUE_BYTES and (k is None or len(k) <= 1024)
        assert h["source_topic"] == b"t" and h["source_partition"] == b"1" and h["source_offset"] == b"42"
        assert all(len(x) <= 1000 for x in h.values())
    assert dict(dead_letter_record(SimpleNamespace(topic="t", partition=0, offset=0, key=None, value=None),
                                   "tombstone", "")[2])["value_null"] == b"1"


def test_backoff_doubles_up_to_the_cap_and_resets():
    b = Backoff(0.1, 0.5)
    assert [b.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.next() == 0.1


def test_record_failures_count_consecutive_failures_at_the_same_offset():
    f = RecordFailures(3)
    m = lambda off, p=0: SimpleNamespace(topic="t", partition=p, offset=off)  # noqa: E731
    assert [f.failed(m(5)) for _ in range(3)] == [1, 2, 3] and f.exhausted(m(5))
    assert f.failed(m(5, p=1)) == 1 and f.failures(m(5)) == 3  # partitions are counted apart
    assert f.failed(m(6)) == 1  # another offset of the partition: counted again from 1
    f.succeeded(m(6))
    assert f.failures(m(6)) == 0 and f  # partition 1 still has one


def test_pruning_is_bounded_by_the_wall_clock_not_by_the_newest_timestamp():
    retention = 31 * DAY
    now = 1_790_000_000_000
    real = np.array([now - 20 * DAY, now - 10 * DAY, now - DAY], np.int64)
    log = extend_log(CounterLog.empty(), real, np.ones(3, np.uint8), retention, now)
    future = np.array([now + 365 * DAY], np.int64)  # one event stamped a year ahead (had it got through)
    log2 = extend_log(log, future, np.ones(1, np.uint8), retention, now)
    assert log2.ts_ms.tolist() == real.tolist() + future.tolist() and log2.total_cnt == 4
    assert prune_cutoff(now + 365 * DAY, retention, now) == now - retention
    assert prune_cutoff(now - 400 * DAY, retention, now) == now - 400 * DAY - retention  # history replays unchanged
    # the same through the per-user update the consumer runs
    cfg, stats = SequenceConfig(), StatsConfig()
    ev = lambda i, ts: Event(f"e{i}", 1, i, int(ts), "click", 1.0)  # noqa: E731
    rec = apply_user_events(UserRecord.empty(), [ev(i, t) for i, t in enumerate(real)], [0] * 3, cfg, stats,
                            retention, now_ms=now)
    rec = apply_user_events(rec, [ev(9, now + 365 * DAY)], [0], cfg, stats, retention, now_ms=now)
    assert rec.log.ts_ms.tolist()[:3] == real.tolist()


class _ScriptedConsumer:
    """Stands in for KafkaConsumer in a unit test of the loop around it: polls return scripted batches;
    commits can be refused as a rebalance refuses them; partitions can be revoked."""

    def __init__(self, batches, refuse_commits: int = 0, revoked=()):
        self.batches = list(batches)
        self.refuse = refuse_commits
        self.revoked = set(revoked)
        self.committed: dict = {}
        self.seeks: list = []

    def poll(self, timeout_ms=0):
        if not self.batches:
            time.sleep(timeout_ms / 1000)
            return {}
        return self.batches.pop(0)

    def assignment(self):
        return {("t", 0), ("t", 1)} - self.revoked

    def commit(self, offsets):
        from kafka.errors import CommitFailedError

        if self.refuse:
            self.refuse -= 1
            raise CommitFailedError("the group rebalanced")
        self.committed.update({tp: o.offset for tp, o in offsets.items()})

    def seek(self, tp, off):
        if tp in self.revoked:
            raise AssertionError("seek of a revoked partition")
        self.seeks.append((tp, off))

    def highwater(self, tp):
        return None

    def close(self, autocommit=False):
        pass


def _rec(part: int, off: int, value: bytes = b"{}"):
    return SimpleNamespace(topic="t", partition=part, offset=off, key=None, value=value, timestamp=0)


def _run_scripted(consumer, apply, cfg_over=None, until=lambda c: False):
    from dataclasses import replace

    from serving.config import KafkaConfig
    from serving.metrics import ServingMetrics
    from serving.stream.events import BatchOutcome, EventsConsumer

    class Applier:
        def apply(self, msgs):
            apply(msgs)
            return BatchOutcome(messages=len(msgs), applied=len(msgs))

    cfg = replace(KafkaConfig(), retry_backoff_s=0.001, retry_backoff_max_s=0.002, poll_timeout_ms=1,
                  **(cfg_over or {}))
    metrics = ServingMetrics()
    c = EventsConsumer(cfg, Applier(), metrics, None)
    c._consumer = lambda: consumer
    c.start()
    deadline = time.monotonic() + 20
    while not until(c) and time.monotonic() < deadline:
        time.sleep(0.01)
    c.stop()
    c.join(5)
    return c, metrics


def test_a_refused_commit_after_a_rebalance_does_not_end_the_consumer():
    applied = []
    batches = [{("t", 0): [_rec(0, 0), _rec(0, 1)]}, {("t", 0): [_rec(0, 2)]}]
    sc = _ScriptedConsumer(batches, refuse_commits=1)
    c, metrics = _run_scripted(sc, lambda msgs: applied.extend(m.offset for m in msgs),
                               until=lambda c: c.totals.messages == 3)
    assert applied == [0, 1, 2] and sc.committed == {("t", 0): 3}
    assert metrics.registry.get_sample_value("cascade_consumer_commit_failures_total", {"consumer": "events"}) == 1
    assert c.restarts == 0 and not c.is_alive()  # ended by stop(), not by the refused commit


def test_a_failing_record_is_retried_then_skipped_and_revoked_partitions_are_not_rewound():
    applied = []

    def apply(msgs):
        if any(m.offset == 1 and m.partition == 0 for m in msgs):
            raise RuntimeError("boom")
        applied.extend((m.partition, m.offset) for m in msgs)

    first = {("t", 0): [_rec(0, 0), _rec(0, 1), _rec(0, 2)], ("t", 1): [_rec(1, 0)]}
    again = {("t", 0): [_rec(0, 1), _rec(0, 2)]}
    sc = _ScriptedConsumer([first, again, again])
    c, metrics = _run_scripted(sc, apply, {"max_record_failures": 3}, until=lambda c: (0, 2) in applied)
    assert applied == [(0, 0), (1, 0), (0, 2)]  # record (0, 1) skipped on its third failure
    assert sc.committed == {("t", 0): 3, ("t", 1): 1}
    assert sc.seeks == [(("t", 0), 1), (("t", 0), 1)]  # rewound to the failing record twice, then past it
    assert metrics.registry.get_sample_value("cascade_consumer_skipped_records_total", {"topic": "t"}) == 1
    # the partition is revoked between the poll and the rewind: nothing is sought (its new owner re-reads it)
    sc2 = _ScriptedConsumer([{("t", 1): [_rec(1, 5)]}], revoked={("t", 1)})
    _run_scripted(sc2, lambda msgs: (_ for _ in ()).throw(RuntimeError("boom")),
                  until=lambda c: c.failures.failures(_rec(1, 5)) >= 1)
    assert sc2.seeks == []


def test_an_error_of_the_client_itself_reopens_it():
    class Broken(_ScriptedConsumer):
        def poll(self, timeout_ms=0):
            raise OSError("connection reset")

    made = []

    def factory():
        made.append(1)
        return Broken([]) if len(made) < 3 else _ScriptedConsumer([{("t", 0): [_rec(0, 0)]}])

    from dataclasses import replace

    from serving.config import KafkaConfig
    from serving.metrics import ServingMetrics
    from serving.stream.events import BatchOutcome, EventsConsumer

    class Applier:
        def apply(self, msgs):
            return BatchOutcome(messages=len(msgs), applied=len(msgs))

    metrics = ServingMetrics()
    c = EventsConsumer(replace(KafkaConfig(), retry_backoff_s=0.001, retry_backoff_max_s=0.002, poll_timeout_ms=1),
                       Applier(), metrics, None)
    c._consumer = factory
    c.start()
    deadline = time.monotonic() + 20
    while c.totals.applied < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    c.stop()
    c.join(5)
    assert c.totals.applied == 1 and len(made) == 3
    assert metrics.registry.get_sample_value("cascade_consumer_restarts_total", {"consumer": "events"}) == 2


def _random_json(rnd, depth: int = 0):
    kinds = ["null", "bool", "int", "bigint", "float", "str", "weird_str"] + (["list", "dict"] if depth < 12 else [])
    k = rnd.choice(kinds)
    if k == "null":
        return None
    if k == "bool":
        return rnd.random() < 0.5
    if k == "int":
        return rnd.randint(-(2**70), 2**70)
    if k == "bigint":
        return int("9" * rnd.randint(20, 400))
    if k == "float":
        return rnd.choice([0.5, -1e308, 1e-320, 3.14, 1.7976931348623157e308])
    if k == "str":
        return "".join(chr(rnd.randint(32, 0x2FFF)) for _ in range(rnd.randint(0, 20)))
    if k == "weird_str":
        return rnd.choice(["\ud800", "\x00", "CLICK", "Click", "click", "", "a" * 300, "\U0001F600", "../../etc"])
    if k == "list":
        return [_random_json(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    return {_random_json(rnd, 99) if rnd.random() < 0.2 else rnd.choice(["a", "event_id", "label", "item_id"]):
            _random_json(rnd, depth + 1) for _ in range(rnd.randint(0, 3))}


def _mutate(rnd, valid: dict) -> bytes | None:
    """A hostile variant of a valid message: a field replaced, dropped or added, bytes flipped, truncated,
    nested, padded, or not there at all."""
    op = rnd.randrange(8)
    obj = dict(valid)
    if op == 0:
        obj[rnd.choice(list(obj))] = _random_json(rnd)
    elif op == 1:
        obj.pop(rnd.choice(list(obj)))
    elif op == 2:
        obj[rnd.choice(["extra", "EVENT_ID", ""])] = _random_json(rnd)
    raw = json.dumps(obj, ensure_ascii=rnd.random() < 0.5).encode("utf-8", "surrogatepass")
    if op == 3:
        b = bytearray(raw)
        for _ in range(rnd.randint(1, 5)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        raw = bytes(b)
    elif op == 4:
        raw = raw[: rnd.randrange(len(raw))]
    elif op == 5:
        n = rnd.choice([5, 50, 5000])
        raw = b"[" * n + raw + b"]" * n
    elif op == 6:
        raw = raw[:-1] + b',"pad":"' + b"x" * rnd.choice([100, 70_000, 2 << 20]) + b'"}'
    elif op == 7:
        return rnd.choice([None, b"", b"null", b"[]", b"1e999999", b"\xef\xbb\xbf{}"])
    return raw


@pytest.mark.integration
def test_a_seeded_fuzz_corpus_on_every_topic_never_stops_a_consumer(make_server, wait_until, model_bundles):
    """~500 mutated messages across events, items and models: every one is applied or dead-lettered, no
    consumer ever fails (decoding is total), Rank answers throughout, and good records after it all land."""
    import random

    from serving.proto import ranking_pb2

    rnd = random.Random(15)
    h = make_server()
    ev = {"event_id": "f", "user_id": 99015, "item_id": 50, "ts_ms": LIVE_TS, "event_type": "click", "label": 1.0,
          "value": None, "context": {"surface": "home"}}
    it = {"item_id": 7000, "title": "t", "categories": ["Drama"], "tags": [], "attributes": {}, "numeric": {}}
    ann = {"version": "vz", "uri": "/nowhere/vz", "checksum": "0" * 64}
    sent = {h.topics.events: 0, h.topics.items: 0, h.topics.models: 0}
    p = _big_producer(h.bootstrap)
    try:
        for i in range(500):
            topic, valid = rnd.choice([(h.topics.events, dict(ev, event_id=f"f{i}")), (h.topics.events, ev),
                                       (h.topics.items, dict(it, item_id=7000 + i)), (h.topics.models, ann)])
            value, key = _mutate(rnd, valid), rnd.choice([None, b"", b"\xff" * 3, b"k" * 2000])
            p.send(topic, key=b"tombstone" if key is None and value is None else key, value=value)
            sent[topic] += 1
            if i % 100 == 0:
                assert h.rank(1, k=5).items  # answering while the corpus streams in
        p.send(h.topics.events, key=b"99015", value=_good("after-fuzz", user=99015, item=51, ts=LIVE_TS + 1))
        p.send(h.topics.items, value=encode_item(Item(7999, "after the fuzz", ("Drama",), (), {}, {})))
        p.flush()
    finally:
        p.close()
    consumer = next(c for c in h.app.consumers if c.name == "events-consumer")
    wait_until(lambda: consumer.totals.messages == sent[h.topics.events] + 1, timeout_s=120,
               what="every fuzzed event read")
    t = consumer.totals
    assert t.messages == t.applied + t.deduplicated + t.dead_lettered and t.applied > 0 and t.dead_lettered > 50
    assert 51 in h.app.store.read_user(99015).seq.item_ids.tolist()
    wait_until(lambda: 7999 in set(h.app.catalog.current.item_ids.tolist()), timeout_s=60, what="the item after it")
    assert h.rank(1, k=5).items and h.stub.GetModelInfo(ranking_pb2.GetModelInfoRequest()).model_version == "v1"
    for c in h.app.consumers:
        assert c.is_alive() and c.restarts == 0, (c.name, c.error)
    for kind in ("events", "items", "models"):
        assert h.metric("cascade_consumer_restarts_total", {"consumer": kind}) == 0


@pytest.mark.integration
def test_poison_already_on_the_broadcast_topics_does_not_stop_the_next_server(make_server, wait_until, catalog,
                                                                              model_bundles):
    """items and models are read from offset 0 at every start: a poisoned record there used to crash-loop every
    replica. The next server replays it (logged, not dead-lettered again) and starts on the newest good model."""
    from serving.app import ServingApp
    from serving.proto import ranking_pb2
    from tests.serving.conftest import Harness

    h = make_server()
    path, checksum = model_bundles["v2"]
    poison = [None, b"", b"[" * 60_000, b'{"item_id":' + b"9" * 5000 + b"}", b"\xff" * 100, b'{"version":7}']
    for v in poison:
        h.send_raw(h.topics.items, v, key=b"p")
        h.send_raw(h.topics.models, v, key=b"p")
    h.send_raw(h.topics.items, encode_item(Item(5000, "A New Movie (2026)", ("Drama",), (), {}, {})))
    h.send_raw(h.topics.models, ModelAnnouncement("v2", str(path), checksum).encode())
    for v in poison[:2]:  # poison after the good records too: the newest announcement is not loadable
        h.send_raw(h.topics.models, v, key=b"p")
    wait_until(lambda: h.rank(1, k=5).model_version == "v2", timeout_s=60, what="v2 served by the first server")
    dead = h.metric("cascade_events_dead_lettered_total", {"topic": h.topics.models, "reason": "tombstone"})
    assert dead == 2

    h2 = Harness(ServingApp(h.app.cfg, catalog).start(wait_for_partitions_s=30.0), h.topics, h.bootstrap)
    try:
        assert h2.rank(1, k=5).model_version == "v2"  # caught up at start: the newest loadable announcement
        assert 5000 in set(h2.app.catalog.current.item_ids.tolist())
        assert h2.stub.GetModelInfo(ranking_pb2.GetModelInfoRequest()).model_version == "v2"
        for c in h2.app.consumers:
            assert c.is_alive() and c.restarts == 0, (c.name, c.error)
        # replayed poison is logged, not dead-lettered a second time
        assert h2.metric("cascade_events_dead_lettered_total", {"topic": h.topics.models, "reason": "tombstone"}) == 0
    finally:
        h2.close()
