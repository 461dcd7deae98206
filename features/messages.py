"""Wire format of the Kafka topics (part of the data contract).

Topics (names configurable; these are the defaults):

* ``cascade.events``: one `Event` per message, JSON (UTF-8), key = user_id as
  decimal ASCII so one user's events stay ordered on one partition.
* ``cascade.items``: one `Item` per message, JSON, key = item_id.
* ``cascade.models``: a model announcement, JSON ``{"version", "uri", "checksum"}``.
* ``cascade.dead-letter``: the original bytes plus headers ``reason``,
  ``source_topic``, ``source_partition``, ``source_offset``.

Decoding validates against the schema and raises `MessageError` naming the
field, so consumers can dead-letter the message with that reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from features.schema import Event, Item, SchemaError, validate_event, validate_item

MAX_MESSAGE_BYTES = 64 * 1024


@dataclass(frozen=True)
class KafkaTopics:
    events: str = "cascade.events"
    items: str = "cascade.items"
    models: str = "cascade.models"
    dead_letter: str = "cascade.dead-letter"

    def all(self) -> tuple[str, ...]:
        return (self.events, self.items, self.models, self.dead_letter)


class MessageError(ValueError):
    """A message cannot be decoded into the contract; `reason` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _load(raw: bytes, what: str) -> Mapping[str, Any]:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageError("too_large", f"{what} message is {len(raw)} bytes (max {MAX_MESSAGE_BYTES})")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MessageError("not_json", f"{what} message is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise MessageError("not_object", f"{what} message must be a JSON object, got {type(obj).__name__}")
    return obj


def encode_event(e: Event) -> bytes:
    return json.dumps(e.to_dict(), separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode_event(raw: bytes) -> Event:
    obj = _load(raw, "event")
    unknown = set(obj) - {"event_id", "user_id", "item_id", "ts_ms", "event_type", "label", "value", "context"}
    if unknown:
        raise MessageError("unknown_field", f"event has unknown field(s) {sorted(unknown)}")
    for f in ("event_id", "user_id", "item_id", "ts_ms", "event_type", "label"):
        if f not in obj:
            raise MessageError("missing_field", f"event.{f} is missing")
    try:
        return validate_event(Event.from_dict(obj))
    except SchemaError as err:
        raise MessageError("invalid_field", str(err)) from None


def event_key(e: Event) -> bytes:
    return str(e.user_id).encode("ascii")


def encode_item(it: Item) -> bytes:
    return json.dumps(it.to_dict(), separators=(",", ":")).encode("utf-8")


def decode_item(raw: bytes) -> Item:
    obj = _load(raw, "item")
    if "item_id" not in obj:
        raise MessageError("missing_field", "item.item_id is missing")
    try:
        return validate_item(Item.from_dict(obj))
    except (SchemaError, TypeError) as err:
        raise MessageError("invalid_field", str(err)) from None


@dataclass(frozen=True)
class ModelAnnouncement:
    version: str
    uri: str
    checksum: str

    def encode(self) -> bytes:
        return json.dumps({"version": self.version, "uri": self.uri, "checksum": self.checksum}).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes) -> "ModelAnnouncement":
        obj = _load(raw, "model")
        for f in ("version", "uri", "checksum"):
            if not isinstance(obj.get(f), str) or not obj[f]:
                raise MessageError("invalid_field", f"model.{f} must be a non-empty string")
        return cls(version=obj["version"], uri=obj["uri"], checksum=obj["checksum"])
