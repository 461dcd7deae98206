"""Feature transforms shared by training and serving: counters -> the dense features a model sees.

The Spark jobs compute *counters* (per user and per item, over time windows,
strictly before each sample's timestamp); the reader turns them into dense
tensors here, and the gRPC server calls the very same functions on counters it
reads from Redis. One implementation of each transform, so training and
serving cannot skew.

Counters, for an entity ``user`` or ``item`` and a window ``w`` of
`StatsConfig.windows` (``1d``, ``7d``, ``30d``, ``all`` by default)::

    {entity}_cnt_{w}   events of the entity in [t - w, t)  (``all``: before t)
    {entity}_pos_{w}   those of them with label >= 0.5

where the counted events are those whose type is in `StatsConfig.event_types`
(all types by default, impressions included, so ``pos / cnt`` is a CTR where
the data has impressions and a positive-rating share on MovieLens).

Dense features (`DenseLayout`), float32:

    user_dense       per window: log1p(cnt), smoothed rate           (B, 2W)
    candidate_dense  per window: log1p(cnt), smoothed rate of the item,
                     then signed log1p of each numeric item attribute  (N, 2W + K)

with ``smoothed rate = (pos + m * prior_rate) / (cnt + m)``, ``m`` =
`StatsConfig.prior_weight` and ``prior_rate`` the positive rate of the
counted events in the training window (recorded in the features manifest).

Example::

    layout = DenseLayout(StatsConfig(), prior_rate=0.55, item_numeric_keys=("year",))
    u = layout.user_dense({"user_cnt_1d": [0, 3], "user_pos_1d": [0, 2], ...})   # (2, 8)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from features.schema import EventType

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
ALL_TIME = "all"
ENTITIES = ("user", "item")

ArrayLike = np.ndarray | Sequence[float] | Sequence[int]


def parse_window(name: str) -> int | None:
    """A window name -> its length in ms; ``"all"`` -> None (everything before t)."""
    if name == ALL_TIME:
        return None
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", name)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"stats window {name!r} must look like 30m, 12h, 1d, 2w or {ALL_TIME!r}")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def window_start(t_ms: int, window_ms: int | None) -> int | None:
    """The counter window rule, the one Python statement of it: a counter over `window_ms` at time t counts
    the events with ``window_start <= ts < t`` (None, the ``all`` window: no lower bound). Strictly before
    t: a sample never counts itself or anything at its own millisecond. Spark states the same rule as JVM
    range frames (`features.spark.stats`); the Spark-vs-Python parity tests keep the two equal."""
    return None if window_ms is None else t_ms - window_ms


def in_window(ts: np.ndarray, t_ms: int, window_ms: int | None) -> np.ndarray:
    """(M,) bool: which of the timestamps `ts` a counter over `window_ms` at time t counts (`window_start`)."""
    lo = window_start(t_ms, window_ms)
    return ts < t_ms if lo is None else (ts >= lo) & (ts < t_ms)


@dataclass(frozen=True)
class StatsConfig:
    """Which counters exist and how they become features (shared by Spark, reader and server)."""

    windows: tuple[str, ...] = ("1d", "7d", "30d", ALL_TIME)
    event_types: tuple[str, ...] = ()  # events that are counted; () = every event type
    prior_weight: float = 10.0  # pseudo-count of the smoothed rate

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("stats.windows must name at least one window")
        if len(set(self.windows)) != len(self.windows):
            raise ValueError(f"stats.windows has duplicates: {list(self.windows)}")
        for w in self.windows:
            parse_window(w)
        for t in self.event_types:
            EventType.parse(t)
        if self.prior_weight < 0:
            raise ValueError(f"stats.prior_weight must be >= 0, got {self.prior_weight}")

    def window_ms(self) -> tuple[int | None, ...]:
        return tuple(parse_window(w) for w in self.windows)

    def counted_event_types(self) -> tuple[str, ...]:
        return self.event_types or tuple(e.name.lower() for e in EventType)


def cnt_column(entity: str, window: str) -> str:
    return f"{entity}_cnt_{window}"


def pos_column(entity: str, window: str) -> str:
    return f"{entity}_pos_{window}"


def counter_columns(entity: str, cfg: StatsConfig) -> tuple[str, ...]:
    """The counter columns of `entity` in order: cnt, pos of every window."""
    if entity not in ENTITIES:
        raise ValueError(f"entity must be one of {ENTITIES}, got {entity!r}")
    return tuple(c for w in cfg.windows for c in (cnt_column(entity, w), pos_column(entity, w)))


def stats_dense_names(entity: str, cfg: StatsConfig) -> tuple[str, ...]:
    return tuple(n for w in cfg.windows for n in (f"{entity}_log1p_cnt_{w}", f"{entity}_rate_{w}"))


def _column(counters: Mapping[str, Any], name: str, n: int | None) -> np.ndarray:
    if name not in counters:
        raise ValueError(f"counter {name!r} is missing (have {sorted(counters)})")
    a = np.asarray(counters[name], dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"counter {name!r} must be 1-D, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"counter {name!r} has {a.shape[0]} rows, expected {n}")
    bad = ~np.isfinite(a) | (a < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"counter {name!r} row {i} is {a[i]}: counts must be finite and >= 0")
    return a


def stats_dense(counters: Mapping[str, Any], entity: str, cfg: StatsConfig, prior_rate: float) -> np.ndarray:
    """Counters of one entity -> (N, 2W) float32: per window log1p(cnt) and the smoothed rate."""
    if not 0.0 <= prior_rate <= 1.0:
        raise ValueError(f"prior_rate must be in [0, 1], got {prior_rate}")
    cols: list[np.ndarray] = []
    n: int | None = None
    m = cfg.prior_weight
    for w in cfg.windows:
        cnt = _column(counters, cnt_column(entity, w), n)
        n = cnt.shape[0]
        pos = _column(counters, pos_column(entity, w), n)
        over = pos > cnt
        if over.any():
            i = int(np.flatnonzero(over)[0])
            raise ValueError(f"{pos_column(entity, w)} row {i} is {pos[i]} > {cnt_column(entity, w)} = {cnt[i]}")
        denom = cnt + m
        rate = np.where(denom > 0, (pos + m * prior_rate) / np.where(denom > 0, denom, 1.0), prior_rate)
        cols += [np.log1p(cnt), rate]
    return np.stack(cols, axis=1).astype(np.float32)  # (N, 2W)


def signed_log1p(x: ArrayLike) -> np.ndarray:
    """sign(x) * log1p(|x|), NaN (missing) -> 0: numeric attributes of any scale (price, year)."""
    a = np.asarray(x, dtype=np.float64)
    out = np.sign(a) * np.log1p(np.abs(a))
    return np.where(np.isfinite(out), out, 0.0)


@dataclass(frozen=True)
class DenseLayout:
    """The dense feature vectors of the ranking batch, built the same way offline and online.

    `prior_rate` and `item_numeric_keys` come from the features manifest
    (`DenseLayout.from_manifest`), so the server reproduces the reader exactly.
    A model bundle carries the same block (`to_manifest`, the one writer; `from_manifest`,
    the one reader, of both the features manifest and a bundle's ``features`` entry).
    """

    stats: StatsConfig
    prior_rate: float
    item_numeric_keys: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "DenseLayout":
        try:
            s = manifest["config"]["stats"]
            stats = StatsConfig(
                windows=tuple(s["windows"]), event_types=tuple(s["event_types"]), prior_weight=float(s["prior_weight"])
            )
            return cls(stats, float(manifest["dense"]["prior_rate"]), tuple(manifest["dense"]["item_numeric_keys"]))
        except KeyError as e:
            raise ValueError(f"features manifest lacks {e}: was it written by `cascade build-features`?") from None

    def to_manifest(self) -> dict[str, Any]:
        """The ``{"config": {"stats"}, "dense"}`` block `from_manifest` reads (a bundle's ``features`` entry)."""
        s = self.stats
        return {"config": {"stats": {"windows": list(s.windows), "event_types": list(s.event_types),
                                     "prior_weight": s.prior_weight}},
                "dense": {"prior_rate": self.prior_rate, "item_numeric_keys": list(self.item_numeric_keys)}}

    def user_names(self) -> tuple[str, ...]:
        return stats_dense_names("user", self.stats)

    def candidate_names(self) -> tuple[str, ...]:
        return stats_dense_names("item", self.stats) + tuple(f"item_num_{k}" for k in self.item_numeric_keys)

    def user_dense(self, user_counters: Mapping[str, Any]) -> np.ndarray:
        """user counters (one array per counter column) -> (B, 2W) float32."""
        return stats_dense(user_counters, "user", self.stats, self.prior_rate)

    def candidate_dense(self, item_counters: Mapping[str, Any], item_numeric: Mapping[str, Any]) -> np.ndarray:
        """item counters + numeric attributes (NaN = missing) -> (N, 2W + K) float32."""
        st = stats_dense(item_counters, "item", self.stats, self.prior_rate)
        if not self.item_numeric_keys:
            return st
        num = []
        for k in self.item_numeric_keys:
            if k not in item_numeric:
                raise ValueError(f"numeric item attribute {k!r} is missing (have {sorted(item_numeric)})")
            v = np.asarray(item_numeric[k], dtype=np.float64)
            if v.shape != (st.shape[0],):
                raise ValueError(f"numeric item attribute {k!r} has shape {v.shape}, expected ({st.shape[0]},)")
            num.append(signed_log1p(v))
        return np.concatenate([st, np.stack(num, axis=1).astype(np.float32)], axis=1)
