"""Reads a features directory (`cascade build-features`) into the one `Batch` type.

`FeatureStore(root)` loads, columnar and vectorized (no per-row Python):

* every user's timeline as one values array per field (item_id, ts_ms,
  action, category) plus user offsets, sorted by user id;
* the item table (ids, primary category, categories and tags as jagged
  arrays, hashed attribute ids, numeric attributes, logQ) and the user table
  (hashed attribute ids), each indexed by a sorted id array (`searchsorted`);
* the dense-feature layout (`features.transforms.DenseLayout`) from the manifest.

Ranking batches (`ranking_batches`), one candidate per sample (N == B)::

    user        KJT  user_id, user_attr_<key>...              (0/1 value each)
    history     KJT  hist_item_id, hist_ts, hist_action, hist_category:
                     timeline[max(0, hist_len - long_cap) : hist_len] of the sample's user
    candidates  KJT  item_id, item_category (all), item_tag, item_attr_<key>...
    user_dense       transforms: log1p counts and smoothed rates of the user counters    (B, 2W)
    candidate_dense  the same of the item counters + signed log1p numeric attributes  (N, 2W + K)
    labels (N, 1), weights (N,), request_ts = sample ts

Retrieval batches (`retrieval_batches`, next-item training and evaluation)::

    train        per user, its leave-one-out training prefix, last max_len + 1 behaviors:
                 history = items[:-1], candidates = items[1:] (every-prefix training;
                 the model applies the causal mask); request_ts = ts of the last one
    valid/test   history = the behaviors before the target (capped at `max_len`, or
                 uncapped with max_len=None), one candidate = the target
    candidate_dense = [logq] (N, 1), labels = 1 (N, 1); user_dense is empty (B, 0).

Retrieval histories are sequence prefixes (behaviors at the target's ts that
come earlier in (ts, event_id) order are included, as in the published
leave-one-out protocol), so `retrieval_spec` does not require them to be
strictly before request_ts; ranking histories are, and `ranking_spec` checks it.

Distributed training: the Parquet row groups of a split, in a seeded
per-epoch order shared by all ranks, form one sequence of rows; rank r reads
the r-th contiguous 1/W of it (only the row groups overlapping its range), so
ranks get disjoint, equal shares; retrieval users are split by a seeded
permutation. With ``world_size > 1`` every rank yields the same number of full
batches (what DDP needs). Shuffling (group order, then rows within a buffer)
is seeded per epoch.

Layout of the directory: see `features.layout`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features import layout, storage
from features.batch import (
    HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_TS, HISTORY_KEYS, ITEM_CATEGORY, ITEM_ID, ITEM_TAG, USER_ID,
    Batch, BatchSpec, build_batch, build_candidate_features, validate_batch,
)
from features.jagged import segment_indices
from features.sequence import SequenceState
from features.transforms import DenseLayout, counter_columns


@dataclass(frozen=True)
class ReaderConfig:
    batch_size: int = 512  # samples (ranking) or users (retrieval) per batch
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False  # with world_size > 1 batches are always full and equal in number
    long_cap: int | None = None  # ranking history cap; None: the build's sequence.long_cap
    shuffle_buffer_rows: int = 65_536  # ranking: rows shuffled together (whole row groups are read)
    validate: bool = True  # validate_batch on every batch (the reader is where data enters training)
    # retrieval training: leave each user's last `holdout_tail` training items out, so a retriever trained on the
    # rest produces honest candidate lists at those positions for the second stage (0: the whole training prefix)
    holdout_tail: int = 0

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.holdout_tail < 0:
            raise ValueError(f"holdout_tail must be >= 0, got {self.holdout_tail}")
        if self.long_cap is not None and self.long_cap <= 0:
            raise ValueError(f"long_cap must be positive, got {self.long_cap}")


class FeatureStoreError(ValueError):
    """The features directory is missing something or is inconsistent; the message says what and where."""


@dataclass(frozen=True)
class Jagged:
    """Rows of variable length: values[offsets[i]:offsets[i + 1]] is row i."""

    offsets: np.ndarray  # (R + 1,) int64
    values: np.ndarray  # (T,)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def gather(self, rows: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(values, lengths) of `rows` in order; rows with valid=False are empty."""
        lens = self.offsets[rows + 1] - self.offsets[rows]
        if valid is not None:
            lens = np.where(valid, lens, 0)
        return self.values[segment_indices(self.offsets[rows], lens)], lens


