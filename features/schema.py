"""The data contract: canonical `events`, `items` and `users` tables.

Every stage reads and writes these shapes: the dataset importers and the
synthetic generator write them as Parquet, the Spark jobs read them, the Kafka
`events` topic carries one `Event` per message, and serving keeps what it
needs of them in Redis. Field meanings (DESIGN.md, "The data contract"):

events
    event_id    unique string; idempotency key end to end (Kafka, Redis)
    user_id     int64 (raw ids of other types go through `features.hashing.hash_raw_id`)
    item_id     int64
    ts_ms       int64, Unix milliseconds (UTC)
    event_type  one of `EventType` names (lower case)
    label       float; 1.0 positive / 0.0 negative for the ranking task
    value       float; the raw signal (rating, dwell seconds, price, ...); NaN if none
    context     string -> string map (surface, device, ...)
items
    item_id, title, categories (multi-valued, e.g. genres), tags (multi-valued),
    attributes (string map), numeric (string -> float map)
users
    user_id, attributes (string map), numeric (string -> float map)

The schema is versioned (`SCHEMA_VERSION`); every derived dataset's manifest
records the version it was written with.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa

SCHEMA_VERSION = "1"


class EventType(enum.IntEnum):
    """Event kinds. Codes are stable (stored in sequences); append only, never renumber.

    Code 0 is reserved for padding in dense sequence tensors.
    """

    IMPRESSION = 1
    CLICK = 2
    PURCHASE = 3
    RATING = 4
    INTERACTION = 5  # an implicit positive from a dataset without event kinds
    ADD_TO_CART = 6
    LIKE = 7
    VIEW = 8

    @classmethod
    def parse(cls, name: str) -> "EventType":
        """The type named exactly (lower case, as stored and as Spark matches it): "click", never "CLICK"."""
        if not isinstance(name, str) or name != name.lower() or name.upper() not in cls.__members__:
            known = ", ".join(e.name.lower() for e in cls)
            raise ValueError(f"event_type {name!r} is not one of: {known}")
        return cls[name.upper()]


EVENT_TYPE_NAMES: tuple[str, ...] = tuple(e.name.lower() for e in EventType)

STRING_MAP = pa.map_(pa.string(), pa.string())
FLOAT_MAP = pa.map_(pa.string(), pa.float32())

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("label", pa.float32(), nullable=False),
        pa.field("value", pa.float32(), nullable=True),
        pa.field("context", STRING_MAP, nullable=True),
    ],
    metadata={"cascade.table": "events", "cascade.schema_version": SCHEMA_VERSION},
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string(), nullable=True),
        pa.field("categories", pa.list_(pa.string()), nullable=True),
        pa.field("tags", pa.list_(pa.string()), nullable=True),
        pa.field("attributes", STRING_MAP, nullable=True),
        pa.field("numeric", FLOAT_MAP, nullable=True),
    ],
    metadata={"cascade.table": "items", "cascade.schema_version": SCHEMA_VERSION},
)

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("attributes", STRING_MAP, nullable=True),
        pa.field("numeric", FLOAT_MAP, nullable=True),
    ],
    metadata={"cascade.table": "users", "cascade.schema_version": SCHEMA_VERSION},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # file the row came from
        pa.field("line", pa.int64(), nullable=False),  # 1-based line number (0 if not line-based)
        pa.field("reason", pa.string(), nullable=False),  # short machine-readable reason code
        pa.field("detail", pa.string(), nullable=False),  # human-readable explanation
        pa.field("raw", pa.string(), nullable=False),  # the offending input, verbatim
    ],
    metadata={"cascade.table": "quarantine", "cascade.schema_version": SCHEMA_VERSION},
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "events": EVENTS_SCHEMA,
    "items": ITEMS_SCHEMA,
    "users": USERS_SCHEMA,
    "quarantine": QUARANTINE_SCHEMA,
}

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class SchemaError(ValueError):
    """A record or table does not match the data contract; the message names the field."""


def _require_int64(obj: str, name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SchemaError(f"{obj}.{name} must be an int64, got {type(v).__name__} {v!r}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise SchemaError(f"{obj}.{name}={v} is outside the int64 range")
    return v


def _require_str_map(obj: str, name: str, v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise SchemaError(f"{obj}.{name} must be a string map, got {type(v).__name__}")
    for k, x in v.items():
        if not isinstance(k, str) or not isinstance(x, str):
            raise SchemaError(f"{obj}.{name}[{k!r}] must map str to str, got {type(x).__name__}")
    return dict(v)


@dataclass(frozen=True)
class Event:
    """One row of `events` (and one message on the Kafka `events` topic)."""

    event_id: str
    user_id: int
    item_id: int
    ts_ms: int
    event_type: str
    label: float
    value: float = math.nan
    context: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "ts_ms": self.ts_ms,
            "event_type": self.event_type,
            "label": self.label,
            "value": None if math.isnan(self.value) else self.value,
            "context": dict(self.context),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Event":
        """Builds an Event from a decoded mapping; `validate_event` checks it."""
        value = d.get("value")
        return cls(
            event_id=d.get("event_id"),  # type: ignore[arg-type]
            user_id=d.get("user_id"),  # type: ignore[arg-type]
            item_id=d.get("item_id"),  # type: ignore[arg-type]
            ts_ms=d.get("ts_ms"),  # type: ignore[arg-type]
            event_type=d.get("event_type"),  # type: ignore[arg-type]
            label=d.get("label"),  # type: ignore[arg-type]
            value=math.nan if value is None else value,
            context=d.get("context") or {},
        )


def validate_event(e: Event) -> Event:
    """Checks an Event against the contract; raises SchemaError naming the field."""
    if not isinstance(e.event_id, str) or not e.event_id:
        raise SchemaError(f"event.event_id must be a non-empty string, got {e.event_id!r}")
    if len(e.event_id) > 256:
        raise SchemaError(f"event.event_id is {len(e.event_id)} characters long (max 256)")
    _require_int64("event", "user_id", e.user_id)
    _require_int64("event", "item_id", e.item_id)
    ts = _require_int64("event", "ts_ms", e.ts_ms)
    if ts < 0:
        raise SchemaError(f"event.ts_ms={ts} is negative")
    if not isinstance(e.event_type, str):
        raise SchemaError(f"event.event_type must be a string, got {type(e.event_type).__name__}")
    try:
        EventType.parse(e.event_type)
    except ValueError as err:
        raise SchemaError(f"event.{err}") from None
    for name in ("label", "value"):
        v = getattr(e, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(f"event.{name} must be a number, got {type(v).__name__} {str(v)[:40]}")
    if isinstance(e.label, int) and not -1e308 < e.label < 1e308 or math.isnan(e.label) or math.isinf(e.label):
        raise SchemaError(f"event.label must be finite, got {str(e.label)[:40]}")
    _require_str_map("event", "context", e.context)
    return e


@dataclass(frozen=True)
class Item:
    """One row of `items`."""

    item_id: int
    title: str | None = None
    categories: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    numeric: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "title": self.title,
            "categories": list(self.categories),
            "tags": list(self.tags),
            "attributes": dict(self.attributes),
            "numeric": dict(self.numeric),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Item":
        return cls(
            item_id=d.get("item_id"),  # type: ignore[arg-type]
            title=d.get("title"),
            categories=tuple(d.get("categories") or ()),
            tags=tuple(d.get("tags") or ()),
            attributes=_as_dict(d.get("attributes")),
            numeric=_as_dict(d.get("numeric")),
        )


def validate_item(it: Item) -> Item:
    _require_int64("item", "item_id", it.item_id)
    for name in ("categories", "tags"):
        for i, v in enumerate(getattr(it, name)):
            if not isinstance(v, str) or not v:
                raise SchemaError(f"item.{name}[{i}] must be a non-empty string, got {v!r}")
    _require_str_map("item", "attributes", it.attributes)
    for k, v in it.numeric.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(f"item.numeric[{k!r}] must be a number, got {v!r}")
    return it


@dataclass(frozen=True)
class User:
    """One row of `users`."""

    user_id: int
    attributes: Mapping[str, str] = field(default_factory=dict)
    numeric: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "attributes": dict(self.attributes), "numeric": dict(self.numeric)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "User":
        return cls(
            user_id=d.get("user_id"),  # type: ignore[arg-type]
            attributes=_as_dict(d.get("attributes")),
            numeric=_as_dict(d.get("numeric")),
        )


def validate_user(u: User) -> User:
    _require_int64("user", "user_id", u.user_id)
    _require_str_map("user", "attributes", u.attributes)
    return u


def _as_dict(v: Any) -> dict:
    # pyarrow returns map columns as lists of (key, value) tuples.
    if v is None:
        return {}
    if isinstance(v, Mapping):
        return dict(v)
    return dict(v)


def records_to_table(records: list[Any], table: str) -> pa.Table:
    """Typed records (Event/Item/User) -> a pyarrow Table with the canonical schema."""
    schema = TABLE_SCHEMAS[table]
    rows = [r.to_dict() for r in records]
    cols = {f.name: [row[f.name] for row in rows] for f in schema}
    for name in ("context", "attributes", "numeric"):
        if name in cols:
            cols[name] = [list(m.items()) if m is not None else None for m in cols[name]]
    return pa.Table.from_pydict(cols, schema=schema)


def table_to_records(t: pa.Table, table: str) -> list[Any]:
    """The inverse of `records_to_table`."""
    cls = {"events": Event, "items": Item, "users": User}[table]
    return [cls.from_dict(row) for row in t.to_pylist()]


def check_table_schema(t: pa.Table | pa.Schema, table: str, where: str = "") -> None:
    """Raises SchemaError if `t` lacks a canonical column or has it with another type."""
    schema = t if isinstance(t, pa.Schema) else t.schema
    expected = TABLE_SCHEMAS[table]
    loc = f" in {where}" if where else ""
    for f in expected:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            raise SchemaError(f"{table}{loc}: column {f.name!r} is missing (have {schema.names})")
        got = schema.field(idx).type
        if not got.equals(f.type):
            raise SchemaError(f"{table}{loc}: column {f.name!r} has type {got}, expected {f.type}")
