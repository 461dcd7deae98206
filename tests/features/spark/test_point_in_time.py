"""No ranking sample sees its own event or a later one.

A sample's history is ``timeline[:hist_len]`` of its user: every behavior in it
must be strictly before the sample's ts and every behavior after it at or after
that ts; its counters count only events strictly before ts. Checked on every
sample of the real and small builds, and on random event sets (hypothesis)
run through the same Spark functions.
"""
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features import layout
from features.schema import Event
from features.spark import events as ev
from features.spark.config import FeatureBuildConfig, RankingConfig, SplitConfig
from features.spark.samples import SplitCuts, ranking_samples
from features.spark.sequences import build_timelines
from features.spark.stats import with_user_asof
from features.transforms import StatsConfig


def _check_point_in_time(timelines: dict[int, np.ndarray], users, ts, hist_len) -> int:
    """Vectorized over samples: returns how many history behaviors were checked."""
    checked = 0
    order = np.argsort(users, kind="stable")
    users, ts, hist_len = users[order], ts[order], hist_len[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(users)]):
        tl = timelines.get(int(users[lo]), np.empty(0, np.int64))  # (L,) sorted
        h, t = hist_len[lo:hi], ts[lo:hi]
        assert (h <= len(tl)).all()
        # timeline[:h] < t  <=>  the h-th behavior (if any) is >= t and the (h-1)-th is < t
        before_ok = np.where(h > 0, tl[np.maximum(h - 1, 0)] < t if len(tl) else True, True)
        after_ok = np.where(h < len(tl), tl[np.minimum(h, max(len(tl) - 1, 0))] >= t if len(tl) else True, True)
        assert before_ok.all(), f"user {users[lo]}: a history behavior is not before its sample"
        assert after_ok.all(), f"user {users[lo]}: a behavior before the sample is missing from its history"
        checked += int(h.sum())
    return checked


@pytest.mark.integration
@pytest.mark.parametrize("which", ["small", "ml100k"])
def test_every_sample_history_is_strictly_before_it(which, request):
    features = request.getfixturevalue(f"{which}_features")
    tl = pq.read_table(features / layout.TIMELINES, columns=["user_id", "ts_ms"]).to_pydict()
    timelines = {u: np.asarray(t, dtype=np.int64) for u, t in zip(tl["user_id"], tl["ts_ms"])}
    s = pq.read_table(features / layout.RANKING_SAMPLES, columns=["user_id", "ts_ms", "hist_len"])
    n = _check_point_in_time(timelines, s["user_id"].to_numpy(), s["ts_ms"].to_numpy(), s["hist_len"].to_numpy())
    assert n > 0


_EVENT_TYPES = ["impression", "click", "rating", "interaction"]


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(0, 12), st.sampled_from(_EVENT_TYPES), st.booleans()),
    min_size=1, max_size=40,
))
@pytest.mark.integration
def test_random_events_never_leak_into_their_samples(spark, ref, rows):
    # timestamps on a coarse grid (x 500 ms) so that ties and window edges (1s, 2s) are frequent
    events = [Event(f"e{i:03d}", u, it, t * 500, et, float(lab)) for i, (u, it, t, et, lab) in enumerate(rows)]
    cfg = FeatureBuildConfig(
        stats=StatsConfig(windows=("1s", "2s", "all")),
        ranking=RankingConfig(negatives_per_positive=0),
        split=SplitConfig(valid_start_ms=2000, test_start_ms=4000),
    )
    df = spark.createDataFrame(
        [(e.event_id, e.user_id, e.item_id, e.ts_ms, e.event_type, e.label) for e in events],
        "event_id string, user_id long, item_id long, ts_ms long, event_type string, label float",
    )
    items = spark.createDataFrame([], "item_id long, category long")
    enriched = with_user_asof(ev.enrich(ev.check_events(df).valid, items, cfg.sequence, cfg.stats), cfg.stats).cache()
    try:
        samples = ranking_samples(enriched, None, SplitCuts(2000, 4000, "explicit"), cfg.ranking, cfg.stats).collect()
        tl = {r["user_id"]: np.asarray(r["ts_ms"], np.int64) for r in build_timelines(enriched, 3).collect()}
    finally:
        enriched.unpersist()
    assert len(samples) == len(events)
    _check_point_in_time(
        tl, np.array([r["user_id"] for r in samples]), np.array([r["ts_ms"] for r in samples]),
        np.array([r["hist_len"] for r in samples]),
    )
    want = ref.observed_ranking_samples(events, {}, cfg, (2000, 4000))
    for r in samples:
        w = want[r["sample_id"]]
        assert {k: r[k] for k in w if k in r} == pytest.approx({k: w[k] for k in w if k in r}), r["sample_id"]
