"""Fixtures of the feature-job tests: one Spark session, two feature builds, pure-Python references.

* `spark`: local[2], started once per test session (~7 s) and shared.
* `small_dataset`: hand-made edge cases (ties, impressions, late and duplicate
  events, invalid rows, items without categories, unknown items, users with
  only impressions) merged with the first 300 users of the real Amazon Beauty
  file (positive-only `interaction` events -> sampled negatives).
* `small_features`: every job on it with tiny caps and windows.
* `ml100k_features`: every job on real ML-100K through the `cascade build-features` CLI.
* `ref`: the pure-Python reference implementations the Spark outputs are compared with.
"""
from __future__ import annotations

import bisect
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from features.schema import EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA, Event
from features.sequence import SequenceConfig, SequenceState, action_code, category_id, fold_events
from features.transforms import StatsConfig, cnt_column, pos_column, window_start

SMALL_OVERRIDES = [
    "sequence.long_cap=4", "sequence.short_cap=2",
    "stats.windows=[2s, 1m, all]",
    "ranking.negatives_per_positive=3", "ranking.sampler_slots=4096", "ranking.seed=7",
    "split.valid_quantile=0.7", "split.test_quantile=0.85",
    "output.max_records_per_file=3000",
    "spark.shuffle_partitions=4",
]
ML100K_OVERRIDES = ["spark.shuffle_partitions=4", "output.max_records_per_file=20000"]


def _nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema], metadata=schema.metadata)


def _ev(eid, user, item, ts, etype, label):
    return {"event_id": eid, "user_id": user, "item_id": item, "ts_ms": ts, "event_type": etype, "label": label,
            "value": None, "context": None}


