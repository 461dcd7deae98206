"""Spark outputs equal the pure-Python references row for row (small hand-made + Beauty data, ML-100K)."""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from features import hashing as h
from features import layout
from features.sequence import SequenceConfig


def _rows(features, output):
    return pq.read_table(features / output).to_pylist()


def _manifest(features):
    return json.loads((features / "manifest.json").read_text())


def _check_states(got_rows, want, prefix, cap_len=None):
    got = {r["user_id"]: r for r in got_rows}
    assert set(got) == set(want)
    for u, st in want.items():
        r = got[u]
        assert r[f"{prefix}item_id"] == st.item_ids.tolist(), u
        assert r[f"{prefix}ts_ms"] == st.ts_ms.tolist(), u
        assert r[f"{prefix}action"] == st.actions.tolist(), u
        assert r[f"{prefix}category"] == st.categories.tolist(), u


@pytest.mark.integration
@pytest.mark.parametrize("which", ["small", "ml100k"])
def test_sequences_and_timelines_equal_fold_events(which, request, ref):
    features = request.getfixturevalue(f"{which}_features")
    dataset = request.getfixturevalue("small_dataset" if which == "small" else "ml100k_dataset")
    cfg = SequenceConfig(**_manifest(features)["config"]["sequence"])
    events = ref.valid_events(ref.read_events(dataset))
    cats = ref.item_categories(dataset)
    timelines = ref.timelines(events, cats, cfg)
    tl_rows = _rows(features, layout.TIMELINES)
    _check_states(tl_rows, timelines, "")
    for r in tl_rows:
        n = len(timelines[r["user_id"]])
        assert r["length"] == n
        assert r["retrieval_train_len"] == (n - 2 if n >= 3 else n)
    seq_rows = _rows(features, layout.SEQUENCES)
    long = ref.sequences(events, cats, cfg)  # fold_events with the configured cap: the streaming semantics
    _check_states(seq_rows, long, "long_")
    _check_states(seq_rows, {u: st.short(cfg.short_cap) for u, st in long.items()}, "short_")
    for r in seq_rows:
        assert r["length"] == len(timelines[r["user_id"]]) and r["last_ts_ms"] == int(long[r["user_id"]].ts_ms[-1])


@pytest.mark.integration
def test_small_caps_are_exercised(small_features, ref, small_dataset):
    seq = {r["user_id"]: r for r in _rows(small_features, layout.SEQUENCES)}
    assert seq[9001]["length"] == 8 and len(seq[9001]["long_item_id"]) == 4 and len(seq[9001]["short_item_id"]) == 2
    # the late event (input after ts=5000) sits in time order; the duplicate appears once
    tl = {r["user_id"]: r for r in _rows(small_features, layout.TIMELINES)}
    assert tl[9001]["item_id"] == [90011, 90012, 90013, 90015, 90014, 90011, 90016, 90099]
    assert tl[9001]["action"][:3] == [5, 5, 7] and tl[9001]["action"][5] == 4  # click+, click+, purchase+; click-
    assert 9004 not in tl  # impressions only: no behaviors, no timeline


@pytest.mark.integration
def test_quarantine_and_event_counts(small_features, ref):
    q = _rows(small_features, layout.QUARANTINE)
    reasons = sorted(r["reason"] for r in q)
    assert reasons == sorted([*ref.INVALID, "duplicate_event_id"])
    dup = next(r for r in q if r["reason"] == "duplicate_event_id")
    assert dup["event_id"] == "h/9001/02" and "already appeared" in dup["detail"]
    assert all(r["detail"] for r in q)
    m = _manifest(small_features)
    assert m["events"]["duplicates"] == 1 and m["events"]["out_of_order"] >= 1
    assert m["events"]["input"] == m["events"]["valid"] + len(q)


