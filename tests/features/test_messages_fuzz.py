"""The Kafka decoders are total: any value becomes a record or a `Rejection`, never an exception.

Hypothesis drives arbitrary bytes, arbitrary JSON (any nesting, numbers, strings including lone
surrogates) and mutations of valid messages through all three decoders; the hostile values a producer
was seen sending are pinned as examples."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from features.messages import (
    MAX_JSON_DEPTH, MAX_MESSAGE_BYTES, EventBounds, MessageError, ModelAnnouncement, Rejection, decode_event,
    encode_event, parse_announcement, parse_event, parse_item,
)
from features.schema import EVENT_TYPE_NAMES, Event, EventType, Item, SchemaError, validate_event, validate_item

DECODERS = (parse_event, parse_item, parse_announcement)
NOW = 1_790_000_000_000
GOOD = {"event_id": "e1", "user_id": 7, "item_id": 9, "ts_ms": NOW - 1000, "event_type": "click", "label": 1.0,
        "value": None, "context": {"surface": "home"}}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=40,
)


def _assert_total(parse, raw) -> None:
    got = parse(raw)
    if isinstance(got, Rejection):
        assert got.reason and got.reason != "undecodable", got  # a named guard caught it, not the safety net
        assert isinstance(got.detail, str) and len(got.detail) < 1000
        return
    if isinstance(got, Event):
        validate_event(got)
        assert got.event_type in EVENT_TYPE_NAMES and math.isfinite(got.label)
        assert math.isnan(got.value) or math.isfinite(got.value)
        got.event_id.encode("utf-8")  # written to Redis as a dedupe key
        assert json.loads(encode_event(got))["event_id"] == got.event_id
    elif isinstance(got, Item):
        validate_item(got)
        assert all(math.isfinite(v) for v in got.numeric.values())
    else:
        assert isinstance(got, ModelAnnouncement) and len(got.checksum) == 64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\xff\xfe\x00")
@example(b"[" * 100_000)
@example(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}")
@example(b"1" * 5000)
@example(b'{"event_id":"\\ud800"}')
@example(b"NaN")
def test_any_bytes_decode_to_a_record_or_a_rejection(raw):
    for parse in DECODERS:
        _assert_total(parse, raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_value_decodes_to_a_record_or_a_rejection(v):
    raw = json.dumps(v).encode("utf-8", "surrogatepass")
    for parse in DECODERS:
        _assert_total(parse, raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(GOOD)), json_values | st.integers(min_value=-(10**60), max_value=10**60))
def test_any_value_in_any_event_field_decodes_to_an_event_or_a_rejection(field, v):
    obj = dict(GOOD, **{field: v})
    raw = json.dumps(obj).encode("utf-8", "surrogatepass")
    _assert_total(parse_event, raw)
    _assert_total(lambda r: parse_event(r, EventBounds(), NOW), raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["item_id", "title", "categories", "tags", "attributes", "numeric"]), json_values)
def test_any_value_in_any_item_field_decodes_to_an_item_or_a_rejection(field, v):
    obj = {"item_id": 3, "title": "t", "categories": ["a"], "tags": [], "attributes": {}, "numeric": {"x": 1.0}}
    obj[field] = v
    _assert_total(parse_item, json.dumps(obj).encode("utf-8", "surrogatepass"))


def _ev(**kw) -> bytes:
    return json.dumps(dict(GOOD, **kw)).encode()


@pytest.mark.parametrize("raw, reason", [
    (None, "tombstone"),
    (b"", "empty"),
    (b" " * (MAX_MESSAGE_BYTES + 1), "too_large"),
    (b'{"x":"' + b"a" * (4 << 20) + b'"}', "too_large"),  # a few MB: refused before parsing
    (b"\xc3\x28", "not_json"),
    (_ev(label=10**30).replace(b"1" + b"0" * 30, b"1" + b"0" * 400), "number_too_large"),  # an int no float holds
    (_ev(user_id=int("9" * 39)), "invalid_field"),
    (_ev().replace(b'"label": 1.0', b'"label": 1e999'), "invalid_field"),
    (_ev().replace(b'"label": 1.0', b'"label": NaN'), "not_json"),
    (_ev(event_type="CLICK"), "unknown_event_type"),
    (_ev(event_type="Click"), "unknown_event_type"),
    (_ev(context={"a": [[[[[[[[[["deep"]]]]]]]]]]}), "too_deep"),
    (b'{"event_id":' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}", "too_deep"),
    (_ev(event_id="\ud800x").replace(b"\\ud800", b"\\ud800"), "invalid_string"),
    (_ev(value=float("inf")).replace(b"Infinity", b"1e999"), "invalid_field"),
    (_ev(extra=1), "unknown_field"),
    (_ev(ts_ms=NOW + 3_600_000), "ts_in_future"),
    (_ev(ts_ms=893_286_700), "ts_too_old"),  # seconds written as milliseconds
])
def test_hostile_events_are_rejected_with_a_reason(raw, reason):
    got = parse_event(raw, EventBounds(), NOW)
    assert isinstance(got, Rejection) and got.reason == reason, got
    with pytest.raises(MessageError) as ei:
        decode_event(raw, EventBounds(), NOW)
    assert ei.value.reason == reason


def test_timestamps_inside_the_bounds_are_accepted():
    b = EventBounds(min_ts_ms=1000, max_future_ms=60_000)
    assert isinstance(parse_event(_ev(ts_ms=NOW + 60_000), b, NOW), Event)
    assert isinstance(parse_event(_ev(ts_ms=1000), b, NOW), Event)
    assert parse_event(_ev(ts_ms=NOW + 60_001), b, NOW).reason == "ts_in_future"
    assert isinstance(parse_event(_ev(ts_ms=5)), Event)  # no bounds given: only the contract applies


def test_event_types_are_matched_exactly_lower_case_everywhere():
    """One rule: the decoder, `EventType.parse` (configs, action codes) and `validate_event` agree."""
    for name in EVENT_TYPE_NAMES:
        assert EventType.parse(name).name.lower() == name
        for other in (name.upper(), name.capitalize(), f" {name}"):
            with pytest.raises(ValueError, match="is not one of"):
                EventType.parse(other)
            with pytest.raises(SchemaError):
                validate_event(Event("e", 1, 2, 3, other, 1.0))
            assert parse_event(_ev(event_type=other)).reason == "unknown_event_type"


def test_item_and_announcement_rejections():
    assert parse_item(b'{"item_id":1,"attributes":["ab"]}').reason == "invalid_field"
    assert parse_item(b'{"item_id":1,"numeric":{"x":1e999}}').reason == "invalid_field"
    assert parse_item(b'{"item_id":1,"categories":"abc"}').reason == "invalid_field"
    assert parse_item(b'{"item_id":1,"colour":"red"}').reason == "unknown_field"
    ok = {"version": "v2", "uri": "/models/v2", "checksum": "A" * 64}
    assert parse_announcement(json.dumps(ok).encode()).checksum == "a" * 64
    for bad in ({"uri": "/a\u0000b"}, {"version": "x" * 5000}, {"checksum": "g" * 64}, {"extra": "1"}):
        assert isinstance(parse_announcement(json.dumps(dict(ok, **bad)).encode()), Rejection), bad
