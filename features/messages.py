"""Wire format of the Kafka topics (part of the data contract), and its total decoders.

Topics (names configurable; these are the defaults):

* ``cascade.events``: one `Event` per message, JSON (UTF-8), key = user_id as
  decimal ASCII so one user's events stay ordered on one partition.
* ``cascade.items``: one `Item` per message, JSON, key = item_id.
* ``cascade.models``: a model announcement, JSON ``{"version", "uri", "checksum"}``.
* ``cascade.dead-letter``: a bounded prefix of the original bytes plus headers
  ``reason``, ``detail``, ``source_topic``, ``source_partition``, ``source_offset``
  (serving/stream/deadletter.py).

Decoding is total: `parse_event`, `parse_item` and `parse_announcement` turn
*any* value (None, empty, any size, nesting, number or encoding) into either
the record or a `Rejection` (a short reason code and a readable detail naming
the field); they never raise. `decode_event` / `decode_item` /
`ModelAnnouncement.decode` are the same with the rejection raised as
`MessageError` (and nothing else). The guards, in order:

    tombstone / not_bytes / empty   no value, a value of another type, zero bytes
    too_large                       more than MAX_MESSAGE_BYTES (checked before parsing)
    not_json                        bytes that are not UTF-8, text that is not strict JSON
                                    (NaN / Infinity literals are not JSON)
    number_too_large                an integer literal longer than MAX_NUMBER_CHARS
                                    (no field can hold one; Python's int parser is quadratic)
    too_deep                        JSON nested deeper than MAX_JSON_DEPTH
    invalid_string                  a string with a lone surrogate (\\ud800: not encodable as UTF-8)
    not_object / unknown_field / missing_field / invalid_field / unknown_event_type
    ts_too_old / ts_in_future       outside `EventBounds` (only when bounds are given)

Event types are matched one way everywhere: exactly one of
`features.schema.EVENT_TYPE_NAMES` (lower case), as the Spark path, the
importers and serving do; ``"CLICK"`` is an unknown event type, not a click.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from features.schema import EVENT_TYPE_NAMES, INT64_MAX, INT64_MIN, Event, Item, SchemaError, validate_item

MAX_MESSAGE_BYTES = 64 * 1024
MAX_JSON_DEPTH = 8  # an event/item/announcement is 2 levels deep (object -> context map / category list)
MAX_NUMBER_CHARS = 40  # an int64 has at most 20 characters; a float field written as a 40-digit int is still finite
MAX_FLOAT_CHARS = 100  # repr of any float is at most 24 characters
MAX_ANNOUNCEMENT_FIELD_CHARS = 4096

EVENT_FIELDS = ("event_id", "user_id", "item_id", "ts_ms", "event_type", "label", "value", "context")
EVENT_REQUIRED = ("event_id", "user_id", "item_id", "ts_ms", "event_type", "label")
ITEM_FIELDS = ("item_id", "title", "categories", "tags", "attributes", "numeric")
ANNOUNCEMENT_FIELDS = ("version", "uri", "checksum")
_ALLOWED = {f: frozenset(f) for f in (EVENT_FIELDS, EVENT_REQUIRED, ITEM_FIELDS, ("item_id",), ANNOUNCEMENT_FIELDS)}

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONG_NUMBER = re.compile(rb"[0-9.eE+-]{%d,}" % (MAX_NUMBER_CHARS + 1))  # may be inside a string: then only slower
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_SHA256_HEX = re.compile("[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class KafkaTopics:
    events: str = "cascade.events"
    items: str = "cascade.items"
    models: str = "cascade.models"
    dead_letter: str = "cascade.dead-letter"

    def all(self) -> tuple[str, ...]:
        return (self.events, self.items, self.models, self.dead_letter)


@dataclass(frozen=True)
class Rejection:
    """Why a message is not a record: `reason` a short code (a metric label), `detail` readable, naming the field."""

    reason: str
    detail: str


class MessageError(ValueError):
    """A message cannot be decoded into the contract; `reason` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EventBounds:
    """Timestamps an event may carry: at least `min_ts_ms`, at most `max_future_ms` after the consumer's clock.

    A far-future timestamp would otherwise become the user's "newest event" and an
    implausibly old one is usually seconds written as milliseconds.
    """

    min_ts_ms: int = 631_152_000_000  # 1990-01-01T00:00:00Z
    max_future_ms: int = 5 * 60_000

    def check(self, ts_ms: int, now_ms: int) -> Rejection | None:
        if ts_ms < self.min_ts_ms:
            return Rejection("ts_too_old", f"event.ts_ms={ts_ms} is before the floor {self.min_ts_ms} "
                                           "(seconds instead of milliseconds?)")
        if ts_ms > now_ms + self.max_future_ms:
            return Rejection("ts_in_future", f"event.ts_ms={ts_ms} is {ts_ms - now_ms} ms after the consumer's clock "
                                             f"({now_ms}; at most {self.max_future_ms} ms of skew is accepted)")
        return None


