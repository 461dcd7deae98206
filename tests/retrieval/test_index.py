"""ANN index vs exact search on small data: recall@k of HNSW and IVF, the recall measure itself, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.config import IndexConfig
from retrieval.index import build_index, exact_index, recall_vs_exact, search


def _clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """L2-normalized vectors around `clusters` centers (item embeddings are clustered like this)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(clusters, size=n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("cfg", [
    IndexConfig(kind="hnsw", hnsw_m=32, hnsw_ef_search=1024),
    IndexConfig(kind="ivf", ivf_nlist=32, ivf_nprobe=24),
], ids=["hnsw", "ivf"])
def test_ann_recall_at_100_vs_exact(cfg):
    items = _clustered(3000, 32, 40, seed=0)
    queries = _clustered(64, 32, 40, seed=1)
    ann_rows, ann_scores = search(build_index(items, cfg), queries, 100)
    ex_rows, ex_scores = search(exact_index(items), queries, 100)
    assert recall_vs_exact(ann_rows, ex_rows) >= 0.99
    assert np.all(np.diff(ann_scores, axis=1) <= 1e-6)  # best first
    # the exact index is exact: scores are the inner products of the returned rows
    np.testing.assert_allclose(ex_scores[0], items[ex_rows[0]] @ queries[0], rtol=1e-5, atol=1e-6)


def test_flat_index_equals_exact_and_pads_missing_results():
    items = _clustered(50, 8, 4, seed=2)
    rows, scores = search(build_index(items, IndexConfig(kind="flat")), items[:3], 60)
    assert rows.shape == (3, 60) and (rows[:, 50:] == -1).all() and np.isneginf(scores[:, 50:]).all()
    assert rows[:, 0].tolist() == [0, 1, 2]  # every item is its own nearest neighbour


def test_recall_counts_the_intersection():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    ann = np.array([[4, 3, 9, 1], [5, -1, -1, -1]])
    assert recall_vs_exact(ann, exact) == pytest.approx((3 + 1) / 8)


def test_bad_vectors_are_named():
    with pytest.raises(ValueError, match="item vectors contains NaN"):
        build_index(np.full((4, 3), np.nan, np.float32), IndexConfig())
    with pytest.raises(ValueError, match="queries have dimension 4, the index 8"):
        search(exact_index(_clustered(10, 8, 2, 0)), np.zeros((1, 4), np.float32), 5)
    with pytest.raises(ValueError, match="ivf_nlist=64 needs at least as many items"):
        build_index(_clustered(10, 8, 2, 0), IndexConfig(kind="ivf", ivf_nlist=64))


def test_auto_picks_the_tier_that_holds_the_catalog():
    from retrieval.config import IndexTier

    cfg = IndexConfig(kind="auto", tiers=(IndexTier(max_items=100, kind="flat"),
                                          IndexTier(max_items=10_000, kind="ivf", ivf_nlist=16, ivf_nprobe=8)))
    assert cfg.for_catalog(100).kind == "flat"
    big = cfg.for_catalog(101)
    assert (big.kind, big.ivf_nlist, big.ivf_nprobe) == ("ivf", 16, 8)
    assert cfg.for_catalog(10**9).kind == "ivf"  # beyond the last tier: the last tier
    assert IndexConfig(kind="hnsw").for_catalog(10).kind == "hnsw"  # a fixed kind is kept
    items = _clustered(500, 8, 4, seed=3)
    index = build_index(items, cfg)
    assert index.nprobe == 8 and index.nlist == 16
    with pytest.raises(ValueError, match="tiers must be sorted by max_items"):
        IndexConfig(tiers=(IndexTier(max_items=10), IndexTier(max_items=5)))


def test_choose_index_takes_the_fastest_point_that_meets_both_targets():
    from retrieval.index import choose_index

    points = [{"name": "exact", "recall": 1.0, "ms": 20.0}, {"name": "ivf64", "recall": 0.97, "ms": 2.0},
              {"name": "ivf16", "recall": 0.90, "ms": 0.8}, {"name": "hnsw", "recall": 0.99, "ms": 2.0}]
    assert choose_index(points, 0.95, 5.0)["name"] == "hnsw"  # as fast as ivf64, higher recall
    assert choose_index(points, 0.85, 5.0)["name"] == "ivf16"
    assert choose_index(points, 0.999, 5.0) is None


def test_ivf_pq_with_exact_refinement_reaches_high_recall():
    items = _clustered(4000, 32, 40, seed=4)
    queries = _clustered(32, 32, 40, seed=5)
    cfg = IndexConfig(kind="ivf_pq", ivf_nlist=32, ivf_nprobe=32, pq_m=8, refine_factor=4)
    ann_rows, _ = search(build_index(items, cfg), queries, 50)
    ex_rows, _ = search(exact_index(items), queries, 50)
    assert recall_vs_exact(ann_rows, ex_rows) >= 0.9
    with pytest.raises(ValueError, match="pq_m=5 must divide the dimension 32"):
        build_index(items, IndexConfig(kind="ivf_pq", ivf_nlist=32, pq_m=5))


def test_the_default_tier_at_1m_items_is_the_point_chosen_from_the_committed_curve():
    import json
    from pathlib import Path

    from retrieval.index import choose_index

    doc = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/retrieval/ann-1m.json").read_text())
    res = doc["results"]
    chosen = choose_index([p for p in res["points"] if p["family"] != "exact"], res["targets"]["min_recall"],
                          res["targets"]["max_ms"])
    assert chosen is not None and chosen["recall"] >= 0.95 and chosen["ms"] <= 5.0
    served = IndexConfig().for_catalog(res["items"])
    assert served.kind == chosen["family"]
    if served.kind in ("ivf", "ivf_pq"):
        assert (served.ivf_nlist, served.ivf_nprobe) == (chosen["nlist"], chosen["nprobe"])
    else:
        assert (served.hnsw_m, served.hnsw_ef_search) == (chosen["hnsw_m"], chosen["ef_search"])
