"""The item catalog held in memory by every server process.

Item attributes are read on every request (the candidates' features) and
change rarely (the `items` topic), so they live in process memory, not in
Redis: sorted ids for a vectorized id -> row lookup, the primary category (for
appending behaviors), all categories and tags as hashed ids (the candidate
features of the batch), numeric attributes. `ItemCatalog.with_items` returns a new
catalog (copy-on-write): readers keep the reference they started with, a swap
is one assignment. (Not `retrieval.catalog.Catalog`: that one is the retriever's
training/export view of the items, a candidates KeyedJaggedTensor plus logq.)

Hashed ids follow `features.layout`: ``category`` and ``tag`` features of
`features.hashing` spec v1; the primary category equals
`features.sequence.category_id` (0 = none).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from features.hashing import hash_string
from features.batch import build_candidate_features
from features.jagged import segment_indices
from features.layout import CATEGORY_FEATURE, TAG_FEATURE, item_attr_feature
from features.schema import Item


def _hash_list(values: Iterable[str], feature: str) -> list[int]:
    return [hash_string(v, feature) for v in values]


@dataclass(frozen=True)
class ItemCatalog:
    item_ids: np.ndarray  # (N,) int64, sorted, unique
    category: np.ndarray  # (N,) int64 primary category id, 0 = none
    cat_values: np.ndarray  # (sum,) int64 hashed ids of all categories, row-major
    cat_lengths: np.ndarray  # (N,) int64
    tag_values: np.ndarray
    tag_lengths: np.ndarray
    numeric: Mapping[str, np.ndarray]  # key -> (N,) float64, NaN = missing
    titles: tuple[str, ...]
    # feature (``item_attr_<key>``, features.layout) -> (N,) int64 hashed attribute id, 0 = missing
    # (the reader's NULL: the candidate gets no value for that feature)
    attrs: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 for ids not in the catalog. Vectorized."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self) == 0:
            return np.full(ids.shape, -1, np.int64)
        r = np.searchsorted(self.item_ids, ids)
        r = np.minimum(r, len(self) - 1)
        return np.where(self.item_ids[r] == ids, r, -1)

    def primary_categories(self, ids: np.ndarray) -> np.ndarray:
        r = self.rows(ids)
        return np.where(r >= 0, self.category[np.maximum(r, 0)], 0)

    def jagged(self, rows: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(values, lengths) of the categories or tags of `rows` (-1 rows: none)."""
        values, lengths = (self.cat_values, self.cat_lengths) if which == "category" else (self.tag_values, self.tag_lengths)
        offsets = self._offsets(which)
        rows = np.asarray(rows, dtype=np.int64)
        lens = np.where(rows >= 0, lengths[np.maximum(rows, 0)], 0)
        if lens.sum() == 0:
            return np.empty(0, np.int64), lens
        starts = np.where(rows >= 0, offsets[np.maximum(rows, 0)], 0)
        return values[segment_indices(starts, lens)], lens

    def _offsets(self, which: str) -> np.ndarray:
        key = "_cat_off" if which == "category" else "_tag_off"
        off = self.__dict__.get(key)
        if off is None:
            lengths = self.cat_lengths if which == "category" else self.tag_lengths
            off = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            object.__setattr__(self, key, off)
        return off

    def numeric_of(self, rows: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        out = {}
        for k in keys:
            col = self.numeric.get(k)
            out[k] = np.full(rows.shape, np.nan) if col is None else np.where(rows >= 0, col[np.maximum(rows, 0)], np.nan)
        return out

    @classmethod
    def empty(cls) -> "ItemCatalog":
        z = np.empty(0, np.int64)
        return cls(z, z, z, z, z, z, {}, ())

    @classmethod
    def from_items(cls, items: Sequence[Item]) -> "ItemCatalog":
        return cls.empty().with_items(items)

    def with_items(self, items: Sequence[Item]) -> "ItemCatalog":
        """A new catalog with `items` added or replaced (by id)."""
        if not items:
            return self
        new = {it.item_id: it for it in items}  # last one wins
        keep = ~np.isin(self.item_ids, np.fromiter(new, np.int64, len(new)))
        old_rows = np.flatnonzero(keep)
        new_ids = np.fromiter(new, np.int64, len(new))
        cats = [_hash_list(new[i].categories, CATEGORY_FEATURE) for i in new_ids]
        tags = [_hash_list(new[i].tags, TAG_FEATURE) for i in new_ids]
        ov, ol = self.jagged(old_rows, "category")
        tv, tl = self.jagged(old_rows, "tag")
        ids = np.concatenate([self.item_ids[old_rows], new_ids])
        category = np.concatenate([self.category[old_rows],
                                   np.array([c[0] if c else 0 for c in cats], np.int64)])
        cat_values = np.concatenate([ov, np.array([v for c in cats for v in c], np.int64)])
        cat_lengths = np.concatenate([ol, np.array([len(c) for c in cats], np.int64)])
        tag_values = np.concatenate([tv, np.array([v for t in tags for v in t], np.int64)])
        tag_lengths = np.concatenate([tl, np.array([len(t) for t in tags], np.int64)])
        keys = sorted(set(self.numeric) | {k for it in new.values() for k in it.numeric})
        numeric = {}
        for k in keys:
            old = self.numeric.get(k, np.full(len(self), np.nan))[old_rows]
            numeric[k] = np.concatenate([old, np.array([float(new[i].numeric.get(k, np.nan)) for i in new_ids])])
        titles = tuple(self.titles[r] for r in old_rows) + tuple(new[i].title or "" for i in new_ids)
        akeys = sorted(set(self.attrs) | {item_attr_feature(k) for it in new.values() for k in it.attributes})
        attrs = {}
        for f in akeys:
            old = self.attrs.get(f, np.zeros(len(self), np.int64))[old_rows]
            vals = []
            for i in new_ids:
                raw = {item_attr_feature(k): v for k, v in new[i].attributes.items()}.get(f)
                vals.append(hash_string(raw, f) if raw is not None else 0)
            attrs[f] = np.concatenate([old, np.array(vals, np.int64)])
        order = np.argsort(ids, kind="stable")
        cat_values, cat_lengths = _reorder(cat_values, cat_lengths, order)
        tag_values, tag_lengths = _reorder(tag_values, tag_lengths, order)
        return ItemCatalog(ids[order], category[order], cat_values, cat_lengths, tag_values, tag_lengths,
                           {k: v[order] for k, v in numeric.items()}, tuple(titles[i] for i in order),
                           {k: v[order] for k, v in attrs.items()})

    def candidate_features(self, item_ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The candidates KJT's {key: (values, lengths)} of `item_ids` (`features.batch.build_candidate_features`,
        as the reader builds them); ids not in the catalog and missing attributes get no values."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        rows = self.rows(item_ids)
        attrs = {}
        for f, ids in self.attrs.items():
            v = np.where(rows >= 0, ids[np.maximum(rows, 0)], 0)
            attrs[f] = (v, v != 0)
        return build_candidate_features(item_ids, self.jagged(rows, "category"), self.jagged(rows, "tag"), attrs)


def _reorder(values: np.ndarray, lengths: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    lens = lengths[order]
    if lens.sum() == 0:
        return np.empty(0, np.int64), lens
    return values[segment_indices(offsets[order], lens)], lens


def load_catalog(path: Path) -> ItemCatalog:
    """Items of a canonical dataset directory (``items/``, `features.schema.ITEMS_SCHEMA`)."""
    d = Path(path) / "items"
    if not d.exists():
        raise FileNotFoundError(f"{d} does not exist: pass a canonical dataset directory (with items/)")
    t = pq.read_table(d)
    names = set(t.column_names)
    if not {"item_id", "categories", "tags", "numeric"} <= names:
        raise ValueError(f"{d}: expected the canonical items columns item_id, categories, tags, numeric; have {sorted(names)}")
    cols = t.to_pydict()
    items = [
        Item(item_id=int(i), title=title, categories=tuple(c or ()), tags=tuple(g or ()),
             attributes=dict(a or ()), numeric=dict(n or ()))
        for i, title, c, g, a, n in zip(cols["item_id"], cols.get("title", [None] * t.num_rows), cols["categories"],
                                        cols["tags"], cols.get("attributes", [None] * t.num_rows), cols["numeric"])
    ]
    return ItemCatalog.from_items(items)