@pytest.mark.integration
@pytest.mark.parametrize("which", ["small", "ml100k"])
def test_observed_ranking_samples_equal_reference(which, request, ref):
    features = request.getfixturevalue(f"{which}_features")
    dataset = request.getfixturevalue("small_dataset" if which == "small" else "ml100k_dataset")
    m = _manifest(features)
    from features.config import from_mapping
    from features.spark.config import FeatureBuildConfig

    cfg = from_mapping(FeatureBuildConfig, m["config"])
    cuts = (m["splits"]["ranking"]["valid_start_ms"], m["splits"]["ranking"]["test_start_ms"])
    events = ref.valid_events(ref.read_events(dataset))
    want = ref.observed_ranking_samples(events, ref.item_categories(dataset), cfg, cuts)
    got = {r["sample_id"]: r for r in _rows(features, layout.RANKING_SAMPLES) if not r["is_sampled_negative"]}
    assert set(got) == set(want)
    for sid, w in want.items():
        g = got[sid]
        assert {k: g[k] for k in w} == pytest.approx(w), sid
        assert g["weight"] == 1.0


@pytest.mark.integration
def test_sampled_negatives_equal_reference(small_features, small_dataset, small_config, ref):
    cfg = small_config
    m = _manifest(small_features)
    valid_start = m["splits"]["ranking"]["valid_start_ms"]
    events = ref.valid_events(ref.read_events(small_dataset))
    cats = ref.item_categories(small_dataset)
    slots = ref.sampler_slots(events, cfg, valid_start)
    slot_item = np.full(cfg.ranking.sampler_slots, -1, dtype=np.int64)
    for item, (a, b) in slots.items():
        slot_item[a:b] = item
    assert (slot_item >= 0).all()
    samples = _rows(small_features, layout.RANKING_SAMPLES)
    by_id = {r["sample_id"]: r for r in samples}
    want = {}
    for e in events:
        if e.event_type in cfg.ranking.sampled_negative_event_types and e.label >= 0.5:
            for j in range(cfg.ranking.negatives_per_positive):
                slot = ref.spark_xxhash64(cfg.ranking.seed, e.event_id, j) % cfg.ranking.sampler_slots
                item = int(slot_item[slot])
                if item != e.item_id:
                    a, b = slots[item]
                    want[f"{e.event_id}#neg{j}"] = (e.event_id, item, (b - a) / cfg.ranking.sampler_slots)
    got = {r["sample_id"]: r for r in samples if r["is_sampled_negative"]}
    assert set(got) == set(want) and len(want) > 10_000
    for sid, (pos_id, item, prob) in want.items():
        g, p = got[sid], by_id[pos_id]
        assert (g["item_id"], g["sampling_prob"], g["label"]) == (item, pytest.approx(prob), 0.0)
        assert g["item_category"] == cats.get(item, 0)
        for k in ("user_id", "ts_ms", "hist_len", "event_type", "split", *[c for c in g if c.startswith("user_")]):
            assert g[k] == p[k], (sid, k)
    rep = json.loads((small_features / "report" / "validation.json").read_text())
    n = rep["ranking_samples"]["sampled_negatives"]
    assert n["written"] == len(want) and n["expected"] - n["dropped_same_item"] == len(want)


@pytest.mark.integration
def test_sampler_probabilities_follow_popularity(small_features, small_config):
    pop = _rows(small_features, layout.POPULARITY)
    sampled = [r for r in pop if r["ranking_train_count"] > 0]
    w = np.array([r["ranking_train_count"] ** small_config.ranking.popularity_alpha for r in sampled])
    p = np.array([r["sampler_prob"] for r in sampled])
    assert p.sum() == pytest.approx(1.0)
    assert np.abs(p - w / w.sum()).max() <= 1.0 / small_config.ranking.sampler_slots
    assert all(r["sampler_prob"] == 0.0 for r in pop if r["ranking_train_count"] == 0)