# Hand-made users 9001..9005, items 90010..; invalid rows are listed in INVALID.
HANDMADE_EVENTS = [
    _ev("h/9001/00", 9001, 90010, 1000, "impression", 0.0),
    _ev("h/9001/01", 9001, 90011, 1000, "click", 1.0),  # ties with the impression
    _ev("h/9001/02", 9001, 90012, 2000, "click", 1.0),
    _ev("h/9001/03", 9001, 90013, 2000, "purchase", 1.0),  # same ms, ordered by event_id
    _ev("h/9001/05", 9001, 90014, 5000, "click", 1.0),
    _ev("h/9001/04", 9001, 90015, 3000, "click", 1.0),  # arrives after a later event: out of order
    _ev("h/9001/02", 9001, 90012, 2000, "click", 1.0),  # duplicate delivery
    _ev("h/9001/06", 9001, 90010, 70_000, "impression", 0.0),
    _ev("h/9001/07", 9001, 90011, 70_000, "click", 0.0),  # a behavior with label 0
    _ev("h/9001/08", 9001, 90016, 4_000_000, "click", 1.0),
    _ev("h/9001/09", 9001, 90099, 4_000_500, "click", 1.0),  # item missing from the items table
    *[_ev(f"h/9002/{i:02d}", 9002, 90010 + i % 5, 10_000 + 30_000 * (i // 2), "rating", float(i % 3 == 0))
      for i in range(12)],  # pairs of ratings at the same ms
    *[_ev(f"h/9003/{i:02d}", 9003, 90010 + (i * 7) % 6, 1000 * i, "interaction", 1.0) for i in range(9)],
    *[_ev(f"h/9004/{i:02d}", 9004, 90010 + i, 2000 * i, "impression", 0.0) for i in range(4)],  # no behaviors
    _ev("h/9005/00", 9005, 90012, 50_000, "like", 1.0),
    _ev("h/9005/01", 9005, 90013, 50_000, "view", 0.0),
]
INVALID = {
    "missing_event_id": _ev("", 9001, 90010, 10, "click", 1.0),
    "missing_field": _ev("h/bad/1", None, 90010, 10, "click", 1.0),
    "negative_ts": _ev("h/bad/2", 9001, 90010, -5, "click", 1.0),
    "unknown_event_type": _ev("h/bad/3", 9001, 90010, 10, "teleport", 1.0),
    "non_finite_label": _ev("h/bad/4", 9001, 90010, 10, "click", float("nan")),
}
HANDMADE_ITEMS = [
    {"item_id": 90010, "title": "a", "categories": ["Alpha", "Beta"], "tags": ["t1", "t2"],
     "attributes": [("brand", "acme"), ("color", "red")], "numeric": [("price", 9.5)]},
    {"item_id": 90011, "title": "b", "categories": [], "tags": [], "attributes": [("brand", "zeta")], "numeric": []},
    {"item_id": 90012, "title": "c", "categories": None, "tags": None, "attributes": None, "numeric": None},
    {"item_id": 90013, "title": "d", "categories": ["Gamma"], "tags": ["t3"], "attributes": [], "numeric": [("price", -2.0)]},
    {"item_id": 90014, "title": "e", "categories": ["Beta"], "tags": [], "attributes": [], "numeric": []},
    {"item_id": 90015, "title": "f", "categories": ["Alpha"], "tags": [], "attributes": [], "numeric": []},
    {"item_id": 90016, "title": "g", "categories": ["Delta"], "tags": ["t1"], "attributes": [], "numeric": []},
]
HANDMADE_USERS = [
    {"user_id": 9001, "attributes": [("gender", "F"), ("age", "25")], "numeric": [("age", 25.0)]},
    {"user_id": 9002, "attributes": [("gender", "M")], "numeric": []},
    {"user_id": 9003, "attributes": None, "numeric": None},
]


@pytest.fixture(scope="session")
def spark():
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from features.spark.config import SparkConfig
    from features.spark.session import build_session

    # C1-only JIT: the tests' inputs are tiny, where it halves build times on 2 cores (see SparkConfig)
    handle = build_session(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="2g",
                                       driver_java_options="-XX:TieredStopAtLevel=1"))
    yield handle.spark
    handle.stop()


@pytest.fixture(scope="session")
def small_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-made rows + the first 300 users of Amazon Beauty, as a canonical dataset directory."""
    from features.datasets import import_dataset, read_table

    tmp = tmp_path_factory.mktemp("small")
    src = tmp / "beauty300.txt"
    with open(shared_data / "amazon-beauty" / "Beauty.txt") as f:
        src.write_text("".join(line for _, line in zip(range(300), f)))
    beauty = import_dataset(src, tmp / "beauty300", dataset="beauty")
    out = tmp / "dataset"
    bad = list(INVALID.values())
    tables = {
        "events": pa.concat_tables([
            read_table(tmp / "beauty300", "events").cast(_nullable(EVENTS_SCHEMA)),
            pa.Table.from_pylist(HANDMADE_EVENTS + bad, schema=_nullable(EVENTS_SCHEMA)),
        ]),
        "items": pa.concat_tables([
            read_table(tmp / "beauty300", "items"), pa.Table.from_pylist(HANDMADE_ITEMS, schema=ITEMS_SCHEMA),
        ]),
        "users": pa.concat_tables([
            read_table(tmp / "beauty300", "users"), pa.Table.from_pylist(HANDMADE_USERS, schema=USERS_SCHEMA),
        ]),
    }
    for name, t in tables.items():
        (out / name).mkdir(parents=True)
        pq.write_table(t, out / name / "part-00000.parquet", row_group_size=2000)
    manifest = dict(beauty.manifest, dataset="small", tables={k: {"rows": v.num_rows} for k, v in tables.items()})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _small_config():
    from features.config import load_config
    from features.spark.config import FeatureBuildConfig

    return load_config(FeatureBuildConfig, None, SMALL_OVERRIDES)


@pytest.fixture(scope="session")
def small_config():
    return _small_config()


@pytest.fixture(scope="session")
def small_features(spark, small_dataset: Path, small_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from features.spark.pipeline import build_features

    out = tmp_path_factory.mktemp("small_features") / "features"
    build_features(spark, small_dataset, out, small_config)
    return out


@pytest.fixture(scope="session")
def ml100k_features(spark, ml100k_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ML-100K through `cascade build-features` (in-process: it reuses the test's Spark session)."""
    from jobs.cli import main

    out = tmp_path_factory.mktemp("ml100k_features") / "features"
    rc = main(["build-features", "--dataset", str(ml100k_dataset), "--out", str(out), *ML100K_OVERRIDES])
    assert rc == 0
    return out


# ---------------------------------------------------------------- references

def read_events(dataset: Path) -> list[dict]:
    return pq.read_table(dataset / "events").to_pylist()


def valid_events(rows: list[dict]) -> list[Event]:
    """The reference validation: drop invalid rows, keep the first (user, event_id) occurrence in input order."""
    seen, out = set(), []
    for r in rows:
        if not r["event_id"] or any(r[k] is None for k in ("user_id", "item_id", "ts_ms", "event_type", "label")):
            continue
        if r["ts_ms"] < 0 or r["event_type"] not in {e.lower() for e in ("impression", "click", "purchase", "rating",
                                                                        "interaction", "add_to_cart", "like", "view")}:
            continue
        if not math.isfinite(r["label"]):
            continue
        key = (r["user_id"], r["event_id"])
        if key in seen:
            continue
        seen.add(key)
        out.append(Event(r["event_id"], r["user_id"], r["item_id"], r["ts_ms"], r["event_type"], r["label"]))
    return out


def item_categories(dataset: Path) -> dict[int, int]:
    return {r["item_id"]: category_id(r["categories"]) for r in pq.read_table(dataset / "items").to_pylist()}


def timelines(events: list[Event], cats: dict[int, int], cfg: SequenceConfig) -> dict[int, SequenceState]:
    """Every user's uncapped behaviors, sorted by (ts_ms, event_id) (`sequences` checks the fold itself)."""
    by_user: dict[int, list[Event]] = defaultdict(list)
    for e in events:
        if e.event_type in cfg.behavior_event_types:
            by_user[e.user_id].append(e)
    out = {}
    for u, evs in by_user.items():
        evs.sort(key=lambda e: (e.ts_ms, e.event_id))
        out[u] = SequenceState(
            np.array([e.item_id for e in evs], dtype=np.int64), np.array([e.ts_ms for e in evs], dtype=np.int64),
            np.array([action_code(e.event_type, e.label) for e in evs], dtype=np.int64),
            np.array([cats.get(e.item_id, 0) for e in evs], dtype=np.int64),
        )
    return out


def sequences(events: list[Event], cats: dict[int, int], cfg: SequenceConfig) -> dict[int, object]:
    by_user: dict[int, list[Event]] = defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    return {u: st for u, evs in by_user.items() if len(st := fold_events(evs, cats, cfg))}


class _Counter:
    """Counted events of one user or item: sorted timestamps with prefix sums of positives."""

    def __init__(self, rows: list[tuple[int, int]]) -> None:
        rows.sort()
        self.ts = [t for t, _ in rows]
        self.pos = [0]
        for _, p in rows:
            self.pos.append(self.pos[-1] + p)

    def count(self, lo: int | None, hi: int) -> tuple[int, int]:
        """(events, positives) with lo <= ts < hi (lo None: unbounded)."""
        a = 0 if lo is None else bisect.bisect_left(self.ts, lo)
        b = bisect.bisect_left(self.ts, hi)
        return b - a, self.pos[b] - self.pos[a]


def counters(events: list[Event], key: str, stats: StatsConfig) -> dict[int, _Counter]:
    counted = set(stats.counted_event_types())
    rows: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for e in events:
        if e.event_type in counted:
            rows[getattr(e, key)].append((e.ts_ms, int(e.label >= 0.5)))
    return {k: _Counter(v) for k, v in rows.items()}


def counter_values(c: _Counter | None, entity: str, t: int, stats: StatsConfig) -> dict[str, int]:
    out = {}
    for w, ms in zip(stats.windows, stats.window_ms()):
        n, p = (0, 0) if c is None else c.count(window_start(t, ms), t)
        out[cnt_column(entity, w)] = n
        out[pos_column(entity, w)] = p
    return out


def observed_ranking_samples(events: list[Event], cats: dict[int, int], cfg, cuts: tuple[int, int]) -> dict[str, dict]:
    """sample_id -> the fields of every observed (non-sampled) ranking sample, computed directly."""
    beh = set(cfg.sequence.behavior_event_types)
    beh_ts: dict[int, list[int]] = defaultdict(list)
    for e in events:
        if e.event_type in beh:
            beh_ts[e.user_id].append(e.ts_ms)
    for v in beh_ts.values():
        v.sort()
    users, items = counters(events, "user_id", cfg.stats), counters(events, "item_id", cfg.stats)
    out = {}
    for e in events:
        if e.event_type not in cfg.ranking.event_types:
            continue
        row = {
            "user_id": e.user_id, "item_id": e.item_id, "item_category": cats.get(e.item_id, 0), "ts_ms": e.ts_ms,
            "event_type": e.event_type, "label": e.label,
            "hist_len": bisect.bisect_left(beh_ts.get(e.user_id, []), e.ts_ms),
            "split": "train" if e.ts_ms < cuts[0] else "valid" if e.ts_ms < cuts[1] else "test",
            "is_sampled_negative": False, "sampling_prob": 1.0,
        }
        row.update(counter_values(users.get(e.user_id), "user", e.ts_ms, cfg.stats))
        row.update(counter_values(items.get(e.item_id), "item", e.ts_ms, cfg.stats))
        out[e.event_id] = row
    return out


def retrieval_rows(tl: dict[int, object], min_holdout: int) -> dict[tuple[int, int], tuple[int, int, str]]:
    """(user, position) -> (item, ts, split) for every behavior at position >= 1 (leave-one-out)."""
    out = {}
    for u, st in tl.items():
        n = len(st)
        for p in range(1, n):
            split = "train" if n < min_holdout or p < n - 2 else ("valid" if p == n - 2 else "test")
            out[(u, p)] = (int(st.item_ids[p]), int(st.ts_ms[p]), split)
    return out


def spark_xxhash64_seed_str_int(seed: int, s: str, j: int) -> int:
    """Spark's xxhash64(int seed literal, string, int): chained XXH64 starting from seed 42."""
    h = xxhash.xxh64_intdigest(np.int32(seed).tobytes(), 42)
    h = xxhash.xxh64_intdigest(s.encode("utf-8"), h)
    h = xxhash.xxh64_intdigest(np.int32(j).tobytes(), h)
    return h - (1 << 64) if h >= 1 << 63 else h


def sampler_slots(events: list[Event], cfg, valid_start: int) -> dict[int, tuple[int, int]]:
    """item -> [slot_start, slot_end) of the negative sampler, from train-window behavior counts ** alpha."""
    beh = set(cfg.sequence.behavior_event_types)
    counts: dict[int, int] = defaultdict(int)
    for e in events:
        if e.event_type in beh and e.ts_ms < valid_start:
            counts[e.item_id] += 1
    items = sorted(counts)
    w = [float(counts[i]) ** cfg.ranking.popularity_alpha for i in items]
    total, cum, s = sum(w), 0.0, cfg.ranking.sampler_slots
    out, start = {}, 0
    for k, (i, wi) in enumerate(zip(items, w)):
        cum += wi
        end = s if k == len(items) - 1 else math.floor(cum / total * s)
        out[i] = (start, end)
        start = end
    return out


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    return SimpleNamespace(
        read_events=read_events, valid_events=valid_events, item_categories=item_categories,
        timelines=timelines, sequences=sequences, observed_ranking_samples=observed_ranking_samples,
        counters=counters, counter_values=counter_values, retrieval_rows=retrieval_rows,
        spark_xxhash64=spark_xxhash64_seed_str_int, sampler_slots=sampler_slots,
        INVALID=INVALID, HANDMADE_EVENTS=HANDMADE_EVENTS,
    )
