"""Train/serve parity: the batch the server builds from Redis (state written by the Kafka consumer) equals
the batch built from the Spark feature jobs' outputs for the same user, candidate and time.

The Spark side is assembled here from `timelines/`, `ranking_samples/` (as-of counters), `items/` and
`users/` with the shared transforms (`features.transforms.DenseLayout`, `features.batch.build_batch`);
when `features/reader.py` lands it should replace `_spark_batch` (the comparison stays the same).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_TS, ITEM_CATEGORY, ITEM_ID, USER_ID, build_batch
from features.schema import EVENTS_SCHEMA

pytestmark = pytest.mark.integration

USERS = 20  # ML-100K users 1..USERS (~2.5k events) + the hand-made users below
DAY = 86_400_000
T0 = 893_000_000_000


def _ev(eid, user, item, ts, etype, label):
    return {"event_id": eid, "user_id": user, "item_id": item, "ts_ms": ts, "event_type": etype, "label": label,
            "value": None, "context": None}


EDGE_EVENTS = [
    _ev("edge/1/0", 99001, 50, T0, "impression", 0.0),
    _ev("edge/1/1", 99001, 51, T0, "click", 1.0),  # same ms as the impression
    _ev("edge/1/2", 99001, 52, T0 + 1000, "click", 0.0),  # a behavior with label 0
    _ev("edge/1/3", 99001, 53, T0 + 1000, "purchase", 1.0),  # same ms, ordered by event_id
    _ev("edge/1/2", 99001, 52, T0 + 1000, "click", 0.0),  # duplicate delivery
    _ev("edge/1/4", 99001, 50, T0 + 2 * DAY, "click", 1.0),  # outside the 1d window of the next ones
    _ev("edge/1/5", 99001, 9999, T0 + 2 * DAY + 5, "click", 1.0),  # an item the catalog does not know
    *[_ev(f"edge/2/{i}", 99002, 60 + i, T0 + 1000 * i, "impression", 0.0) for i in range(3)],  # impressions only
    _ev("edge/3/0", 99003, 51, T0 + 500, "rating", 1.0),
    _ev("edge/3/1", 99003, 52, T0 + 500, "rating", 0.0),
    _ev("edge/3/2", 99003, 53, T0 + 600, "view", 0.0),
]


@pytest.fixture(scope="module")
def parity_dataset(ml100k_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from features.datasets.common import read_table

    out = tmp_path_factory.mktemp("parity") / "dataset"
    ev = read_table(ml100k_dataset, "events")
    ev = ev.filter(pc.less_equal(ev["user_id"], USERS))
    tables = {"events": pa.concat_tables([ev, pa.Table.from_pylist(EDGE_EVENTS, schema=EVENTS_SCHEMA)]),
              "items": read_table(ml100k_dataset, "items"), "users": read_table(ml100k_dataset, "users")}
    for name, t in tables.items():
        (out / name).mkdir(parents=True)
        pq.write_table(t, out / name / "part-00000.parquet")
    (out / "manifest.json").write_text((ml100k_dataset / "manifest.json").read_text())
    return out


@pytest.fixture(scope="module")
def spark_features(parity_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from features.config import load_config
    from features.spark.config import FeatureBuildConfig, SparkConfig
    from features.spark.pipeline import build_features
    from features.spark.session import build_session

    handle = build_session(SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="2g"))
    out = tmp_path_factory.mktemp("parity_features") / "features"
    try:
        build_features(handle.spark, parity_dataset, out, load_config(FeatureBuildConfig, None, ["spark.shuffle_partitions=2"]),
                       only=("events", "items", "users", "timelines", "sequences", "ranking_samples"))
    finally:
        handle.stop()
    return out


def _rows(path: Path) -> dict[int, dict]:
    return {r["user_id"]: r for r in pq.read_table(path).to_pylist()}


def _spark_batch(f: Path, layout, sample: dict, timeline: dict | None, user_row: dict | None, items: dict, long_cap: int):
    """The batch of one ranking sample built from the Spark outputs (what the reader does)."""
    from features.transforms import counter_columns

    h = sample["hist_len"]
    lo = max(0, h - long_cap)
    hist = {k: np.asarray((timeline or {}).get(c, [])[lo:h], np.int64)
            for k, c in ((HIST_ITEM_ID, "item_id"), (HIST_TS, "ts_ms"), (HIST_ACTION, "action"), (HIST_CATEGORY, "category"))}
    user = {USER_ID: (np.array([sample["user_id"]]), np.array([1]))}
    for k in sorted(c for c in (user_row or {}) if c.startswith("user_attr_")):
        v = user_row[k]
        user[k] = (np.array([v] if v is not None else [], np.int64), np.array([int(v is not None)]))
    ud = layout.user_dense({c: [sample[c]] for c in counter_columns("user", layout.stats)})
    it = items.get(sample["item_id"], {})
    cd = layout.candidate_dense({c: [sample[c]] for c in counter_columns("item", layout.stats)},
                                {k: [it.get(f"num_{k}") if it.get(f"num_{k}") is not None else np.nan]
                                 for k in layout.item_numeric_keys})
    cats = np.asarray(it.get("categories") or [], np.int64)
    return build_batch(
        user=user, history=hist, history_lengths=[h - lo],
        candidates={ITEM_ID: ([sample["item_id"]], [1]), ITEM_CATEGORY: (cats, [len(cats)])},
        num_candidates=[1], request_ts=[sample["ts_ms"]], user_dense=ud, candidate_dense=cd,
    )


def test_redis_batch_equals_spark_batch(make_server, parity_dataset, spark_features, catalog, wait_until):
    from features.transforms import DenseLayout
    from serving.batching import build_request_batch, candidate_dense, user_view
    from serving.bootstrap import bootstrap_dataset
    from serving.replay import ReplayConfig, replay_events

    h = make_server(bootstrap=False)
    app = h.app
    # user attributes come from the users table (no topic carries them): bootstrap them as of t=0, no events
    bootstrap_dataset(app.store, parity_dataset, app.cfg.state, catalog, as_of_ms=0)
    res = replay_events(parity_dataset, h.bootstrap, ReplayConfig(rate=0, topic=h.topics.events))
    wait_until(lambda: h.metric("cascade_events_applied_total") + h.metric("cascade_events_deduplicated_total")
               == res.sent, timeout_s=60, what=f"all {res.sent} replayed events applied")
    assert h.metric("cascade_events_deduplicated_total") == 1  # the duplicate delivery

    manifest = json.loads((spark_features / "manifest.json").read_text())
    layout = DenseLayout.from_manifest(manifest)
    long_cap = app.cfg.state.sequence.long_cap
    timelines = _rows(spark_features / "timelines")
    users = _rows(spark_features / "users")
    items = {r["item_id"]: r for r in pq.read_table(spark_features / "items").to_pylist()}
    samples = pq.read_table(spark_features / "ranking_samples").to_pylist()

    # the serving sequences equal the Spark job's, user for user
    seqs = _rows(spark_features / "sequences")
    for u, row in seqs.items():
        rec = app.store.read_user(u)
        assert rec.seq.item_ids.tolist() == row["long_item_id"] and rec.seq.ts_ms.tolist() == row["long_ts_ms"]
        assert rec.seq.actions.tolist() == row["long_action"] and rec.seq.categories.tolist() == row["long_category"]
    assert app.store.read_user(99002).seq.item_ids.tolist() == [] and 99002 not in seqs  # impressions only

    # every sample within the retention of its user's counter log: the same batch, tensor for tensor
    newest = {}
    for s in samples:
        newest[s["user_id"]] = max(newest.get(s["user_id"], 0), s["ts_ms"])
    retention = app.cfg.state.retention_ms()
    longest = max(ms for ms in layout.stats.window_ms() if ms is not None)
    checked = 0
    for s in samples:
        if s["ts_ms"] < newest[s["user_id"]] - (retention - longest):
            continue  # older than the online log keeps for this user (by design: serving answers "now")
        rec = app.store.read_user(s["user_id"])
        view = user_view(s["user_id"], rec, s["ts_ms"], layout)
        cand = np.array([s["item_id"]], np.int64)
        dense = candidate_dense(catalog, cand, app.store.read_item_stats(cand), s["ts_ms"], layout)
        user_keys = tuple(sorted(k for k in users.get(s["user_id"], {}) if k.startswith("user_attr_")))
        got = build_request_batch(view, catalog, cand, dense, s["ts_ms"], None, user_keys)
        want = _spark_batch(spark_features, layout, s, timelines.get(s["user_id"]), users.get(s["user_id"]), items, long_cap)
        where = f"sample {s['sample_id']} (user {s['user_id']}, item {s['item_id']}, ts {s['ts_ms']})"
        for key in want.history.keys():
            assert torch.equal(got.history[key].values(), want.history[key].values()), f"{where}: history.{key}"
            assert torch.equal(got.history[key].lengths(), want.history[key].lengths()), f"{where}: history.{key}"
        for key in want.user.keys():
            assert torch.equal(got.user[key].values(), want.user[key].values()), f"{where}: user.{key}"
        assert torch.equal(got.user_dense, want.user_dense), f"{where}: user_dense {got.user_dense} vs {want.user_dense}"
        assert torch.equal(got.candidate_dense, want.candidate_dense), \
            f"{where}: candidate_dense {got.candidate_dense} vs {want.candidate_dense}"
        for key in (ITEM_ID, ITEM_CATEGORY):
            assert torch.equal(got.candidates[key].values(), want.candidates[key].values()), f"{where}: candidates.{key}"
        assert torch.equal(got.request_ts, want.request_ts)
        checked += 1
    assert checked >= 200  # most ML-100K users rate in bursts: plenty of samples within a day of their last

    # the bulk bootstrap (offline) writes exactly what the consumer built event by event (online)
    from serving.bootstrap import build_records
    from serving.state.codec import decode_item_logs

    records, logs, popularity, _ = build_records(parity_dataset, app.cfg.state, catalog)
    for u, want_rec in records.items():
        got_rec = app.store.read_user(u)
        assert got_rec.seq.equals(want_rec.seq), f"user {u}: sequence"
        assert np.array_equal(got_rec.log.ts_ms, want_rec.log.ts_ms) and np.array_equal(got_rec.log.pos, want_rec.log.pos)
        assert (got_rec.log.total_cnt, got_rec.log.total_pos) == (want_rec.log.total_cnt, want_rec.log.total_pos)
    ids = np.array(sorted(logs), np.int64)
    online = app.store.read_item_stats(ids)
    off_ts, off_pos, off_owner, off_cnt, off_pos_total = decode_item_logs([logs[i] for i in ids.tolist()])
    assert np.array_equal(online.total_cnt, off_cnt) and np.array_equal(online.total_pos, off_pos_total)
    # the bootstrap folds events older than the retention into summary records, the consumer prunes only
    # big logs: the windows agree at any time within the retention
    from serving.state.stats import window_counters

    newest_ts = int(max(s["ts_ms"] for s in samples))
    for t in (newest_ts + 1, newest_ts - DAY, newest_ts - (retention - longest)):
        got = window_counters("item", layout.stats, t, online.ts_ms, online.pos, online.owner, online.total_cnt,
                              online.total_pos)
        want = window_counters("item", layout.stats, t, off_ts, off_pos, off_owner, off_cnt, off_pos_total)
        assert all(np.array_equal(got[k], want[k]) for k in want), f"item counters at t={t}"
    top_ids, top_counts = app.store.top_items(len(popularity))
    assert dict(zip(top_ids.tolist(), top_counts.tolist())) == popularity
