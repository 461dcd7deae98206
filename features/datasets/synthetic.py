"""Synthetic interaction logs with learnable structure, written as canonical Parquet.

The generator is the embedded default dataset (demo, scaling benchmarks, long
sequences) and is deterministic by seed. What it models:

* items: Zipf popularity (exponent `zipf_a`) over a random permutation; a
  primary category (plus sometimes a second one), 1-3 tags drawn mostly from
  the category's own tag pool, a brand and a price; a latent vector near the
  category centroid.
* users: heavy-tailed activity (lognormal, plus `heavy_users` with
  `heavy_min_events`+ events, e.g. 20,000+); a latent taste vector mixed from
  1-3 favourite categories.
* events: sessions of ~`session_len` impressions, each session focused on one
  of the user's categories (so consecutive events are correlated and
  sequential models have something to learn); within a category, items by
  popularity; click probability sigmoid(bias + w * cos(user, item) + user
  bias) (so a CTR model has signal); some clicks become purchases (value =
  price). Timestamps: session starts spread over `days`, exponential gaps
  within a session.

Events are generated in chunks of users (~`chunk_events` events each) and
streamed to Parquet, so memory is bounded independently of `events`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.datasets.common import Quarantine, TableSink, prepare_out_dir, write_manifest
from features.datasets.movielens import ImportResult
from features.schema import EVENTS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA


@dataclass(frozen=True)
class SynthConfig:
    events: int = 1_000_000
    users: int = 0  # 0: events // 150
    items: int = 0  # 0: max(1000, events // 500)
    categories: int = 40
    tags: int = 400
    latent_dim: int = 16
    zipf_a: float = 1.05
    activity_sigma: float = 1.3  # lognormal sigma of per-user activity
    heavy_users: int = -1  # -1: automatic (a few when events allow), else exact count
    heavy_min_events: int = 20_000
    session_len: int = 12
    session_focus: float = 0.8  # share of a session's impressions from its focus category
    days: float = 90.0
    start_ts_ms: int = 1_704_067_200_000  # 2024-01-01T00:00:00Z
    click_bias: float = -4.5
    click_affinity: float = 4.0
    purchase_rate: float = 0.08
    chunk_events: int = 1_000_000
    seed: int = 0

    def resolved(self) -> "SynthConfig":
        from dataclasses import replace

        if self.events <= 0:
            raise ValueError(f"events must be positive, got {self.events}")
        users = self.users or max(10, self.events // 150)
        items = self.items or max(1000, self.events // 500)
        heavy = self.heavy_users
        if heavy < 0:
            heavy = min(5, self.events // (10 * self.heavy_min_events))
        if heavy * self.heavy_min_events > self.events:
            raise ValueError(
                f"heavy_users={heavy} x heavy_min_events={self.heavy_min_events} exceeds events={self.events}"
            )
        if heavy > users:
            raise ValueError(f"heavy_users={heavy} exceeds users={users}")
        return replace(self, users=users, items=items, heavy_users=heavy)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-9)


class _World:
    """Items, users and their latent factors (everything but the events)."""

    def __init__(self, cfg: SynthConfig) -> None:
        rng = np.random.default_rng(cfg.seed)
        self.cfg = cfg
        n_i, n_u, n_c, d = cfg.items, cfg.users, cfg.categories, cfg.latent_dim
        self.centroids = _normalize(rng.normal(size=(n_c, d)))
        # popularity: Zipf weights over a random permutation of items
        ranks = rng.permutation(n_i) + 1
        self.pop = (1.0 / ranks.astype(np.float64) ** cfg.zipf_a)
        self.pop /= self.pop.sum()
        self.item_cat = rng.integers(0, n_c, size=n_i)
        self.item_vec = _normalize(self.centroids[self.item_cat] + 0.6 * rng.normal(size=(n_i, d)) / np.sqrt(d))
        self.item_price = np.round(np.exp(rng.normal(3.0, 0.8, size=n_i)), 2)
        self.item_brand = rng.integers(0, max(1, n_i // 20), size=n_i)
        second = np.where(rng.random(n_i) < 0.3, rng.integers(0, n_c, size=n_i), -1)
        self.item_second_cat = np.where(second == self.item_cat, -1, second)
        tag_pool = cfg.tags // n_c if cfg.tags >= n_c else 1
        n_tags = rng.integers(1, 4, size=n_i)
        own = self.item_cat[:, None] * tag_pool + rng.integers(0, max(tag_pool, 1), size=(n_i, 3))
        rand = rng.integers(0, cfg.tags, size=(n_i, 3))
        self.item_tags = np.where(rng.random((n_i, 3)) < 0.8, own, rand) % max(cfg.tags, 1)
        self.item_ntags = n_tags
        # per-category popularity CDFs laid end to end: category c spans [c, c+1)
        order = np.lexsort((-self.pop, self.item_cat))
        self.cat_sorted_items = order
        cat_sorted = self.item_cat[order]
        p = self.pop[order]
        cat_tot = np.bincount(cat_sorted, weights=p, minlength=n_c)
        within = np.cumsum(p) - np.concatenate([[0.0], np.cumsum(cat_tot)[:-1]])[cat_sorted]
        self.cat_cdf = cat_sorted + within / np.maximum(cat_tot[cat_sorted], 1e-300)
        self.cat_has_items = np.bincount(cat_sorted, minlength=n_c) > 0
        self.global_cdf = np.cumsum(self.pop)
        # users: favourite categories and taste
        self.n_fav = rng.integers(1, 4, size=n_u)
        self.fav = rng.integers(0, n_c, size=(n_u, 3))
        w = rng.dirichlet(np.ones(3), size=n_u) * (np.arange(3)[None, :] < self.n_fav[:, None])
        self.fav_w = w / w.sum(axis=1, keepdims=True)
        self.user_vec = _normalize((self.fav_w[:, :, None] * self.centroids[self.fav]).sum(1) + 0.3 * rng.normal(size=(n_u, d)) / np.sqrt(d))
        self.user_bias = rng.normal(0, 0.5, size=n_u)
        self.user_age = rng.integers(16, 70, size=n_u)
        self.user_segment = rng.integers(0, 8, size=n_u)
        # activity: lognormal, scaled to the event budget, heavy users on top
        act = rng.lognormal(0.0, cfg.activity_sigma, size=n_u)
        budget = cfg.events - cfg.heavy_users * cfg.heavy_min_events
        heavy_idx = rng.choice(n_u, size=cfg.heavy_users, replace=False) if cfg.heavy_users else np.empty(0, np.int64)
        act[heavy_idx] = 0.0
        counts = np.floor(act / act.sum() * budget).astype(np.int64)
        counts = np.maximum(counts, 0)
        counts[heavy_idx] = cfg.heavy_min_events
        short = cfg.events - counts.sum()  # distribute the rounding remainder
        if short > 0:
            light = np.setdiff1d(np.arange(n_u), heavy_idx)
            np.add.at(counts, rng.choice(light, size=short, replace=True), 1)
        self.counts = counts

    def items_table(self) -> pa.Table:
        cfg = self.cfg
        n = cfg.items
        cats = [
            [f"cat_{c}"] + ([f"cat_{s}"] if s >= 0 else [])
            for c, s in zip(self.item_cat.tolist(), self.item_second_cat.tolist())
        ]
        tags = [[f"tag_{t}" for t in row[:k]] for row, k in zip(self.item_tags.tolist(), self.item_ntags.tolist())]
        return pa.Table.from_pydict(
            {
                "item_id": np.arange(1, n + 1, dtype=np.int64),
                "title": [f"item {i}" for i in range(1, n + 1)],
                "categories": cats,
                "tags": tags,
                "attributes": [[("brand", f"brand_{b}")] for b in self.item_brand.tolist()],
                "numeric": [[("price", float(p))] for p in self.item_price.tolist()],
            },
            schema=ITEMS_SCHEMA,
        )

    def users_table(self) -> pa.Table:
        n = self.cfg.users
        return pa.Table.from_pydict(
            {
                "user_id": np.arange(1, n + 1, dtype=np.int64),
                "attributes": [
                    [("segment", f"seg_{s}"), ("age", str(a))] for s, a in zip(self.user_segment.tolist(), self.user_age.tolist())
                ],
                "numeric": [[("age", float(a))] for a in self.user_age.tolist()],
            },
            schema=USERS_SCHEMA,
        )

    def events_chunk(self, users: np.ndarray, rng: np.random.Generator) -> pa.Table:
        """All events of `users` (indices), sorted by (user, ts)."""
        cfg = self.cfg
        counts = self.counts[users]
        total = int(counts.sum())
        if total == 0:
            return EVENTS_SCHEMA.empty_table()
        u = np.repeat(users, counts)  # (E,)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        k = np.arange(total) - np.repeat(starts, counts)  # position within the user
        # sessions: consecutive runs of session_len events, each with a focus category and a start time
        sess = k // cfg.session_len
        n_sess = (counts + cfg.session_len - 1) // cfg.session_len
        s_user = np.repeat(users, n_sess)
        s_total = int(n_sess.sum())
        s_off = np.concatenate([[0], np.cumsum(n_sess)[:-1]])
        # session start times in [0, 1) of the window, sorted within each user
        s_start = rng.random(s_total)
        s_start = s_start[np.lexsort((s_start, np.repeat(np.arange(len(users)), n_sess)))]
        fav_pick = (rng.random(s_total)[:, None] > np.cumsum(self.fav_w[s_user], axis=1)).sum(1).clip(0, 2)
        s_focus = self.fav[s_user, fav_pick]
        ev_sess = np.repeat(s_off, counts) + sess  # global session row of each event
        focus = s_focus[ev_sess]
        # item choice: focus category by popularity, else global popularity
        use_focus = (rng.random(total) < cfg.session_focus) & self.cat_has_items[focus]
        r = rng.random(total)
        idx_focus = np.searchsorted(self.cat_cdf, focus + r * (1 - 1e-12), side="right").clip(0, cfg.items - 1)
        item_focus = self.cat_sorted_items[idx_focus]
        item_global = np.searchsorted(self.global_cdf, r * self.global_cdf[-1], side="right").clip(0, cfg.items - 1)
        item = np.where(use_focus, item_focus, item_global)
        # clicks from latent affinity
        aff = np.einsum("ed,ed->e", self.user_vec[u], self.item_vec[item])
        logit = cfg.click_bias + cfg.click_affinity * aff + self.user_bias[u]
        click = rng.random(total) < 1.0 / (1.0 + np.exp(-logit))
        purchase = click & (rng.random(total) < cfg.purchase_rate)
        # timestamps: session start over the window + exponential gaps (mean 40 s)
        span_ms = cfg.days * 86_400_000
        gaps = rng.exponential(40_000.0, size=total)
        gaps[k % cfg.session_len == 0] = 0.0
        cg = np.cumsum(gaps)
        # cumulative gap since the session's first event
        first_idx = np.arange(total) - (k % cfg.session_len)
        within = cg - cg[first_idx]
        ts = cfg.start_ts_ms + (s_start[ev_sess] * span_ms).astype(np.int64) + within.astype(np.int64)
        # sort by user, ts (sessions may overlap in time: keep the real order)
        order = np.lexsort((k, ts, u))
        u, item, ts, click, purchase = u[order], item[order], ts[order], click[order], purchase[order]
        pos = np.arange(total) - np.repeat(starts, counts)
        etype = np.where(purchase, "purchase", np.where(click, "click", "impression"))
        value = np.where(purchase, self.item_price[item], np.nan).astype(np.float32)
        user_ids = pa.array(u.astype(np.int64) + 1)
        event_id = pc.binary_join_element_wise(
            pa.array(np.full(total, f"synth{cfg.seed}")),
            pc.cast(user_ids, pa.string()),
            pc.cast(pa.array(pos), pa.string()),
            "/",
        )
        return pa.Table.from_arrays(
            [
                event_id,
                user_ids,
                pa.array(item.astype(np.int64) + 1),
                pa.array(ts),
                pa.array(etype),
                pa.array(click.astype(np.float32)),
                pa.array(value, mask=np.isnan(value)),
                pa.nulls(total, EVENTS_SCHEMA.field("context").type),
            ],
            schema=EVENTS_SCHEMA,
        )


def generate(
    cfg: SynthConfig,
    out: Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Writes a synthetic canonical dataset to `out`; `progress(done_events, total_events)`."""
    cfg = cfg.resolved()
    out = prepare_out_dir(out, overwrite)
    t0 = time.perf_counter()
    world = _World(cfg)
    tables = {}
    for name, t in (("items", world.items_table()), ("users", world.users_table())):
        sink = TableSink(out, name)
        sink.write(t)
        tables[name] = sink.close()
    ev = TableSink(out, "events", rows_per_file=max(cfg.chunk_events, 1_000_000))
    rng = np.random.default_rng([cfg.seed, 1])
    cum = np.cumsum(world.counts)
    done = 0
    lo = 0
    clicks = 0
    while lo < cfg.users:
        hi = int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + cfg.chunk_events, side="right"))
        hi = max(hi, lo + 1)
        chunk = world.events_chunk(np.arange(lo, min(hi, cfg.users)), rng)
        ev.write(chunk)
        clicks += int(pc.sum(chunk["label"]).as_py() or 0)
        done += chunk.num_rows
        if progress:
            progress(done, cfg.events)
        lo = hi
    tables["events"] = ev.close()
    tables["quarantine"] = Quarantine().write(out)
    stats = {
        "events": done,
        "users": int((world.counts > 0).sum()),
        "items": cfg.items,
        "positives": clicks,
        "ctr": clicks / max(done, 1),
        "max_user_events": int(world.counts.max()),
        "users_with_20k_plus": int((world.counts >= 20_000).sum()),
        "generation_seconds": round(time.perf_counter() - t0, 2),
    }
    from features.config import to_dict

    manifest = write_manifest(
        out,
        dataset=f"synthetic-{cfg.seed}",
        tables=tables,
        sources=[],
        time_range=(ev.min_ts, ev.max_ts),
        timestamps="real (synthetic)",
        stats=stats,
        params=to_dict(cfg),
    )
    return ImportResult(out=out, manifest=manifest, quarantined=0)
