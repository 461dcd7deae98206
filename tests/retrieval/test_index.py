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
