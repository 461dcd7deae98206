import numpy as np
import pyarrow.compute as pc

from features.datasets import read_table
from features.datasets.synthetic import SynthConfig, _World, generate
from features.schema import check_table_schema


def _gen(tmp_path, name, **kw):
    cfg = SynthConfig(**{"events": 200_000, "heavy_min_events": 20_000, "heavy_users": 2, "chunk_events": 50_000, **kw})
    return generate(cfg, tmp_path / name), cfg


def test_deterministic_by_seed(tmp_path):
    a, _ = _gen(tmp_path, "a", events=20_000, heavy_users=0, seed=3)
    b, _ = _gen(tmp_path, "b", events=20_000, heavy_users=0, seed=3)
    c, _ = _gen(tmp_path, "c", events=20_000, heavy_users=0, seed=4)
    ea, eb, ec = (read_table(r.out, "events") for r in (a, b, c))
    assert ea.equals(eb)
    assert not ea["item_id"].equals(ec["item_id"])


def test_statistics(tmp_path):
    res, cfg = _gen(tmp_path, "s")
    ev = read_table(res.out, "events")
    check_table_schema(ev, "events")
    assert ev.num_rows == 200_000
    assert pc.count_distinct(ev["event_id"]).as_py() == ev.num_rows
    df = ev.select(["user_id", "item_id", "ts_ms", "label"]).to_pandas()
    per_user = df.groupby("user_id").size()
    assert (per_user >= 20_000).sum() == 2  # heavy users
    light = per_user[per_user < 20_000]
    assert light.mean() > 2 * light.median()  # heavy tail: the typical user is light
    # Zipf popularity: the top 1% of items get a large share of the traffic
    pop = np.sort(df.groupby("item_id").size().to_numpy())[::-1]
    assert pop[: max(1, len(pop) // 100)].sum() / pop.sum() > 0.15
    # per-user chronological order and a plausible window
    assert (df.groupby("user_id")["ts_ms"].diff().dropna() >= 0).all()
    assert df["ts_ms"].min() >= cfg.start_ts_ms
    assert 0.05 < df["label"].mean() < 0.4
    items = read_table(res.out, "items")
    assert items.num_rows == cfg.resolved().items
    assert all(len(c) >= 1 for c in items["categories"].to_pylist())


def test_clicks_follow_latent_affinity(tmp_path):
    res, cfg = _gen(tmp_path, "s", events=100_000, heavy_users=0)
    world = _World(cfg.resolved())
    df = read_table(res.out, "events").select(["user_id", "item_id", "label"]).to_pandas()
    aff = np.einsum("ed,ed->e", world.user_vec[df["user_id"] - 1], world.item_vec[df["item_id"] - 1])
    hi = df["label"][aff > np.quantile(aff, 0.8)].mean()
    lo = df["label"][aff < np.quantile(aff, 0.2)].mean()
    assert hi > 3 * lo  # models have signal to learn
