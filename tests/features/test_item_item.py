"""features.item_item: EASE's closed form, its pruned scoring, and what a bad artifact gets."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.item_item import ItemItem


def _timelines(seed: int, users: int = 40, items: int = 9, ids_from: int = 100):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 7, users)
    vals = np.concatenate([ids_from + rng.integers(0, items, n) for n in lens])  # repeats allowed
    offs = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return offs, vals, lens


def _dense(model: ItemItem) -> np.ndarray:
    """B[j, c] back from the kept weights (zeros where pruned)."""
    b = np.zeros((len(model.item_ids),) * 2)
    for c in range(len(model.item_ids)):
        b[model.neighbors[c], c] = model.weights[c]
    return b


def test_fit_is_the_constrained_ridge_regression_of_each_item_on_the_others() -> None:
    offs, vals, lens = _timelines(0)
    visible = np.maximum(lens - 1, 0)  # the last behavior of each row is not visible
    model = ItemItem.fit(offs, vals, visible, lam=3.0, k=0)
    ids = model.item_ids
    x = np.zeros((len(offs), len(ids)))
    for u, (o, n) in enumerate(zip(offs, visible)):
        x[u, np.searchsorted(ids, vals[o:o + n])] = 1.0
    ref = np.zeros((len(ids),) * 2)
    for j in range(len(ids)):
        other = [i for i in range(len(ids)) if i != j]
        a = x[:, other]
        ref[other, j] = np.linalg.solve(a.T @ a + 3.0 * np.eye(len(other)), a.T @ x[:, j])
    np.testing.assert_allclose(_dense(model), ref, atol=1e-6)
    assert model.k == len(ids) - 1


def test_scores_sum_the_weights_of_distinct_history_items_and_ignore_padding_and_unknown_ids() -> None:
    offs, vals, lens = _timelines(1)
    model = ItemItem.fit(offs, vals, lens, lam=2.0, k=0)
    b = _dense(model)
    ids = model.item_ids
    recent = np.array([[-1, -1, ids[0], ids[2], ids[2]],  # a repeat counts once
                       [ids[1], 99_999, ids[3], ids[4], ids[5]],  # an unknown id is ignored
                       [-1, -1, -1, -1, -1]])
    cands = np.array([[ids[1], ids[3], 12_345], [ids[0], ids[2], ids[6]], [ids[0], ids[1], ids[2]]])
    got = model.scores(recent, cands, chunk=2)
    want = np.array([[b[0, 1] + b[2, 1], b[0, 3] + b[2, 3], 0.0],
                     [b[1, 0] + b[3, 0] + b[4, 0] + b[5, 0], b[1, 2] + b[3, 2] + b[4, 2] + b[5, 2],
                      b[1, 6] + b[3, 6] + b[4, 6] + b[5, 6]],
                     [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32


def test_pruning_keeps_each_candidates_largest_weights() -> None:
    offs, vals, lens = _timelines(2, items=12)
    full, pruned = ItemItem.fit(offs, vals, lens, k=0), ItemItem.fit(offs, vals, lens, k=3)
    b = _dense(full)
    assert pruned.neighbors.shape == (len(full.item_ids), 3)
    for c in range(len(full.item_ids)):
        kept = np.sort(np.abs(pruned.weights[c]))
        col = np.abs(np.delete(b[:, c], c))
        np.testing.assert_allclose(kept, np.sort(col)[-3:], rtol=1e-5)
        assert c not in pruned.neighbors[c]


def test_list_features_are_the_score_and_its_gap_to_the_lists_best_whole_or_at_sampled_positions() -> None:
    offs, vals, lens = _timelines(3, items=10)
    model = ItemItem.fit(offs, vals, lens, lam=2.0, k=4)
    ids = model.item_ids
    recent = np.array([[-1, ids[0], ids[1]], [ids[2], ids[3], ids[4]]])
    lists = np.array([[ids[5], ids[6], ids[7], 777], [ids[0], ids[1], ids[8], ids[9]]])
    score = model.scores(recent, lists)
    feats = model.list_features(recent, lists)
    assert feats.shape == (8, 2) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[:, 0], score.ravel())
    np.testing.assert_allclose(feats[:, 1], (score - score.max(1, keepdims=True)).ravel())
    assert (feats[:, 1] <= 0).all() and np.isclose(feats[:, 1].reshape(2, 4).max(1), 0).all()
    cols = np.array([[3, 0], [1, 2]])  # sampled positions: their rows of the whole-list features
    np.testing.assert_allclose(model.list_features(recent, lists, cols), feats.reshape(2, 4, 2)[[[0], [1]], cols]
                               .reshape(-1, 2))


def test_save_load_round_trip(tmp_path) -> None:
    offs, vals, lens = _timelines(3)
    model = ItemItem.fit(offs, vals, lens, k=4)
    back = ItemItem.load(model.save(tmp_path / "ii.npz"))
    for name in ("item_ids", "neighbors", "weights"):
        np.testing.assert_array_equal(getattr(back, name), getattr(model, name))
    assert back.lam == model.lam


@pytest.mark.parametrize("bad", [dict(lam=0.0), dict(lam=-1.0)])
def test_fit_refuses_bad_arguments(bad) -> None:
    offs, vals, lens = _timelines(4)
    with pytest.raises(ValueError, match="lam must be positive"):
        ItemItem.fit(offs, vals, lens, **bad)
    with pytest.raises(ValueError, match="must match"):
        ItemItem.fit(offs, vals, lens[:-1])
    with pytest.raises(ValueError, match="distinct items"):
        ItemItem.fit(offs, vals, np.zeros_like(lens))


_CORRUPT = {
    "unsorted ids": lambda z: {**z, "item_ids": z["item_ids"][::-1].copy()},
    "neighbor out of range": lambda z: {**z, "neighbors": z["neighbors"] + len(z["item_ids"])},
    "negative neighbor": lambda z: {**z, "neighbors": z["neighbors"] - 100},
    "nan weight": lambda z: {**z, "weights": np.full_like(z["weights"], np.nan)},
    "shape mismatch": lambda z: {**z, "weights": z["weights"][:, :1].copy()},
    "float neighbors": lambda z: {**z, "neighbors": z["neighbors"].astype(np.float32)},
    "zero lam": lambda z: {**z, "lam": np.array([0.0])},
    "missing array": lambda z: {k: v for k, v in z.items() if k != "weights"},
    "text lam": lambda z: {**z, "lam": np.array(["500"])},
}


@pytest.mark.parametrize("how", sorted(_CORRUPT))
def test_load_refuses_a_corrupt_artifact_with_a_clear_error(tmp_path, how) -> None:
    offs, vals, lens = _timelines(5)
    path = ItemItem.fit(offs, vals, lens, k=3).save(tmp_path / "ii.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(path, **_CORRUPT[how](arrays))
    with pytest.raises(ValueError, match=str(path)):
        ItemItem.load(path)


def test_load_refuses_files_that_are_not_an_archive_of_the_model(tmp_path) -> None:
    offs, vals, lens = _timelines(6)
    good = ItemItem.fit(offs, vals, lens, k=3).save(tmp_path / "ii.npz").read_bytes()
    npy = tmp_path / "array.npz"
    np.save(npy.with_suffix(".npy"), np.arange(4))
    npy.write_bytes(npy.with_suffix(".npy").read_bytes())
    for path, content in ((tmp_path / "truncated.npz", good[: len(good) // 2]), (npy, None),
                          (tmp_path / "empty.npz", b"")):
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError, match="not an item-item model"):
            ItemItem.load(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_load_of_arbitrary_bytes_raises_value_error(tmp_path, data) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(data)  # includes the empty file; a zip or .npy header needs more than chance
    with pytest.raises(ValueError):
        ItemItem.load(path)
