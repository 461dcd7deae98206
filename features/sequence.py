"""A user's behavior sequence and the one function that appends an event to it.

The Spark jobs build sequences for millions of users with window functions;
the streaming consumer keeps them up to date in Redis one event at a time.
Both must produce the same thing, so the semantics live here, once:

* which events are behaviors (`SequenceConfig.behavior_event_types`);
* the per-behavior fields: item id, timestamp, action code, category id;
* the order: chronological by ``ts_ms``; events with equal timestamps keep
  their ``event_id`` order offline and their arrival order online (producers
  emit a user's same-millisecond events in event_id order, so the two agree);
* the cap: the long-term sequence keeps the latest `long_cap` behaviors; the
  short-term sequence is the last `short_cap` of it.

`append_event` is pure: it returns a new state. The Spark job's reference test
folds it over events (`fold_events`) and compares with the Spark output row
for row. Python applies the rules in one place, `append_behaviors` (a run of
behaviors as arrays, in arrival order: what the streaming consumer and the
bulk bootstrap run, through `serving.state.update.apply_user_batch`), whose
one-event step is the one `append_event` takes; a property test checks it
against folding `append_event` event by event. `action_codes` is
`action_code` over arrays (Spark: `features.spark.exprs.action_code`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from features.hashing import hash_string
from features.layout import CATEGORY_FEATURE
from features.schema import Event, EventType

DEFAULT_BEHAVIOR_TYPES: tuple[str, ...] = ("click", "purchase", "rating", "interaction", "like", "add_to_cart", "view")
NUM_ACTIONS = 2 * (max(e.value for e in EventType) + 1)  # vocabulary size of action codes


@dataclass(frozen=True)
class SequenceConfig:
    long_cap: int = 10_000
    short_cap: int = 50
    behavior_event_types: tuple[str, ...] = DEFAULT_BEHAVIOR_TYPES

    def __post_init__(self) -> None:
        if self.long_cap <= 0 or self.short_cap <= 0:
            raise ValueError(f"long_cap and short_cap must be positive, got {self.long_cap}, {self.short_cap}")
        if self.short_cap > self.long_cap:
            raise ValueError(f"short_cap={self.short_cap} exceeds long_cap={self.long_cap}")
        for t in self.behavior_event_types:
            EventType.parse(t)


def action_code(event_type: str | int, label: float) -> int:
    """Event kind and outcome in one small id: 2 * EventType + (label >= 0.5); 0 = padding.

    Spark: ``2 * <event type code> + CAST(label >= 0.5 AS INT)``.
    """
    code = event_type if isinstance(event_type, int) else EventType.parse(event_type).value
    return 2 * int(code) + int(label >= 0.5)


_ACTION_BASE = {e.name.lower(): 2 * int(e.value) for e in EventType}  # action_code(name, 0.0)


def action_codes(event_types: Sequence[str] | np.ndarray, labels: Sequence[float] | np.ndarray) -> np.ndarray:
    """`action_code` of each (event type, label) pair, vectorised: (N,) int64.

    `event_types`: names (a list, or a string/object array) or `EventType` codes (an integer array).
    """
    pos = (np.asarray(labels) >= 0.5).astype(np.int64)  # (N,)
    if len(event_types) != len(pos):
        raise ValueError(f"action_codes: {len(event_types)} event types but {len(pos)} labels")
    if isinstance(event_types, np.ndarray) and event_types.dtype.kind in "iu":
        return 2 * event_types.astype(np.int64) + pos
    try:
        base = np.fromiter((_ACTION_BASE[t] for t in event_types), np.int64, len(pos))
    except KeyError as e:  # EventType.parse says what is wrong with the name
        EventType.parse(e.args[0])
        raise
    return base + pos


def category_id(categories: Iterable[str] | None) -> int:
    """The id of an item's primary (first) category; 0 when it has none.

    Spark: ``CASE WHEN try_element_at(categories, 1) IS NULL THEN 0 ELSE xxhash64(lit('category'),
    try_element_at(categories, 1)) END`` (not a ``coalesce``: xxhash64 skips NULL arguments and would
    return the feature seed; see features.spark.exprs.category_id).
    """
    for c in categories or ():
        return hash_string(c, CATEGORY_FEATURE)
    return 0


@dataclass(frozen=True)
class SequenceState:
    """A user's long-term behavior sequence, chronological, as parallel arrays."""

    item_ids: np.ndarray  # (L,) int64
    ts_ms: np.ndarray  # (L,) int64
    actions: np.ndarray  # (L,) int64
    categories: np.ndarray  # (L,) int64

    @classmethod
    def empty(cls) -> "SequenceState":
        z = np.empty(0, dtype=np.int64)
        return cls(z, z, z, z)

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def short(self, short_cap: int) -> "SequenceState":
        return self.tail(short_cap)

    def tail(self, n: int) -> "SequenceState":
        s = slice(max(len(self) - n, 0), None)
        return SequenceState(self.item_ids[s], self.ts_ms[s], self.actions[s], self.categories[s])

    def equals(self, other: "SequenceState") -> bool:
        return all(
            np.array_equal(getattr(self, f), getattr(other, f)) for f in ("item_ids", "ts_ms", "actions", "categories")
        )