def _list_column(col: pa.ChunkedArray, where: str) -> Jagged:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count or arr.values.null_count:
        raise FeatureStoreError(f"{where}: {arr.null_count} NULL lists, {arr.values.null_count} NULL elements")
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    values = values[offsets[0]:offsets[-1]] if len(offsets) else values[:0]
    return Jagged(offsets - (offsets[0] if len(offsets) else 0), values.astype(np.int64, copy=False))


def _read(root: Path | str, output: str, columns: list[str] | None = None) -> pa.Table:
    loc = storage.join(root, output)
    fs, path = storage.filesystem(loc)
    if not fs.exists(path):
        raise FeatureStoreError(f"{loc} does not exist: run `cascade build-features` (stage producing {output!r})")
    if storage.is_remote(loc):
        return pq.read_table(path, columns=columns, filesystem=fs)
    return pq.read_table(loc, columns=columns)


@dataclass(frozen=True)
class _Index:
    """Sorted ids + row lookup."""

    ids: np.ndarray  # (R,) sorted int64

    def rows(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, found) for every query id; row is 0 where not found."""
        q = np.asarray(query, dtype=np.int64)
        if len(self.ids) == 0:
            return np.zeros(len(q), dtype=np.int64), np.zeros(len(q), dtype=bool)
        pos = np.searchsorted(self.ids, q).clip(0, len(self.ids) - 1)
        found = self.ids[pos] == q
        return np.where(found, pos, 0), found


class FeatureStore:
    """A features directory in memory, turned into `Batch`es (see the module docstring).

        store = FeatureStore("features/ml-1m")
        spec = store.ranking_spec()                      # what the batches satisfy (dims, keys)
        for epoch in range(epochs):
            for batch in store.ranking_batches("train", ReaderConfig(batch_size=1024), epoch=epoch,
                                               rank=rank, world_size=world_size):
                ...
        for batch in store.retrieval_batches("test", ReaderConfig(batch_size=256, shuffle=False), max_len=200):
            seen, lengths = store.seen_items(batch.user_ids().numpy(), "test")   # to mask at full ranking
    """

    def __init__(self, root: str | Path) -> None:
        # a directory, or an object-store URI (s3://bucket/features/...: Parquet read through fsspec)
        self.root: Path | str = storage.check_location(root, "features") if storage.is_remote(root) else Path(root)
        self._fs = storage.filesystem(self.root)[0] if storage.is_remote(self.root) else None
        mpath = storage.join(self.root, layout.MANIFEST)
        if not storage.is_file(mpath):
            raise FeatureStoreError(f"no {layout.MANIFEST} in {self.root}: is it a features directory (cascade build-features)?")
        self.manifest = json.loads(storage.read_text(mpath))
        if self.manifest.get("feature_set_version") != layout.FEATURE_SET_VERSION:
            raise FeatureStoreError(
                f"{mpath}: feature_set_version {self.manifest.get('feature_set_version')!r}, "
                f"this reader reads {layout.FEATURE_SET_VERSION}"
            )
        self.dense = DenseLayout.from_manifest(self.manifest)
        self.long_cap = int(self.manifest["config"]["sequence"]["long_cap"])
        self._load_timelines()
        self._load_items()
        self._load_users()

    # ------------------------------------------------------------ loading
    def _load_timelines(self) -> None:
        t = _read(self.root, layout.TIMELINES, ["user_id", *layout.TIMELINE_FIELDS, "retrieval_train_len"])
        order = np.argsort(t["user_id"].to_numpy(), kind="stable")
        t = t.take(pa.array(order))
        self.timeline_users = _Index(t["user_id"].to_numpy().astype(np.int64))
        if len(self.timeline_users.ids) > 1 and (np.diff(self.timeline_users.ids) == 0).any():
            raise FeatureStoreError(f"{storage.join(self.root, layout.TIMELINES)}: a user has more than one timeline row")
        fields = {f: _list_column(t[f], f"{layout.TIMELINES}.{f}") for f in layout.TIMELINE_FIELDS}
        ref = fields["item_id"].offsets
        for f, j in fields.items():
            if not np.array_equal(j.offsets, ref):
                raise FeatureStoreError(f"{layout.TIMELINES}: field {f!r} has other lengths than 'item_id' (parallel arrays)")
        self.timeline_offsets = ref  # (U + 1,)
        self.timeline_values = {f: j.values for f, j in fields.items()}  # each (T,)
        self.retrieval_train_len = t["retrieval_train_len"].to_numpy().astype(np.int64)  # (U,)

    def _load_items(self) -> None:
        t = _read(self.root, layout.ITEMS)
        t = t.take(pa.array(np.argsort(t["item_id"].to_numpy(), kind="stable")))
        self.items = _Index(t["item_id"].to_numpy().astype(np.int64))
        self.item_categories = _list_column(t["categories"], f"{layout.ITEMS}.categories")
        self.item_tags = _list_column(t["tags"], f"{layout.ITEMS}.tags")
        self.item_attr_keys = tuple(c for c in t.column_names if c.startswith("item_attr_"))
        self.item_attrs = {c: _nullable_ids(t[c]) for c in self.item_attr_keys}
        self.item_numeric = {
            k: t[layout.numeric_column(k)].to_numpy(zero_copy_only=False).astype(np.float64)
            if layout.numeric_column(k) in t.column_names else np.full(len(self.items.ids), np.nan)
            for k in self.dense.item_numeric_keys
        }
        self.unseen_logq = float(self.manifest.get("retrieval", {}).get("unseen_logq", 0.0))
        pop = _read(self.root, layout.POPULARITY, ["item_id", "logq"])
        ids = pop["item_id"].to_numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        self._logq_index, self._logq_values = _Index(ids[order]), pop["logq"].to_numpy().astype(np.float64)[order]

    def _load_users(self) -> None:
        t = _read(self.root, layout.USERS)
        t = t.take(pa.array(np.argsort(t["user_id"].to_numpy(), kind="stable")))
        self.users = _Index(t["user_id"].to_numpy().astype(np.int64))
        self.user_attr_keys = tuple(c for c in t.column_names if c.startswith("user_attr_"))
        self.user_attrs = {c: _nullable_ids(t[c]) for c in self.user_attr_keys}

    # ------------------------------------------------------------ public lookups
    @property
    def user_keys(self) -> tuple[str, ...]:
        return (USER_ID, *self.user_attr_keys)

    @property
    def candidate_keys(self) -> tuple[str, ...]:
        return (ITEM_ID, ITEM_CATEGORY, ITEM_TAG, *self.item_attr_keys)

    @property
    def user_dense_names(self) -> tuple[str, ...]:
        return self.dense.user_names()

    @property
    def candidate_dense_names(self) -> tuple[str, ...]:
        return self.dense.candidate_names()

    retrieval_dense_names: tuple[str, ...] = ("logq",)

    def ranking_spec(self, long_cap: int | None = None) -> BatchSpec:
        return BatchSpec(
            user_keys=self.user_keys, history_keys=HISTORY_KEYS, candidate_keys=self.candidate_keys,
            user_dense_dim=len(self.user_dense_names), candidate_dense_dim=len(self.candidate_dense_names),
            num_tasks=1, max_history=long_cap or self.long_cap, max_candidates_per_user=1, history_before_request=True,
        )

    def retrieval_spec(self, max_len: int | None) -> BatchSpec:
        return BatchSpec(
            user_keys=self.user_keys, history_keys=HISTORY_KEYS, candidate_keys=self.candidate_keys,
            user_dense_dim=0, candidate_dense_dim=1, num_tasks=1, max_history=max_len,
            history_before_request=False,
        )

    def timeline(self, user_id: int) -> SequenceState:
        """One user's full timeline (empty if the user has no behaviors)."""
        row, found = self.timeline_users.rows(np.array([user_id]))
        if not found[0]:
            return SequenceState.empty()
        a, b = self.timeline_offsets[row[0]], self.timeline_offsets[row[0] + 1]
        v = self.timeline_values
        return SequenceState(v["item_id"][a:b], v["ts_ms"][a:b], v["action"][a:b], v["category"][a:b])

    def items_before(self, user_ids: np.ndarray, hist_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(item values, lengths): timeline[:hist_len] of each user, e.g. the items to mask at evaluation."""
        rows, found = self.timeline_users.rows(user_ids)
        lens = np.where(found, np.asarray(hist_len, dtype=np.int64), 0)
        return self.timeline_values["item_id"][segment_indices(self.timeline_offsets[rows], lens)], lens

    def seen_items(self, user_ids: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(item values, lengths): everything each user did before its `split` target (leave-one-out):
        the train prefix for "valid", train + the valid item for "test"; the items to mask when
        ranking all items at evaluation (independent of any history cap)."""
        if split not in ("valid", "test"):
            raise ValueError(f"seen_items is for the held-out splits 'valid' and 'test', got {split!r}")
        rows, found = self.timeline_users.rows(user_ids)
        end = self.retrieval_train_len[rows] + (1 if split == "test" else 0)
        return self.items_before(user_ids, np.where(found, end, 0))

    def retrieval_train_ends(self, holdout_tail: int = 0) -> np.ndarray:
        """(U,) exclusive end of each timeline's retrieval-training prefix, less `holdout_tail` items (>= 0)."""
        return np.maximum(self.retrieval_train_len - holdout_tail, 0)

    def train_items(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(item values, lengths): each user's retrieval-train items (its leave-one-out training prefix)."""
        rows, found = self.timeline_users.rows(user_ids)
        return self.items_before(user_ids, np.where(found, self.retrieval_train_len[rows], 0))

    def logq(self, item_ids: np.ndarray) -> np.ndarray:
        """log of each item's share of retrieval-train targets (logQ correction); unseen items count once."""
        rows, found = self._logq_index.rows(item_ids)
        return np.where(found, self._logq_values[rows], self.unseen_logq)

    # ------------------------------------------------------------ batch parts
    def history(self, user_ids: np.ndarray, end: np.ndarray, cap: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """timeline[max(0, end - cap) : end] of every user -> ({history key: values}, lengths)."""
        return self._history(np.asarray(user_ids, np.int64), end, cap, "FeatureStore.history")

    def user_features(self, user_ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The user KJT's {key: (values, lengths)}: user_id plus every user attribute."""
        return self._user_kjt(np.asarray(user_ids, np.int64))

    def candidate_features(self, item_ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The candidates KJT's {key: (values, lengths)}: item_id, categories, tags, item attributes."""
        return self._candidate_kjt(np.asarray(item_ids, np.int64))[0]

    def _user_kjt(self, user_ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {USER_ID: (user_ids, np.ones(len(user_ids), dtype=np.int64))}
        rows, found = self.users.rows(user_ids)
        for k in self.user_attr_keys:
            vals, present = self.user_attrs[k]
            ok = found & present[rows]
            out[k] = (vals[rows][ok], ok.astype(np.int64))
        return out

    def _candidate_kjt(self, item_ids: np.ndarray) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
        rows, found = self.items.rows(item_ids)
        attrs = {k: (self.item_attrs[k][0][rows], found & self.item_attrs[k][1][rows]) for k in self.item_attr_keys}
        out = build_candidate_features(item_ids, self.item_categories.gather(rows, found),
                                       self.item_tags.gather(rows, found), attrs)
        return out, rows, found

    def _history(self, user_ids: np.ndarray, end: np.ndarray, cap: int | None, where: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """timeline[max(0, end - cap) : end] of every user -> ({key: values}, lengths)."""
        rows, found = self.timeline_users.rows(user_ids)
        total = np.where(found, self.timeline_offsets[rows + 1] - self.timeline_offsets[rows], 0)
        end = np.asarray(end, dtype=np.int64)
        bad = (end < 0) | (end > total)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise FeatureStoreError(
                f"{where}: user {int(user_ids[i])} has hist_len {int(end[i])} but {int(total[i])} behaviors in "
                f"{layout.TIMELINES}: the features directory is inconsistent (rebuild it)"
            )
        start = np.zeros_like(end) if cap is None else np.maximum(end - cap, 0)
        lens = end - start
        idx = segment_indices(self.timeline_offsets[rows] + start, lens)
        v = self.timeline_values
        return {HIST_ITEM_ID: v["item_id"][idx], HIST_TS: v["ts_ms"][idx], HIST_ACTION: v["action"][idx],
                HIST_CATEGORY: v["category"][idx]}, lens

    # ------------------------------------------------------------ ranking
    def _parquet(self, f: Path | str) -> pq.ParquetFile:
        return pq.ParquetFile(f) if self._fs is None else pq.ParquetFile(f, filesystem=self._fs)

    def _units(self, output: str, split: str) -> list[tuple[Path | str, int, int]]:
        d = storage.join(self.root, layout.split_dir(output, split))
        fs, path = storage.filesystem(d)
        if not fs.isdir(path):
            raise FeatureStoreError(f"{d} does not exist: no {split!r} rows in {output} (or the stage was not built)")
        units = []
        files = sorted(Path(d).glob("*.parquet")) if self._fs is None else sorted(fs.glob(f"{path}/*.parquet"))
        for f in files:
            md = self._parquet(f).metadata
            units += [(f, g, md.row_group(g).num_rows) for g in range(md.num_row_groups) if md.row_group(g).num_rows]
        return units

    def _shard(self, units: list[tuple[Path, int, int]], cfg: ReaderConfig, epoch: int, rank: int, world_size: int):
        """-> per-rank lists of (file, row group, row slice), deterministic and identical on every rank.

        The row groups, in a seeded per-epoch order, form one sequence of N rows; rank r
        reads rows [r N / W, (r + 1) N / W) of it, i.e. only the groups overlapping that range.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if cfg.shuffle:
            units = [units[i] for i in np.random.default_rng([cfg.seed, epoch]).permutation(len(units))]
        total = sum(n for _, _, n in units)
        per_rank: list[list[tuple[Path, int, slice]]] = []
        for r in range(world_size):
            lo, hi = r * total // world_size, (r + 1) * total // world_size
            mine, a = [], 0
            for f, g, n in units:
                s, e = max(a, lo), min(a + n, hi)
                if s < e:
                    mine.append((f, g, slice(s - a, e - a)))
                a += n
            per_rank.append(mine)
        return per_rank

    def _batch_limit(self, rows_per_rank: list[int], cfg: ReaderConfig, world_size: int) -> tuple[int | None, bool]:
        """(max batches, only full batches) so that every rank yields the same number."""
        if world_size > 1 or cfg.drop_last:
            return min(rows_per_rank) // cfg.batch_size, True
        return None, False

    def num_ranking_rows(self, split: str) -> int:
        return sum(n for _, _, n in self._units(layout.RANKING_SAMPLES, split))

    def ranking_batches(
        self, split: str, cfg: ReaderConfig = ReaderConfig(), *, epoch: int = 0, rank: int = 0, world_size: int = 1,
    ) -> Iterator[Batch]:
        """Ranking samples of `split` as Batches (see the module docstring), this rank's share."""
        cap = cfg.long_cap or self.long_cap
        cols = ["sample_id", "user_id", "item_id", "ts_ms", "label", "hist_len", "weight",
                *counter_columns("user", self.dense.stats), *counter_columns("item", self.dense.stats)]
        per_rank = self._shard(self._units(layout.RANKING_SAMPLES, split), cfg, epoch, rank, world_size)
        limit, full_only = self._batch_limit([sum(s.stop - s.start for _, _, s in u) for u in per_rank], cfg, world_size)
        spec = self.ranking_spec(cap)
        rng = np.random.default_rng([cfg.seed, epoch, rank, 1])

        def tables() -> Iterator[pa.Table]:
            for f, g, s in per_rank[rank]:
                t = self._parquet(f).read_row_group(g, columns=cols)
                missing = [c for c in cols if c not in t.column_names]
                if missing:
                    raise FeatureStoreError(f"{f}: columns {missing} are missing")
                yield t.slice(s.start, s.stop - s.start)

        for t in _rebatch(tables(), cfg, rng, limit, full_only):
            yield self._ranking_batch(t, cap, spec, cfg, {"split": split, "rank": str(rank), "epoch": str(epoch)})

    def _ranking_batch(self, t: pa.Table, cap: int, spec: BatchSpec, cfg: ReaderConfig, meta: dict[str, str]) -> Batch:
        col = {c: np.array(t[c].to_numpy()) for c in t.column_names if c != "sample_id"}  # writable copies
        users, items = col["user_id"].astype(np.int64), col["item_id"].astype(np.int64)
        history, lens = self._history(users, col["hist_len"], cap, f"{layout.RANKING_SAMPLES} ({meta['split']})")
        cand, rows, found = self._candidate_kjt(items)
        numeric = {k: np.where(found, v[rows], np.nan) for k, v in self.item_numeric.items()}
        b = build_batch(
            user=self._user_kjt(users),
            history=history,
            history_lengths=lens,
            candidates=cand,
            num_candidates=np.ones(len(users), dtype=np.int64),
            request_ts=col["ts_ms"],
            user_dense=self.dense.user_dense(col),
            candidate_dense=self.dense.candidate_dense(col, numeric),
            labels=col["label"].astype(np.float32)[:, None],
            weights=col["weight"].astype(np.float32),
            meta=meta,
        )
        return validate_batch(b, spec) if cfg.validate else b

    # ------------------------------------------------------------ retrieval
    def retrieval_batches(
        self, split: str, cfg: ReaderConfig = ReaderConfig(), max_len: int | None = 200, *,
        epoch: int = 0, rank: int = 0, world_size: int = 1,
    ) -> Iterator[Batch]:
        """Next-item batches of `split` (see the module docstring); `max_len` caps histories (None: uncapped,
        evaluation only)."""
        if split == "train":
            if max_len is None:
                raise ValueError("retrieval train batches need a max_len (the model's sequence length)")
            yield from self._retrieval_train(cfg, max_len, epoch, rank, world_size)
            return
        per_rank = self._shard(self._units(layout.RETRIEVAL_SAMPLES, split), cfg, epoch, rank, world_size)
        limit, full_only = self._batch_limit([sum(s.stop - s.start for _, _, s in u) for u in per_rank], cfg, world_size)
        spec = self.retrieval_spec(max_len)
        rng = np.random.default_rng([cfg.seed, epoch, rank, 2])
        cols = ["user_id", "item_id", "ts_ms", "hist_len", "logq"]

        def tables() -> Iterator[pa.Table]:
            for f, g, s in per_rank[rank]:
                yield self._parquet(f).read_row_group(g, columns=cols).slice(s.start, s.stop - s.start)

        for t in _rebatch(tables(), cfg, rng, limit, full_only):
            c = {k: np.array(t[k].to_numpy()) for k in cols}
            users, items = c["user_id"].astype(np.int64), c["item_id"].astype(np.int64)
            history, lens = self._history(users, c["hist_len"], max_len, f"{layout.RETRIEVAL_SAMPLES} ({split})")
            cand, _, _ = self._candidate_kjt(items)
            b = build_batch(
                user=self._user_kjt(users), history=history, history_lengths=lens, candidates=cand,
                num_candidates=np.ones(len(users), dtype=np.int64), request_ts=c["ts_ms"],
                candidate_dense=c["logq"].astype(np.float32)[:, None],
                labels=np.ones((len(users), 1), dtype=np.float32),
                meta={"split": split, "rank": str(rank), "epoch": str(epoch)},
            )
            yield validate_batch(b, spec) if cfg.validate else b

    def _retrieval_train(self, cfg: ReaderConfig, max_len: int, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        ends = self.retrieval_train_ends(cfg.holdout_tail)
        eligible = np.flatnonzero(ends >= 2)  # a history and a next item
        if cfg.shuffle:
            eligible = eligible[np.random.default_rng([cfg.seed, epoch]).permutation(len(eligible))]
        shares = [eligible[r::world_size] for r in range(world_size)]
        mine = shares[rank]
        limit, full_only = self._batch_limit([len(s) for s in shares], cfg, world_size)
        n_batches = -(-len(mine) // cfg.batch_size) if limit is None else limit
        spec = self.retrieval_spec(max_len)
        v = self.timeline_values
        for i in range(n_batches):
            rows = mine[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if full_only and len(rows) < cfg.batch_size:
                break
            end = ends[rows]  # (B,) exclusive end of the training prefix
            start = np.maximum(end - (max_len + 1), 0)
            n = end - start - 1  # (B,) history length == number of candidates
            base = self.timeline_offsets[rows] + start
            h_idx = segment_indices(base, n)  # items[:-1]
            c_idx = segment_indices(base + 1, n)  # items[1:]
            items = v["item_id"][c_idx]
            cand, _, _ = self._candidate_kjt(items)
            b = build_batch(
                user=self._user_kjt(self.timeline_users.ids[rows]),
                history={HIST_ITEM_ID: v["item_id"][h_idx], HIST_TS: v["ts_ms"][h_idx], HIST_ACTION: v["action"][h_idx],
                         HIST_CATEGORY: v["category"][h_idx]},
                history_lengths=n,
                candidates=cand,
                num_candidates=n,
                request_ts=v["ts_ms"][self.timeline_offsets[rows] + end - 1],
                candidate_dense=self.logq(items).astype(np.float32)[:, None],
                labels=np.ones((len(items), 1), dtype=np.float32),
                meta={"split": "train", "rank": str(rank), "epoch": str(epoch)},
            )
            yield validate_batch(b, spec) if cfg.validate else b


def _nullable_ids(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A nullable long column -> (values with 0 for NULL, present mask)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64), present


def _rebatch(tables: Iterator[pa.Table], cfg: ReaderConfig, rng: np.random.Generator, limit: int | None,
             full_only: bool) -> Iterator[pa.Table]:
    """Row groups -> tables of batch_size rows, shuffled within a buffer of >= shuffle_buffer_rows rows."""
    buf: list[pa.Table] = []
    rows = 0
    emitted = 0

    def drain(final: bool) -> Iterator[pa.Table]:
        nonlocal buf, rows, emitted
        if not buf:
            return
        t = pa.concat_tables(buf)
        if cfg.shuffle:
            t = t.take(pa.array(rng.permutation(t.num_rows)))
        n_full = t.num_rows // cfg.batch_size
        for i in range(n_full):
            if limit is not None and emitted >= limit:
                return
            yield t.slice(i * cfg.batch_size, cfg.batch_size)
            emitted += 1
        rest = t.slice(n_full * cfg.batch_size)
        buf, rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        if final and rows and not full_only and (limit is None or emitted < limit):
            yield rest
            emitted += 1
            buf, rows = [], 0

    for t in tables:
        if limit is not None and emitted >= limit:
            return
        buf.append(t)
        rows += t.num_rows
        if rows >= max(cfg.shuffle_buffer_rows, cfg.batch_size):
            yield from drain(final=False)
    yield from drain(final=True)