class _Reject(Exception):
    """Raised inside the parser hooks and checks; turned into a `Rejection` at the edge."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.rejection = Rejection(reason, detail)


def _parse_int(s: str) -> int:
    if len(s) > MAX_NUMBER_CHARS:
        raise _Reject("number_too_large", f"an integer literal has {len(s)} characters (max {MAX_NUMBER_CHARS})")
    return int(s)


def _parse_float(s: str) -> float:
    if len(s) > MAX_FLOAT_CHARS:
        raise _Reject("number_too_large", f"a number literal has {len(s)} characters (max {MAX_FLOAT_CHARS})")
    return float(s)


def _parse_constant(s: str) -> float:
    raise _Reject("not_json", f"{s} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_parse_constant)
_BOUNDED_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)


def _depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, outside string literals (vectorized: no per-character Python)."""
    outside = _JSON_STRING.sub(b'""', raw)
    steps = _BRACKET_STEP[np.frombuffer(outside, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def _check_strings(obj: Any, what: str) -> None:
    """Every string (keys too) encodable as UTF-8: a \\ud800 escape parses into a lone surrogate."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise _Reject("invalid_string", f"{what} message has a string with a lone surrogate ({v[:40]!r})")
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _load(raw: Any, what: str) -> dict[str, Any]:
    if raw is None:
        raise _Reject("tombstone", f"{what} message has no value (a tombstone)")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise _Reject("not_bytes", f"{what} message value is a {type(raw).__name__}, not bytes")
    raw = bytes(raw)
    n = len(raw)
    if n == 0:
        raise _Reject("empty", f"{what} message is empty")
    if n > MAX_MESSAGE_BYTES:
        raise _Reject("too_large", f"{what} message is {n} bytes (max {MAX_MESSAGE_BYTES})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Reject("not_json", f"{what} message is not UTF-8 JSON: {e}") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(raw) > MAX_JSON_DEPTH:
        raise _Reject("too_deep", f"{what} message is nested deeper than {MAX_JSON_DEPTH}")
    try:
        # a long number literal may be there: parse with the bounded converters (slower: a call per number)
        obj = (_BOUNDED_DECODER if _LONG_NUMBER.search(raw) else _DECODER).decode(text)
    except RecursionError:
        raise _Reject("too_deep", f"{what} message is nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as e:  # JSONDecodeError, and float/int conversions of literals
        raise _Reject("not_json", f"{what} message is not JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise _Reject("not_object", f"{what} message must be a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(text):  # only an escape can make a surrogate (the UTF-8 decoding is strict)
        _check_strings(obj, what)
    return obj


def _fields(obj: Mapping[str, Any], allowed: tuple[str, ...], required: tuple[str, ...], what: str) -> None:
    keys = obj.keys()
    if not keys <= _ALLOWED[allowed]:  # the common case costs one set comparison
        unknown = keys - _ALLOWED[allowed]
        raise _Reject("unknown_field", f"{what} has unknown field(s) {sorted(k[:40] for k in unknown)[:10]}")
    if not keys >= _ALLOWED[required]:
        for f in required:
            if f not in obj:
                raise _Reject("missing_field", f"{what}.{f} is missing")


def _int64(what: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Reject("invalid_field", f"{what}.{name} must be an int64, got {type(v).__name__}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise _Reject("invalid_field", f"{what}.{name}={v} is outside the int64 range")
    return v


def _finite(what: str, name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Reject("invalid_field", f"{what}.{name} must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise _Reject("invalid_field", f"{what}.{name} must be a finite number, got {str(v)[:40]}")
    return f


def _str_map(what: str, name: str, v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Reject("invalid_field", f"{what}.{name} must be a string map, got {type(v).__name__}")
    for k, x in v.items():
        if not isinstance(x, str):
            raise _Reject("invalid_field", f"{what}.{name}[{k[:40]!r}] must be a string, got {type(x).__name__}")
    return v


def _str_list(what: str, name: str, v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise _Reject("invalid_field", f"{what}.{name} must be a list of strings, got {type(v).__name__}")
    for i, x in enumerate(v):
        if not isinstance(x, str) or not x:
            raise _Reject("invalid_field", f"{what}.{name}[{i}] must be a non-empty string")
    return tuple(v)


def _event(obj: dict[str, Any]) -> Event:
    _fields(obj, EVENT_FIELDS, EVENT_REQUIRED, "event")
    eid = obj["event_id"]
    if not isinstance(eid, str) or not eid:
        raise _Reject("invalid_field", "event.event_id must be a non-empty string")
    if len(eid) > 256:
        raise _Reject("invalid_field", f"event.event_id is {len(eid)} characters long (max 256)")
    user, item = _int64("event", "user_id", obj["user_id"]), _int64("event", "item_id", obj["item_id"])
    ts = _int64("event", "ts_ms", obj["ts_ms"])
    if ts < 0:
        raise _Reject("invalid_field", f"event.ts_ms={ts} is negative")
    et = obj["event_type"]
    if not isinstance(et, str):
        raise _Reject("invalid_field", f"event.event_type must be a string, got {type(et).__name__}")
    if et not in EVENT_TYPE_NAMES:
        raise _Reject("unknown_event_type", f"event.event_type {et[:40]!r} is not one of: {', '.join(EVENT_TYPE_NAMES)}")
    label = _finite("event", "label", obj["label"])
    value = obj.get("value")
    value = math.nan if value is None else _finite("event", "value", value)
    context = _str_map("event", "context", obj.get("context"))
    # every check of features.schema.validate_event was made above (the fuzz tests hold it to that)
    return Event(eid, user, item, ts, et, label, value, context)


def _item(obj: dict[str, Any]) -> Item:
    _fields(obj, ITEM_FIELDS, ("item_id",), "item")
    item_id = _int64("item", "item_id", obj["item_id"])
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        raise _Reject("invalid_field", f"item.title must be a string, got {type(title).__name__}")
    numeric = obj.get("numeric")
    if numeric is not None and not isinstance(numeric, dict):
        raise _Reject("invalid_field", f"item.numeric must be a map of numbers, got {type(numeric).__name__}")
    num = {k: _finite("item", f"numeric[{k[:40]!r}]", x) for k, x in (numeric or {}).items()}
    return _schema_checked(validate_item, Item(
        item_id, title, _str_list("item", "categories", obj.get("categories")), _str_list("item", "tags", obj.get("tags")),
        _str_map("item", "attributes", obj.get("attributes")), num))


def _schema_checked(validate: Any, record: Any) -> Any:
    try:  # the contract's own checks (features.schema), after the wire-level ones above
        return validate(record)
    except SchemaError as e:
        raise _Reject("invalid_field", str(e)[:300]) from None


def _announcement(obj: dict[str, Any]) -> "ModelAnnouncement":
    _fields(obj, ANNOUNCEMENT_FIELDS, ANNOUNCEMENT_FIELDS, "model")
    for f in ANNOUNCEMENT_FIELDS:
        v = obj[f]
        if not isinstance(v, str) or not v:
            raise _Reject("invalid_field", f"model.{f} must be a non-empty string")
        if len(v) > MAX_ANNOUNCEMENT_FIELD_CHARS or _CONTROL.search(v):
            raise _Reject("invalid_field", f"model.{f} must be at most {MAX_ANNOUNCEMENT_FIELD_CHARS} characters "
                                           "without control characters")
    if not _SHA256_HEX.fullmatch(obj["checksum"]):
        raise _Reject("invalid_field", "model.checksum must be the manifest's sha256 as 64 hex digits")
    return ModelAnnouncement(version=obj["version"], uri=obj["uri"], checksum=obj["checksum"].lower())


def _total(build: Any, raw: Any, what: str) -> Any:
    try:
        return build(_load(raw, what))
    except _Reject as r:
        return r.rejection
    except RecursionError:
        return Rejection("too_deep", f"{what} message is nested deeper than {MAX_JSON_DEPTH}")
    except MemoryError:
        return Rejection("too_large", f"{what} message does not fit in memory")
    except Exception as e:  # a guard above missed a case: still a dead letter, never a crash
        return Rejection("undecodable", f"{what} message: {type(e).__name__}: {str(e)[:200]}")


def parse_event(raw: Any, bounds: EventBounds | None = None, now_ms: int | None = None) -> Event | Rejection:
    """Any message value -> an `Event` or the `Rejection` (never raises).

    `bounds` (with the consumer's wall clock `now_ms`) rejects implausible timestamps."""
    e = _total(_event, raw, "event")
    if bounds is not None and isinstance(e, Event):
        if now_ms is None:
            import time

            now_ms = int(time.time() * 1000)
        r = bounds.check(e.ts_ms, now_ms)
        if r is not None:
            return r
    return e


def parse_item(raw: Any) -> Item | Rejection:
    """Any message value -> an `Item` or the `Rejection` (never raises)."""
    return _total(_item, raw, "item")


def parse_announcement(raw: Any) -> "ModelAnnouncement | Rejection":
    """Any message value -> a `ModelAnnouncement` or the `Rejection` (never raises)."""
    return _total(_announcement, raw, "model")


def _raise(r: Any) -> Any:
    if isinstance(r, Rejection):
        raise MessageError(r.reason, r.detail)
    return r


def encode_event(e: Event) -> bytes:
    return json.dumps(e.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode_event(raw: Any, bounds: EventBounds | None = None, now_ms: int | None = None) -> Event:
    """`parse_event`, raising `MessageError` (only) for a rejection."""
    return _raise(parse_event(raw, bounds, now_ms))


def event_key(e: Event) -> bytes:
    return str(e.user_id).encode("ascii")


def encode_item(it: Item) -> bytes:
    return json.dumps(it.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode_item(raw: Any) -> Item:
    """`parse_item`, raising `MessageError` (only) for a rejection."""
    return _raise(parse_item(raw))


@dataclass(frozen=True)
class ModelAnnouncement:
    version: str
    uri: str
    checksum: str  # sha256 of the bundle's manifest, 64 hex digits

    def encode(self) -> bytes:
        return json.dumps({"version": self.version, "uri": self.uri, "checksum": self.checksum}).encode("utf-8")

    @classmethod
    def decode(cls, raw: Any) -> "ModelAnnouncement":
        """`parse_announcement`, raising `MessageError` (only) for a rejection."""
        return _raise(parse_announcement(raw))