@pytest.mark.integration
@pytest.mark.parametrize("which", ["small", "ml100k"])
def test_retrieval_samples_are_leave_one_out(which, request, ref):
    features = request.getfixturevalue(f"{which}_features")
    dataset = request.getfixturevalue("small_dataset" if which == "small" else "ml100k_dataset")
    cfg = SequenceConfig(**_manifest(features)["config"]["sequence"])
    tl = ref.timelines(ref.valid_events(ref.read_events(dataset)), ref.item_categories(dataset), cfg)
    want = ref.retrieval_rows(tl, 3)
    rows = _rows(features, layout.RETRIEVAL_SAMPLES)
    got = {(r["user_id"], r["hist_len"]): (r["item_id"], r["ts_ms"], r["split"]) for r in rows}
    assert got == want
    # logq: log of the target's share of retrieval-train targets
    train = [v[0] for v in want.values() if v[2] == "train"]
    counts = {i: train.count(i) for i in set(train)}
    for r in rows[:2000]:
        assert r["logq"] == pytest.approx(math.log(max(counts.get(r["item_id"], 0), 1) / len(train)))


@pytest.mark.integration
def test_beauty_leave_one_out_matches_the_sequence_file(small_features, shared_data):
    rows = _rows(small_features, layout.RETRIEVAL_SAMPLES)
    test = {r["user_id"]: r["item_id"] for r in rows if r["split"] == "test"}
    valid = {r["user_id"]: r["item_id"] for r in rows if r["split"] == "valid"}
    with open(shared_data / "amazon-beauty" / "Beauty.txt") as f:
        lines = [list(map(int, line.split())) for _, line in zip(range(300), f)]
    for u, *items in lines:
        assert test[u] == items[-1] and valid[u] == items[-2], u


@pytest.mark.integration
def test_latest_stats_equal_reference(small_features, small_dataset, small_config, ref):
    events = ref.valid_events(ref.read_events(small_dataset))
    as_of = max(e.ts_ms for e in events) + 1
    for entity, key, output in (("user", "user_id", layout.STATS_USERS), ("item", "item_id", layout.STATS_ITEMS)):
        c = ref.counters(events, key, small_config.stats)
        rows = _rows(small_features, output)
        assert {r[key] for r in rows} == {getattr(e, key) for e in events}
        for r in rows:
            want = ref.counter_values(c.get(r[key]), entity, as_of, small_config.stats)
            assert {k: r[k] for k in want} == want and r["as_of_ms"] == as_of


@pytest.mark.integration
def test_item_and_user_tables_hash_attributes(small_features):
    items = {r["item_id"]: r for r in _rows(small_features, layout.ITEMS)}
    a = items[90010]
    assert a["category"] == h.hash_string("Alpha", "category")
    assert a["categories"] == h.hash_strings(["Alpha", "Beta"], "category").tolist()
    assert a["tags"] == h.hash_strings(["t1", "t2"], "tag").tolist()
    assert a["item_attr_brand"] == h.hash_string("acme", "item_attr_brand") and a["num_price"] == 9.5
    b, c = items[90011], items[90012]
    assert (b["category"], b["categories"], b["item_attr_color"], b["num_price"]) == (0, [], None, None)
    assert (c["category"], c["categories"], c["tags"]) == (0, [], [])
    users = {r["user_id"]: r for r in _rows(small_features, layout.USERS)}
    assert users[9001]["user_attr_gender"] == h.hash_string("F", "user_attr_gender")
    assert users[9002]["user_attr_age"] is None and users[9001]["num_age"] == 25.0


@pytest.mark.integration
def test_ranking_cuts_are_close_to_exact_quantiles(ml100k_features, ml100k_dataset):
    m = _manifest(ml100k_features)
    ts = np.sort(pq.read_table(ml100k_dataset / "events", columns=["ts_ms"])["ts_ms"].to_numpy())
    for key, q in (("valid_start_ms", 0.8), ("test_start_ms", 0.9)):
        rank = np.searchsorted(ts, m["splits"]["ranking"][key]) / len(ts)
        assert abs(rank - q) < 1e-3, (key, rank)
    rows = m["outputs"][layout.RANKING_SAMPLES]["rows"]
    assert sum(rows.values()) == 100_000 and rows["train"] == pytest.approx(80_000, rel=0.01)
