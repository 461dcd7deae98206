"""ContextCounts (features.list_context) against a brute-force count over the event log."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from features.list_context import (
    AGE_CAP_H, CONTEXT_FEATURE_NAMES, SERVE_POINT, ContextCounts, event_order, recent_items, request_points,
)


def _log(rng: np.random.Generator, users: int, items: int, max_len: int):
    lens = rng.integers(0, max_len + 1, users)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    total = int(offsets[-1])
    item_ids = rng.integers(0, items, total) * 7 + 3  # sparse ids
    ts = np.concatenate([np.sort(rng.integers(0, 30, n)) for n in lens]).astype(np.int64) * 1000  # many ties
    cats = item_ids % 4
    visible = np.array([rng.integers(0, n + 1) for n in lens], np.int64)
    return offsets, item_ids, ts, cats, visible


def _brute(offsets, item_ids, ts, cats, visible, window, hist_items, hist_len, point, request_ts, cand):
    """Features of one request by counting every event/pair directly."""
    total = int(offsets[-1])
    order = event_order(ts, total)
    events = []  # (user, pos, flat)
    for u in range(len(offsets) - 1):
        for p in range(min(visible[u], offsets[u + 1] - offsets[u])):
            events.append((u, p, offsets[u] + p))
    before = [e for e in events if order[e[2]] < point]
    count = sum(1 for e in before if item_ids[e[2]] == cand)
    last_ts = max((ts[e[2]] for e in before if item_ids[e[2]] == cand), default=None)
    age = AGE_CAP_H if last_ts is None else min(max(request_ts - last_ts, 0) / 3.6e6, AGE_CAP_H)
    vis = {(e[0], e[1]) for e in events}
    recent = [int(x) for x in hist_items[len(hist_items) - min(hist_len, window, len(hist_items)):]]
    trans = cooc = 0
    for (u, p, f) in events:
        for d in range(1, window + 1):
            if (u, p + d) not in vis or order[f + d] >= point or item_ids[f + d] != cand:
                continue
            for j, a in enumerate(recent):
                if item_ids[f] == a:
                    cooc += 1
                    if j == len(recent) - 1 and d == 1:
                        trans += 1
    known = {int(item_ids[e[2]]): int(cats[e[2]]) for e in events}
    c_cat = known.get(int(cand), -2)
    same = sum(1 for a in recent if known.get(a, -1) == c_cat)
    share = same / max(len(recent), 1)
    return np.array([np.log1p(count), np.log1p(age), np.log1p(trans), np.log1p(cooc), share], np.float32)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), window=st.integers(1, 4))
def test_features_match_brute_force(seed: int, window: int) -> None:
    rng = np.random.default_rng(seed)
    offsets, item_ids, ts, cats, visible = _log(rng, users=6, items=5, max_len=12)
    counts = ContextCounts.from_timelines(offsets, item_ids, ts, cats, visible, window=window)
    users = np.flatnonzero(np.diff(offsets) > 0)
    if not len(users):
        return
    u = rng.choice(users, 4)
    h = np.array([rng.integers(0, offsets[x + 1] - offsets[x] + 1) for x in u], np.int64)
    points = request_points(event_order(ts, int(offsets[-1])), offsets, u, h)
    req_ts = np.where(h > 0, ts[offsets[u] + np.maximum(h - 1, 0)] + 1, 0)
    recent = recent_items(offsets, item_ids, u, h, 6)
    cand = rng.integers(0, 6, (4, 3)) * 7 + 3  # one id beyond the catalog
    got = counts.features(recent, h, points, req_ts, cand).reshape(4, 3, -1)
    for r in range(4):
        hist = item_ids[offsets[u[r]]:offsets[u[r]] + h[r]]
        for n in range(3):
            want = _brute(offsets, item_ids, ts, cats, visible, window, hist, int(h[r]), points[r], req_ts[r],
                          cand[r, n])
            np.testing.assert_allclose(got[r, n], want, rtol=1e-6, atol=1e-6,
                                       err_msg=f"request {r} (user row {u[r]}, hist {h[r]}), candidate {cand[r, n]}")


def test_a_request_never_counts_its_own_target() -> None:
    # one user: a -> b -> c in one second; a request after "a" must not see the b that follows it
    offsets = np.array([0, 3], np.int64)
    items = np.array([10, 20, 30], np.int64)
    ts = np.array([5000, 5000, 5000], np.int64)
    counts = ContextCounts.from_timelines(offsets, items, ts, items % 2, np.array([3]))
    pt = request_points(event_order(ts, 3), offsets, np.array([0]), np.array([1]))
    f = counts.features(np.array([[10]]), np.array([1]), pt, np.array([5001]), np.array([[20, 10]])).reshape(2, -1)
    names = list(CONTEXT_FEATURE_NAMES)
    assert f[0, names.index("log_item_count")] == 0.0 and f[0, names.index("log_transitions")] == 0.0
    assert f[1, names.index("log_item_count")] == pytest.approx(np.log1p(1))
    served = counts.features(np.array([[10]]), np.array([1]), SERVE_POINT, np.array([5001]),
                             np.array([[20]])).reshape(-1)
    assert served[names.index("log_transitions")] == pytest.approx(np.log1p(1))


def test_save_load_round_trip_and_corruption(tmp_path) -> None:
    rng = np.random.default_rng(0)
    offsets, item_ids, ts, cats, visible = _log(rng, 8, 6, 10)
    c = ContextCounts.from_timelines(offsets, item_ids, ts, cats, visible, window=3)
    back = ContextCounts.load(c.save(tmp_path / "context.npz"))
    for f in ("items", "item_category", "item_keys", "item_ts", "pair_keys"):
        np.testing.assert_array_equal(getattr(back, f), getattr(c, f))
    assert (back.horizon, back.window) == (c.horizon, c.window)
    np.savez(tmp_path / "bad.npz", items=c.items[::-1].copy(), item_category=c.item_category,
             item_keys=c.item_keys, item_ts=c.item_ts, pair_keys=c.pair_keys, meta=np.array([c.horizon, 3]))
    with pytest.raises(ValueError, match="not sorted"):
        ContextCounts.load(tmp_path / "bad.npz")


def test_bad_shapes_are_named() -> None:
    c = ContextCounts.from_timelines(np.array([0, 2]), np.array([1, 2]), np.array([0, 1]), np.array([0, 0]),
                                     np.array([2]))
    with pytest.raises(ValueError, match="hist_items must be"):
        c.features(np.zeros((3, 2), np.int64), np.zeros(3), 0, 0, np.zeros((2, 4), np.int64))
    with pytest.raises(ValueError, match="window must be"):
        ContextCounts.from_timelines(np.array([0, 0]), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(1), window=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), window=st.integers(1, 4))
def test_served_features_match_brute_force(seed: int, window: int) -> None:
    """At the serve point (every event of the log counts) pair counts are read as one key range per (recent
    item, candidate) over all distances; they equal counting every pair."""
    rng = np.random.default_rng(seed)
    offsets, item_ids, ts, cats, visible = _log(rng, users=6, items=5, max_len=12)
    counts = ContextCounts.from_timelines(offsets, item_ids, ts, cats, visible, window=window)
    hist = rng.integers(0, 6, (3, 7)) * 7 + 3
    h = rng.integers(0, 8, 3)
    cand = rng.integers(0, 6, (3, 4)) * 7 + 3
    req_ts = rng.integers(0, 40_000, 3)
    got = counts.features(hist, h, SERVE_POINT, req_ts, cand).reshape(3, 4, -1)
    for r in range(3):
        for n in range(4):
            want = _brute(offsets, item_ids, ts, cats, visible, window, hist[r, 7 - h[r]:], int(h[r]), SERVE_POINT,
                          req_ts[r], cand[r, n])
            np.testing.assert_allclose(got[r, n], want, rtol=1e-6, atol=1e-6, err_msg=f"request {r}, candidate {n}")


def test_second_stage_dense_appends_the_retrievers_products_last() -> None:
    """[list features | context | u_d * v_d] for the kept positions; the products sum to the logit column."""
    from features.candidate_lists import list_features, retrieval_products
    from features.list_context import second_stage_dense

    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 6, 4)).astype(np.float32)
    logits = np.einsum("rd,rnd->rn", u, v)
    order = np.argsort(-logits, 1)
    logits, v = np.take_along_axis(logits, order, 1), np.take_along_axis(v, order[..., None], 1)
    items = np.arange(12, dtype=np.int64).reshape(2, 6)
    cols = np.array([[0, 2, 5], [1, 3, 4]])
    products = retrieval_products(u, np.take_along_axis(v, cols[..., None], 1))
    got = second_stage_dense(logits, items, columns=cols, vectors=products)
    assert got.shape == (6, list_features(logits).shape[1] + 4)
    np.testing.assert_allclose(got[:, -4:].sum(1), got[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, :3], second_stage_dense(logits, items, columns=cols))
    with pytest.raises(ValueError, match="rows of retriever-vector features"):
        second_stage_dense(logits, items, vectors=products)
    with pytest.raises(ValueError, match="do not match"):
        retrieval_products(u, v[:, :, :3])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5))
def test_retrieval_similarities_match_a_loop(seed: int, k: int) -> None:
    """Last / max / mean cosine over the behaviors a request has (right-aligned, -1 before the first); 0 without."""
    from features.candidate_lists import retrieval_similarities

    rng = np.random.default_rng(seed)
    r, n, d = 4, 6, 3
    cand = rng.normal(size=(r, n, d)).astype(np.float32)
    recent = rng.normal(size=(r, k, d)).astype(np.float32)
    have = rng.integers(0, k + 1, r)
    ok = np.arange(k)[None, :] >= k - have[:, None]
    got = retrieval_similarities(cand, recent, ok).reshape(r, n, 3)
    for i in range(r):
        for j in range(n):
            sims = [float(cand[i, j] @ recent[i, m]) for m in range(k) if ok[i, m]]
            want = [sims[-1], max(sims), sum(sims) / len(sims)] if sims else [0.0, 0.0, 0.0]
            np.testing.assert_allclose(got[i, j], want, rtol=1e-5, atol=1e-5)