def is_behavior(event: Event, cfg: SequenceConfig) -> bool:
    return event.event_type in cfg.behavior_event_types


def append_event(state: SequenceState, event: Event, category: int, cfg: SequenceConfig) -> SequenceState:
    """Returns `state` with `event` inserted in time order and capped at `cfg.long_cap`.

    Non-behavior events (e.g. impressions) leave the state unchanged. A late
    event is inserted after every behavior with ts_ms <= its ts_ms; if it is
    older than everything kept in a full sequence it falls off the cap.
    """
    if not is_behavior(event, cfg):
        return state
    return _insert(state, event.item_id, event.ts_ms, action_code(event.event_type, event.label), category,
                   cfg.long_cap)


def _insert(state: SequenceState, item_id: int, ts_ms: int, action: int, category: int, cap: int) -> SequenceState:
    """The one step: a behavior after every kept one with ts_ms <= its ts_ms, then the oldest beyond `cap` dropped."""
    pos = int(np.searchsorted(state.ts_ms, ts_ms, side="right"))
    item = np.insert(state.item_ids, pos, np.int64(item_id))
    ts = np.insert(state.ts_ms, pos, np.int64(ts_ms))
    act = np.insert(state.actions, pos, np.int64(action))
    cat = np.insert(state.categories, pos, np.int64(category))
    if item.shape[0] > cap:
        drop = item.shape[0] - cap
        item, ts, act, cat = item[drop:], ts[drop:], act[drop:], cat[drop:]
    return SequenceState(item, ts, act, cat)


def append_behaviors(state: SequenceState, item_ids: np.ndarray, ts_ms: np.ndarray, actions: np.ndarray,
                     categories: np.ndarray, cfg: SequenceConfig) -> tuple[SequenceState, bool]:
    """`state` after behaviors (parallel (B,) int64 arrays, arrival order) -> (new state, whether they were in order).

    Equals folding `append_event` over them. In order (the common case: each at or after the newest kept
    behavior) they are appended in one concatenation, which is what that fold gives (``searchsorted(side=
    "right")`` of a timestamp >= every kept one is the end, and the cap drops from the front); otherwise they
    are inserted one at a time by `append_event`'s step.
    """
    b = len(ts_ms)
    if not b:
        return state, True
    old_ts = state.ts_ms
    if (not old_ts.shape[0] or ts_ms[0] >= old_ts[-1]) and (b == 1 or bool((ts_ms[1:] >= ts_ms[:-1]).all())):
        out = SequenceState(np.concatenate([state.item_ids, item_ids]), np.concatenate([state.ts_ms, ts_ms]),
                            np.concatenate([state.actions, actions]), np.concatenate([state.categories, categories]))
        return (out.tail(cfg.long_cap) if len(out) > cfg.long_cap else out), True
    for row in zip(item_ids.tolist(), ts_ms.tolist(), actions.tolist(), categories.tolist()):
        state = _insert(state, *row, cfg.long_cap)
    return state, False


def fold_events(
    events: Iterable[Event], item_categories: Mapping[int, int], cfg: SequenceConfig,
    state: SequenceState | None = None,
) -> SequenceState:
    """The reference: folds `append_event` over events ordered by (ts_ms, event_id)."""
    st = state if state is not None else SequenceState.empty()
    for e in sorted(events, key=lambda e: (e.ts_ms, e.event_id)):
        st = append_event(st, e, item_categories.get(e.item_id, 0), cfg)
    return st
