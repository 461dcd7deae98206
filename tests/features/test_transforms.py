"""The shared counter -> dense feature transforms (used by the reader now and by the server later)."""
import math

import numpy as np
import pytest

from features.transforms import (
    DenseLayout, StatsConfig, counter_columns, in_window, parse_window, signed_log1p, stats_dense, stats_dense_names,
)


def test_parse_window():
    assert parse_window("1d") == 86_400_000 and parse_window("30m") == 1_800_000 and parse_window("2w") == 14 * 86_400_000
    assert parse_window("all") is None
    for bad in ("0d", "1y", "d", "-1h", ""):
        with pytest.raises(ValueError, match="must look like"):
            parse_window(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="duplicates"):
        StatsConfig(windows=("1d", "1d"))
    with pytest.raises(ValueError, match="not one of"):
        StatsConfig(event_types=("teleport",))
    assert StatsConfig().counted_event_types()[0] == "impression"


def test_counter_and_feature_names():
    cfg = StatsConfig(windows=("1h", "all"))
    assert counter_columns("user", cfg) == ("user_cnt_1h", "user_pos_1h", "user_cnt_all", "user_pos_all")
    assert stats_dense_names("item", cfg) == ("item_log1p_cnt_1h", "item_rate_1h", "item_log1p_cnt_all", "item_rate_all")
    with pytest.raises(ValueError, match="entity"):
        counter_columns("session", cfg)


def test_stats_dense_values():
    cfg = StatsConfig(windows=("1d", "all"), prior_weight=10.0)
    c = {"user_cnt_1d": [0, 10], "user_pos_1d": [0, 10], "user_cnt_all": [5, 100], "user_pos_all": [1, 20]}
    d = stats_dense(c, "user", cfg, prior_rate=0.5)
    assert d.dtype == np.float32 and d.shape == (2, 4)
    np.testing.assert_allclose(d[0], [0.0, 0.5, math.log1p(5), (1 + 5) / 15], rtol=1e-6)
    np.testing.assert_allclose(d[1], [math.log1p(10), (10 + 5) / 20, math.log1p(100), (20 + 5) / 110], rtol=1e-6)


def test_stats_dense_without_prior_weight_and_no_events_is_the_prior():
    cfg = StatsConfig(windows=("all",), prior_weight=0.0)
    d = stats_dense({"item_cnt_all": [0, 4], "item_pos_all": [0, 1]}, "item", cfg, prior_rate=0.3)
    np.testing.assert_allclose(d, [[0.0, 0.3], [math.log1p(4), 0.25]], rtol=1e-6)


@pytest.mark.parametrize("counters, match", [
    ({"user_cnt_all": [1]}, "'user_pos_all' is missing"),
    ({"user_cnt_all": [1], "user_pos_all": [2]}, "row 0 is 2.0 > user_cnt_all"),
    ({"user_cnt_all": [1, -1], "user_pos_all": [0, 0]}, "'user_cnt_all' row 1 is -1.0"),
    ({"user_cnt_all": [1, 2], "user_pos_all": [0]}, "has 1 rows, expected 2"),
])
def test_stats_dense_rejects_bad_counters(counters, match):
    with pytest.raises(ValueError, match=match):
        stats_dense(counters, "user", StatsConfig(windows=("all",)), prior_rate=0.5)


def test_signed_log1p_handles_scale_sign_and_missing():
    np.testing.assert_allclose(signed_log1p([0.0, 9.0, -9.0, np.nan, np.inf]), [0.0, math.log(10), -math.log(10), 0, 0])


def test_dense_layout_from_manifest_matches_direct_calls():
    manifest = {
        "config": {"stats": {"windows": ["7d", "all"], "event_types": [], "prior_weight": 5.0}},
        "dense": {"prior_rate": 0.2, "item_numeric_keys": ["price"]},
    }
    lay = DenseLayout.from_manifest(manifest)
    assert lay.user_names() == ("user_log1p_cnt_7d", "user_rate_7d", "user_log1p_cnt_all", "user_rate_all")
    assert lay.candidate_names()[-1] == "item_num_price"
    items = {"item_cnt_7d": [3], "item_pos_7d": [1], "item_cnt_all": [9], "item_pos_all": [2]}
    d = lay.candidate_dense(items, {"price": [99.0]})
    assert d.shape == (1, 5)
    np.testing.assert_allclose(d[0, :4], stats_dense(items, "item", lay.stats, 0.2)[0])
    assert d[0, 4] == pytest.approx(math.log(100))
    with pytest.raises(ValueError, match="numeric item attribute 'price' is missing"):
        lay.candidate_dense(items, {})
    with pytest.raises(ValueError, match="lacks 'dense'"):
        DenseLayout.from_manifest({"config": manifest["config"]})


def test_dense_layout_manifest_block_round_trips_through_json():
    """A bundle's ``features`` entry: written by `to_manifest`, read back by `from_manifest`, nothing lost."""
    import json

    lay = DenseLayout(StatsConfig(windows=("1d", "all"), event_types=("click", "rating"), prior_weight=3.0), 0.37,
                      ("year", "price"))
    assert DenseLayout.from_manifest(json.loads(json.dumps(lay.to_manifest()))) == lay


def test_counter_window_is_half_open_and_strictly_before_t():
    ts = np.array([89, 90, 99, 100, 101], np.int64)
    assert in_window(ts, 100, 10).tolist() == [False, True, True, False, False]
    assert in_window(ts, 100, None).tolist() == [True, True, True, False, False]
