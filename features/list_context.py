"""Point-in-time context of a retrieved list: what the second stage knows that the retriever does not.

The retriever scores a user's sequence against an item vector; it does not see how
often an item is taken right now, how recently, or how often other users went from
the user's last items to it. `ContextCounts` keeps those counts over an event log
and answers them *as of* a request, so a training list sees only what happened
before its request (no leakage from later events, the user's own target included)
and a served list sees everything the bundle's log holds:

    counts = ContextCounts.from_timelines(offsets, item_ids, ts_ms, categories, visible_len)
    feats = counts.features(hist_items, hist_lengths, request_point, request_ts, cand_items)   # (R*N, F)

`second_stage_dense` is the second-stage ranker's whole candidate_dense (the list's
`features.candidate_lists.list_features`, then these when the ranker reads them, then the
retriever-vector features and the item-item features (`features.item_item`) when it reads those),
built the same way by training (`ranking.lists`) and by the server.

Per candidate (`CONTEXT_FEATURE_NAMES`, all float32):
    log_item_count      log1p(behaviors on the item before the request)
    log_item_age_h      log1p(hours since the item's last behavior; `AGE_CAP_H` when none)
    log_transitions     log1p(times a user went from the request's last item directly to the candidate)
    log_cooccurrence    log1p(sum over the request's last `window` items a of the times the candidate
                        followed a within `window` behaviors in a user's timeline)
    category_share      share of the request's last `window` behaviors in the candidate's category

"Before the request" is an order over events: (timestamp, position in the flat timeline
layout). Events of one second keep their timeline order, so a user's own later behaviors
(the request's target among them) are never counted for that request. A request's point is
its last seen behavior's place in that order (`request_points`); a served request passes
`SERVE_POINT` (everything the log holds counts).

Only each user's first `visible_len` behaviors enter the counts (offline: the retrieval
training prefix, so the held-out valid/test items of other users never leak into features).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from features.candidate_lists import LIST_FEATURE_NAMES, SIMILARITY_NAMES, list_features
from features.item_item import ITEM_ITEM_FEATURE_NAMES

CONTEXT_FEATURE_NAMES: tuple[str, ...] = ("log_item_count", "log_item_age_h", "log_transitions",
                                          "log_cooccurrence", "category_share")
AGE_CAP_H = 24.0 * 365 * 5  # age of an item never seen before the request
SERVE_POINT = np.iinfo(np.int64).max  # a request after every event of the log
_MAX_KEY = 1 << 62


def _check_key_range(what: str, a: int, b: int) -> None:
    if a * b >= _MAX_KEY:
        raise ValueError(f"ContextCounts: {what} ({a:,} x {b:,}) does not fit an int64 key; build the counts over "
                         f"fewer items or events (e.g. a recent window of the log)")


class _ServedCounts(NamedTuple):
    """`ContextCounts` totals at the serve point (`ContextCounts._at_serve_point`)."""

    item_count: np.ndarray  # (I,) events per item
    item_last_ts: np.ndarray  # (I,) ms of the item's last event (0: none)
    pairs: np.ndarray  # (Q,) sorted distinct a * I + b of the pair log
    pair_cooc: np.ndarray  # (Q,) the pair's events at any distance 1..window
    pair_trans: np.ndarray  # (Q,) at distance 1


PAIR_LOOKUPS_PER_CHUNK = 1 << 20  # bounds the (requests, recent, candidates, distance) keys held at once


@dataclass(frozen=True)
class ContextCounts:
    """Counts over an event log, indexed for point-in-time lookups (see the module docstring).

    Arrays (all sorted, int64 unless noted):
        items           (I,) item ids the log holds (dense index = position)
        item_category   (I,) first category of each item (-1: none)
        item_keys       (E,) item_index * G + event order, G = `horizon`
        item_ts         (E,) the events' timestamps (ms), aligned with item_keys
        pair_keys       (P,) ((a * I + b) * (window + 1) + distance) * G + order of b's event
        order_ts        (G,) timestamp of each order position (for request_ts of a point)
    """

    items: np.ndarray
    item_category: np.ndarray
    item_keys: np.ndarray
    item_ts: np.ndarray
    pair_keys: np.ndarray
    horizon: int
    window: int

    # ------------------------------------------------------------ building
    @classmethod
    def from_timelines(cls, offsets: np.ndarray, item_ids: np.ndarray, ts_ms: np.ndarray, categories: np.ndarray,
                       visible_len: np.ndarray, window: int = 5) -> "ContextCounts":
        """Counts over the first `visible_len[u]` behaviors of every timeline u (flat layout: user u's behaviors
        are rows offsets[u]:offsets[u + 1] of item_ids / ts_ms / categories)."""
        if window < 1:
            raise ValueError(f"ContextCounts: window must be >= 1, got {window}")
        offsets = np.asarray(offsets, np.int64)
        lens = np.diff(offsets)
        visible = np.minimum(np.maximum(np.asarray(visible_len, np.int64), 0), lens)
        total = int(offsets[-1])
        pos = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], lens)
        keep = pos < np.repeat(visible, lens)
        flat = np.flatnonzero(keep)
        order = event_order(np.asarray(ts_ms, np.int64), total)  # order position of every flat row
        items, item_idx = np.unique(np.asarray(item_ids, np.int64)[flat], return_inverse=True)
        n_items, horizon = len(items), total + 1
        _check_key_range("items x events", max(n_items, 1), horizon)
        _check_key_range("item pairs x events", max(n_items, 1) ** 2 * (window + 1), horizon)
        cat = np.full(n_items, -1, np.int64)
        cat[item_idx] = np.asarray(categories, np.int64)[flat]
        ikeys = item_idx * horizon + order[flat]
        srt = np.argsort(ikeys, kind="stable")
        # pairs (a at row r, b at row r + d) inside one user's visible prefix, 1 <= d <= window
        index_of = np.full(total, -1, np.int64)
        index_of[flat] = item_idx
        pkeys = []
        user_end = np.repeat(offsets[:-1] + visible, lens)
        for d in range(1, window + 1):
            a = flat[flat + d < user_end[flat]]
            b = a + d
            pkeys.append(((index_of[a] * n_items + index_of[b]) * (window + 1) + d) * horizon + order[b])
        pairs = np.sort(np.concatenate(pkeys)) if pkeys else np.zeros(0, np.int64)
        return cls(items, cat, ikeys[srt], np.asarray(ts_ms, np.int64)[flat][srt], pairs, horizon, window)

    # ------------------------------------------------------------ lookups
    @functools.cached_property
    def _at_serve_point(self) -> "_ServedCounts":
        """Everything counts at the serve point, so the point-in-time ranges collapse to per-item and per-pair
        totals: computed once (O(E + P)), a served request then reads the items' totals by index and makes one
        lookup per (recent item, candidate) pair in the distinct pairs instead of three in the pair log."""
        item = self.item_keys // self.horizon  # item index, sorted
        n = len(self.items)
        count = np.bincount(item, minlength=n).astype(np.int64)
        last = np.cumsum(count) - 1  # the item's last event (order within an item is ascending)
        last_ts = np.where(count > 0, self.item_ts[np.clip(last, 0, max(len(self.item_ts) - 1, 0))], 0)
        pair = self.pair_keys // self.horizon  # (a * I + b) * (window + 1) + distance, sorted
        ab, dist = pair // (self.window + 1), pair % (self.window + 1)
        starts = np.flatnonzero(np.r_[True, ab[1:] != ab[:-1]]) if len(ab) else np.zeros(0, np.int64)
        cooc = np.diff(np.r_[starts, len(ab)]).astype(np.int64)  # every distance 1..window
        trans = (np.add.reduceat((dist == 1).astype(np.int64), starts) if len(starts)
                 else np.zeros(0, np.int64))
        return _ServedCounts(count, last_ts, ab[starts], cooc, trans)

    def prepare_serving(self) -> None:
        """Computes the serve-point totals now (a server calls it when it loads the bundle, so that the first
        request does not pay for them)."""
        self._at_serve_point  # noqa: B018 (the cached property's side effect)

    def item_index(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dense index into `items`, found mask) of item ids of any shape; an unknown id gets a valid index and
        found False."""
        pos = np.searchsorted(self.items, item_ids)
        pos = np.minimum(pos, max(len(self.items) - 1, 0))
        found = (self.items[pos] == item_ids) if len(self.items) else np.zeros(item_ids.shape, bool)
        return pos, found

    def _count_before(self, keys: np.ndarray, group: np.ndarray, point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count of keys in [group * G, group * G + point), index of the last of them)."""
        lo = _searchsorted(keys, group * self.horizon)
        hi = _searchsorted(keys, group * self.horizon + np.minimum(point, self.horizon))
        return hi - lo, hi - 1

    def features(self, hist_items: np.ndarray, hist_lengths: np.ndarray, points: np.ndarray, request_ts: np.ndarray,
                 cand_items: np.ndarray, hist_categories: np.ndarray | None = None) -> np.ndarray:
        """(R * N, len(CONTEXT_FEATURE_NAMES)) float32, row-major (request, candidate).

        hist_items: (R, H) each request's last H behaviors, oldest first, right-aligned: row r's real
            behaviors are its last hist_lengths[r] columns (the rest any value). H >= 1.
        points: (R,) each request's order point (`request_points`; `SERVE_POINT` = after every event).
        request_ts: (R,) ms. cand_items: (R, N). hist_categories: (R, H) like hist_items (default: the
        items' categories in this log).
        """
        hist_items = np.asarray(hist_items, np.int64)
        cand_items = np.asarray(cand_items, np.int64)
        r, n = cand_items.shape
        if hist_items.ndim != 2 or hist_items.shape[0] != r or hist_items.shape[1] < 1:
            raise ValueError(f"ContextCounts.features: hist_items must be (R={r}, H>=1), got {hist_items.shape}")
        points = np.broadcast_to(np.asarray(points, np.int64), (r,))
        request_ts = np.broadcast_to(np.asarray(request_ts, np.int64), (r,))
        h_len = np.minimum(np.asarray(hist_lengths, np.int64), hist_items.shape[1])
        w = min(self.window, hist_items.shape[1])
        recent = hist_items[:, -w:]  # (R, w); column j is real when j >= w - h_len
        real = np.arange(w)[None, :] >= (w - np.minimum(h_len, w))[:, None]

        c_idx, c_found = self.item_index(cand_items)
        pt = np.repeat(points, n).reshape(r, n)
        served = bool((points >= self.horizon).all())  # a served request: every event of the log counts
        if served:
            at = self._at_serve_point
            count = np.where(c_found, at.item_count[c_idx] if len(self.items) else 0, 0)
            last_ts = np.where(c_found & (count > 0), at.item_last_ts[c_idx] if len(self.items) else 0, 0)
        else:
            count, last = self._count_before(self.item_keys, c_idx, pt)
            count = np.where(c_found, count, 0)
            last_ts = np.where(c_found & (count > 0),
                               self.item_ts[np.clip(last, 0, max(len(self.item_ts) - 1, 0))], 0)
        has_last = c_found & (count > 0)
        age_h = np.where(has_last, np.maximum(request_ts[:, None] - last_ts, 0) / 3.6e6, AGE_CAP_H)

        a_idx, a_found = self.item_index(recent)
        # pair counts of (recent item j, candidate, distance d) for every j and d in one lookup per chunk of
        # requests; the last recent item (one behavior before the request) at distance 1 is the transition
        trans = np.zeros((r, n), np.int64)
        cooc = np.zeros((r, n), np.int64)
        n_items, win1 = len(self.items), self.window + 1
        dist = np.arange(1, self.window + 1)
        step = max(1, PAIR_LOOKUPS_PER_CHUNK // max(w * n * self.window, 1))
        for s in range(0, r, step):
            q = slice(s, min(r, s + step))
            ok = (a_found[q] & real[q])[:, :, None] & c_found[q][:, None, :]  # (r', w, n)
            if served:  # the pair's totals over every distance (cooccurrence) and at distance 1 (transition)
                at = self._at_serve_point
                pair = a_idx[q][:, :, None] * n_items + c_idx[q][:, None, :]  # (r', w, n)
                pos = np.minimum(_searchsorted(at.pairs, pair), max(len(at.pairs) - 1, 0))
                hit = ok & (at.pairs[pos] == pair) if len(at.pairs) else np.zeros_like(ok)
                cooc[q] = np.where(hit, at.pair_cooc[pos] if len(at.pairs) else 0, 0).sum(axis=1)
                trans[q] = np.where(hit[:, w - 1, :], at.pair_trans[pos[:, w - 1, :]] if len(at.pairs) else 0, 0)
                continue
            base = (a_idx[q][:, :, None] * n_items + c_idx[q][:, None, :]) * win1  # (r', w, n)
            cnt, _ = self._count_before(self.pair_keys, base[..., None] + dist, pt[q][:, None, :, None])
            cnt = np.where(ok[..., None], cnt, 0)  # (r', w, n, window)
            cooc[q] = cnt.sum(axis=(1, 3))
            trans[q] = cnt[:, w - 1, :, 0]

        if hist_categories is None:
            hist_cat = np.where(a_found, self.item_category[a_idx], -1)
        else:
            hist_cat = np.asarray(hist_categories, np.int64)[:, -w:]
        c_cat = np.where(c_found, self.item_category[c_idx], -2)
        same = ((hist_cat[:, None, :] == c_cat[:, :, None]) & real[:, None, :]).sum(-1)
        share = same / np.maximum(np.minimum(h_len, w), 1)[:, None]

        out = np.stack([np.log1p(count), np.log1p(np.minimum(age_h, AGE_CAP_H)), np.log1p(trans), np.log1p(cooc),
                        share], axis=-1)
        return out.reshape(r * n, len(CONTEXT_FEATURE_NAMES)).astype(np.float32)

    # ------------------------------------------------------------ persistence (the ranker bundle carries it)
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, items=self.items, item_category=self.item_category, item_keys=self.item_keys,
                 item_ts=self.item_ts, pair_keys=self.pair_keys, meta=np.array([self.horizon, self.window]))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ContextCounts":
        with np.load(Path(path), allow_pickle=False) as z:
            horizon, window = (int(v) for v in z["meta"])
            out = cls(z["items"], z["item_category"], z["item_keys"], z["item_ts"], z["pair_keys"], horizon, window)
        for name in ("items", "item_keys", "pair_keys"):
            a = getattr(out, name)
            if a.dtype != np.int64 or (a.size > 1 and (np.diff(a) < 0).any()):
                raise ValueError(f"{path}: context counts array {name!r} is not sorted int64")
        if out.item_ts.shape != out.item_keys.shape or out.item_category.shape != out.items.shape:
            raise ValueError(f"{path}: context counts arrays have inconsistent lengths")
        if window < 1 or horizon < 1:
            raise ValueError(f"{path}: context counts meta (horizon {horizon}, window {window}) must be positive")
        return out


def _searchsorted(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """np.searchsorted(keys, q) with the needles sorted first: numpy walks sorted needles from the previous
    position, about twice as fast over a log of millions of keys (fewer cache misses)."""
    flat = np.ravel(q)
    if flat.size < 64:
        return np.searchsorted(keys, q)
    order = np.argsort(flat, kind="stable")
    out = np.empty(flat.size, np.int64)
    out[order] = np.searchsorted(keys, flat[order])
    return out.reshape(np.shape(q))


def event_order(ts_ms: np.ndarray, total: int) -> np.ndarray:
    """(T,) each flat row's position in the (timestamp, flat row) order."""
    order = np.lexsort((np.arange(total), ts_ms))
    rank = np.empty(total, np.int64)
    rank[order] = np.arange(total)
    return rank


def request_points(order: np.ndarray, offsets: np.ndarray, users_rows: np.ndarray, hist_len: np.ndarray) -> np.ndarray:
    """(R,) the order point of requests that see timeline[:hist_len] of timeline row `users_rows`: one past
    the last seen behavior's position in `order` (`event_order` of the timelines; 0 for an empty history:
    nothing counts)."""
    hist_len = np.asarray(hist_len, np.int64)
    last = np.asarray(offsets, np.int64)[users_rows] + np.maximum(hist_len - 1, 0)
    return np.where(hist_len > 0, order[np.minimum(last, max(len(order) - 1, 0))] + 1, 0)


def recent_items(offsets: np.ndarray, item_ids: np.ndarray, rows: np.ndarray, hist_len: np.ndarray,
                 width: int) -> np.ndarray:
    """(R, width) the last `width` of timeline[:hist_len] of timeline rows `rows`, right-aligned (the columns
    before a short history's first behavior hold -1)."""
    hist_len = np.asarray(hist_len, np.int64)
    cols = hist_len[:, None] - width + np.arange(width)[None, :]
    flat = np.asarray(offsets, np.int64)[rows][:, None] + np.maximum(cols, 0)
    return np.where(cols >= 0, np.asarray(item_ids, np.int64)[flat], -1)


def second_stage_dense_dim(context: bool, retrieval_products: int = 0, retrieval_similarity: int = 0,
                           item_item: bool = False) -> int:
    """Columns of `second_stage_dense` for a ranker with (or without) context features, `retrieval_products` u_d*v_d
    terms, (when `retrieval_similarity` > 0) the retriever-space similarities and the item-item features."""
    return (len(LIST_FEATURE_NAMES) + (len(CONTEXT_FEATURE_NAMES) if context else 0) + retrieval_products
            + (len(SIMILARITY_NAMES) if retrieval_similarity else 0)
            + (len(ITEM_ITEM_FEATURE_NAMES) if item_item else 0))


def second_stage_dense(logits: np.ndarray, items: np.ndarray, context: ContextCounts | None = None,
                       recent: np.ndarray | None = None, hist_len: np.ndarray | None = None,
                       points: np.ndarray | int = SERVE_POINT, request_ts: np.ndarray | int = 0,
                       columns: np.ndarray | None = None, vectors: np.ndarray | None = None,
                       item_item: np.ndarray | None = None) -> np.ndarray:
    """The second-stage ranker's candidate_dense of R lists, row-major (request, candidate).

    logits, items: (R, N) the retrieved lists, best first (the list features read the whole list).
    columns: (R, W) list positions to keep (training samples them); None keeps all N.
    context: the ranker's counts (None: a ranker without context features); then recent (R, H) the
    requests' last behaviors right-aligned (`recent_items`), hist_len (R,), points (R,) or `SERVE_POINT`,
    request_ts (R,) ms.
    vectors: (rows, F) the kept candidates' retriever-vector features (`features.candidate_lists.retrieval_products`
    then `retrieval_similarities`, those the ranker reads), appended after the context; None: none.
    item_item: (rows, 2) the kept candidates' `features.item_item.ItemItem.list_features`, appended last; None: none.
    """
    feats = list_features(logits)
    items = np.asarray(items, np.int64)
    if columns is not None:
        r, n = items.shape
        feats = feats[(np.arange(r)[:, None] * n + columns).ravel()]
        items = np.take_along_axis(items, columns, 1)
    parts = [feats]
    if context is not None:
        if recent is None or hist_len is None:
            raise ValueError("second_stage_dense: a ranker with context features needs the requests' recent behaviors")
        parts.append(context.features(recent, hist_len, points, request_ts, items))
    for name, extra in (("retriever-vector", vectors), ("item-item", item_item)):
        if extra is not None:
            if extra.shape[0] != feats.shape[0]:
                raise ValueError(f"second_stage_dense: {extra.shape[0]} rows of {name} features for "
                                 f"{feats.shape[0]} candidates")
            parts.append(np.asarray(extra, np.float32))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
