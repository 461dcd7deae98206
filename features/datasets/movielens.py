"""MovieLens importers: ML-1M (`::` files + the per-user sequence file) and ML-100K (tab files).

ML-1M sources (any subset; see ../shared/data/README.md):

* ``ml-1m.seq.txt``: ``UserID MovieID MovieID ...`` per user, chronological, all
  1,000,209 interactions; last item = leave-one-out test item. When present it
  defines the interaction set and the order.
* ``ratings.dat`` / ``ratings*.dat.gz``: ``UserID::MovieID::Rating::Timestamp``.
  Where a sequence event has a rating it becomes a ``rating`` event with the
  real timestamp, ``value`` = rating and ``label`` = rating >= threshold;
  sequence events without one (users 3000+ in the shared copy) are
  ``interaction`` events (implicit positives) with *ordinal* timestamps
  (position x 1000 ms) and the manifest says so.
* ``movies.dat`` (``MovieID::Title::Genres``) and ``users.dat``
  (``UserID::Gender::Age::Occupation::Zip-code``), latin-1.

Event ids are ``<dataset>/<user>/<position>`` with a zero-padded position, so
ordering a user's events by ``(ts_ms, event_id)`` reproduces the source order
even where timestamps tie (the leave-one-out protocol depends on it).
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from features.datasets.common import (
    Quarantine,
    TableSink,
    events_table,
    prepare_out_dir,
    write_manifest,
)
from features.schema import ITEMS_SCHEMA, USERS_SCHEMA

ORDINAL_STEP_MS = 1000


@dataclass(frozen=True)
class MovieLensConfig:
    positive_threshold: float = 4.0  # rating >= threshold -> label 1.0
    min_rating: float = 0.5
    max_rating: float = 5.0


@dataclass
class ImportResult:
    out: Path
    manifest: dict
    quarantined: int


def _lines(path: Path, encoding: str = "latin-1") -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding, newline="") as f:
        for i, line in enumerate(f, start=1):
            yield i, line.rstrip("\r\n")


def _int(tok: str) -> int:
    tok = tok.strip()
    if not re.fullmatch(r"[+-]?\d+", tok):
        raise ValueError(tok)
    return int(tok)


def _parse_ratings(path: Path, sep: str, q: Quarantine, cfg: MovieLensConfig) -> pd.DataFrame:
    users, items, ratings, ts = [], [], [], []
    seen: set[tuple[int, int]] = set()
    src = path.name
    for ln, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) != 4:
            q.add(src, ln, "field_count", f"expected 4 fields separated by {sep!r}, got {len(parts)}", line)
            continue
        try:
            u, m, t = _int(parts[0]), _int(parts[1]), _int(parts[3])
        except ValueError as e:
            q.add(src, ln, "not_integer", f"user, item and timestamp must be integers; bad token {e}", line)
            continue
        try:
            r = float(parts[2])
        except ValueError:
            q.add(src, ln, "bad_rating", f"rating {parts[2]!r} is not a number", line)
            continue
        if not cfg.min_rating <= r <= cfg.max_rating:
            q.add(src, ln, "rating_out_of_range", f"rating {r} outside [{cfg.min_rating}, {cfg.max_rating}]", line)
            continue
        if t < 0 or t > 4_102_444_800:  # 2100-01-01
            q.add(src, ln, "bad_timestamp", f"timestamp {t} is not a plausible Unix time in seconds", line)
            continue
        if u < 0 or m < 0:
            q.add(src, ln, "negative_id", "user and item ids must be non-negative", line)
            continue
        if (u, m) in seen:
            q.add(src, ln, "duplicate_rating", f"user {u} already rated item {m}", line)
            continue
        seen.add((u, m))
        users.append(u)
        items.append(m)
        ratings.append(r)
        ts.append(t)
    return pd.DataFrame(
        {
            "user_id": np.array(users, dtype=np.int64),
            "item_id": np.array(items, dtype=np.int64),
            "rating": np.array(ratings, dtype=np.float32),
            "ts_s": np.array(ts, dtype=np.int64),
        }
    )


def parse_sequence_file(path: Path, q: Quarantine) -> pd.DataFrame:
    """``user item item ...`` per line -> (user_id, item_id, pos) rows in file order."""
    users, items, pos = [], [], []
    seen_users: set[int] = set()
    src = path.name
    for ln, line in _lines(path, encoding="utf-8"):
        if not line.strip():
            continue
        toks = line.split()
        try:
            vals = [_int(t) for t in toks]
        except ValueError as e:
            q.add(src, ln, "not_integer", f"user and item ids must be integers; bad token {e}", line)
            continue
        if len(vals) < 2:
            q.add(src, ln, "empty_sequence", "a line needs a user id and at least one item id", line)
            continue
        u, seq = vals[0], vals[1:]
        if u < 0 or min(seq) < 0:
            q.add(src, ln, "negative_id", "user and item ids must be non-negative", line)
            continue
        if u in seen_users:
            q.add(src, ln, "duplicate_user", f"user {u} already had a sequence line", line)
            continue
        seen_users.add(u)
        users.append(np.full(len(seq), u, dtype=np.int64))
        items.append(np.asarray(seq, dtype=np.int64))
        pos.append(np.arange(len(seq), dtype=np.int64))
    if not users:
        return pd.DataFrame({"user_id": [], "item_id": [], "pos": []}, dtype=np.int64)
    return pd.DataFrame({"user_id": np.concatenate(users), "item_id": np.concatenate(items), "pos": np.concatenate(pos)})


def _event_ids(dataset: str, users: np.ndarray, pos: np.ndarray) -> list[str]:
    return [f"{dataset}/{u}/{p:06d}" for u, p in zip(users.tolist(), pos.tolist())]


def _events_from(dataset: str, df: pd.DataFrame, cfg: MovieLensConfig) -> pa.Table:
    """df columns: user_id, item_id, pos, rating (NaN if none), ts_s (-1 if none)."""
    rated = df["rating"].notna().to_numpy()
    ts_ms = np.where(rated, df["ts_s"].to_numpy() * 1000, df["pos"].to_numpy() * ORDINAL_STEP_MS)
    rating = df["rating"].to_numpy(dtype=np.float32)
    label = np.where(rated, (rating >= cfg.positive_threshold).astype(np.float32), np.float32(1.0))
    etype = np.where(rated, "rating", "interaction")
    return events_table(
        _event_ids(dataset, df["user_id"].to_numpy(), df["pos"].to_numpy()),
        df["user_id"].to_numpy(),
        df["item_id"].to_numpy(),
        ts_ms,
        etype.tolist(),
        label,
        rating,
    )


def _ml1m_items(path: Path, q: Quarantine) -> pa.Table:
    rows = []
    for ln, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3:
            q.add(path.name, ln, "field_count", f"expected MovieID::Title::Genres, got {len(parts)} fields", line)
            continue
        try:
            mid = _int(parts[0])
        except ValueError as e:
            q.add(path.name, ln, "not_integer", f"MovieID must be an integer; bad token {e}", line)
            continue
        rows.append(_movie_row(mid, parts[1], [g for g in parts[2].split("|") if g]))
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)


def _movie_row(mid: int, title: str, genres: list[str], extra: dict[str, str] | None = None) -> dict:
    m = re.search(r"\((\d{4})\)\s*$", title)
    attrs = dict(extra or {})
    numeric = {}
    if m:
        attrs["year"] = m.group(1)
        numeric["year"] = float(m.group(1))
    return {
        "item_id": mid,
        "title": title,
        "categories": genres,
        "tags": [],
        "attributes": list(attrs.items()),
        "numeric": list(numeric.items()),
    }


def _ml1m_users(path: Path, q: Quarantine) -> pa.Table:
    rows = []
    for ln, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 5:
            q.add(path.name, ln, "field_count", f"expected UserID::Gender::Age::Occupation::Zip, got {len(parts)} fields", line)
            continue
        try:
            uid, age = _int(parts[0]), _int(parts[2])
        except ValueError as e:
            q.add(path.name, ln, "not_integer", f"UserID and Age must be integers; bad token {e}", line)
            continue
        attrs = {"gender": parts[1], "age": str(age), "occupation": parts[3], "zip3": parts[4][:3]}
        rows.append({"user_id": uid, "attributes": list(attrs.items()), "numeric": [("age", float(age))]})
    return pa.Table.from_pylist(rows, schema=USERS_SCHEMA)


def _finish(
    dataset: str,
    out: Path,
    events: pa.Table,
    items: pa.Table | None,
    users: pa.Table | None,
    q: Quarantine,
    sources: list[Path],
    timestamps: str,
    params: dict,
) -> ImportResult:
    tables = {}
    ev = TableSink(out, "events")
    ev.write(events)
    tables["events"] = ev.close()
    for name, t in (("items", items), ("users", users)):
        sink = TableSink(out, name)
        if t is not None:
            sink.write(t)
        tables[name] = sink.close()
    tables["quarantine"] = q.write(out)
    stats = {
        "events": events.num_rows,
        "users": len(np.unique(events["user_id"].to_numpy())),
        "items": len(np.unique(events["item_id"].to_numpy())),
        "event_types": {
            str(k): int(v)
            for k, v in zip(*np.unique(events["event_type"].to_numpy(zero_copy_only=False), return_counts=True))
        },
        "positives": int(np.sum(events["label"].to_numpy() > 0.5)),
    }
    manifest = write_manifest(
        out,
        dataset=dataset,
        tables=tables,
        sources=sources,
        time_range=(ev.min_ts, ev.max_ts),
        timestamps=timestamps,
        stats=stats,
        params=params,
    )
    return ImportResult(out=out, manifest=manifest, quarantined=len(q))


def _find_ratings(data_dir: Path) -> Path | None:
    for name in ("ratings.dat", "ratings.dat.gz"):
        if (data_dir / name).exists():
            return data_dir / name
    found = sorted(data_dir.glob("ratings*.dat.gz")) + sorted(data_dir.glob("ratings*.dat"))
    return found[0] if found else None


def import_ml1m(
    data_dir: Path, out: Path, cfg: MovieLensConfig = MovieLensConfig(), *, overwrite: bool = False,
    dataset: str = "ml-1m",
) -> ImportResult:
    """Imports ML-1M from `data_dir` (see the module docstring) into canonical Parquet at `out`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"ML-1M directory {data_dir} does not exist")
    seq_path = data_dir / "ml-1m.seq.txt"
    ratings_path = _find_ratings(data_dir)
    if not seq_path.exists() and ratings_path is None:
        raise FileNotFoundError(f"{data_dir} has neither ml-1m.seq.txt nor a ratings*.dat[.gz] file")
    out = prepare_out_dir(out, overwrite)
    q = Quarantine()
    sources: list[Path] = []
    ratings = None
    if ratings_path is not None:
        ratings = _parse_ratings(ratings_path, "::", q, cfg)
        sources.append(ratings_path)
    if seq_path.exists():
        seq = parse_sequence_file(seq_path, q)
        sources.append(seq_path)
        if ratings is not None:
            df = seq.merge(ratings, on=["user_id", "item_id"], how="left", validate="many_to_one")
            extra = ratings.merge(seq[["user_id", "item_id"]], on=["user_id", "item_id"], how="left", indicator=True)
            for row in extra[extra["_merge"] == "left_only"].itertuples():
                q.add(
                    ratings_path.name, 0, "not_in_sequence_file",
                    f"user {row.user_id} rated item {row.item_id} but the sequence file has no such interaction",
                    f"{row.user_id}::{row.item_id}::{row.rating:g}::{row.ts_s}",
                )
        else:
            df = seq.assign(rating=np.float32(np.nan), ts_s=np.int64(-1))
        timestamps = "real" if ratings is not None and df["rating"].notna().all() else (
            "mixed: real for rating events, ordinal (position x 1000 ms) for interaction events"
            if ratings is not None else "ordinal (position x 1000 ms)"
        )
    else:
        assert ratings is not None
        df = ratings.sort_values(["user_id", "ts_s", "item_id"], kind="stable").reset_index(drop=True)
        df["pos"] = df.groupby("user_id").cumcount().astype(np.int64)
        timestamps = "real"
    events = _events_from(dataset, df, cfg)
    items = users = None
    if (data_dir / "movies.dat").exists():
        items = _ml1m_items(data_dir / "movies.dat", q)
        sources.append(data_dir / "movies.dat")
    if (data_dir / "users.dat").exists():
        users = _ml1m_users(data_dir / "users.dat", q)
        sources.append(data_dir / "users.dat")
    return _finish(dataset, out, events, items, users, q, sources, timestamps, {"positive_threshold": cfg.positive_threshold})


def import_ml100k(
    data_dir: Path, out: Path, cfg: MovieLensConfig = MovieLensConfig(), *, overwrite: bool = False,
    dataset: str = "ml-100k",
) -> ImportResult:
    """Imports ML-100K (u.data, u.item, u.genre, u.user) into canonical Parquet at `out`."""
    data_dir = Path(data_dir)
    udata = data_dir / "u.data"
    if not udata.exists():
        raise FileNotFoundError(f"{udata} does not exist (expected the ML-100K u.data file)")
    out = prepare_out_dir(out, overwrite)
    q = Quarantine()
    sources = [udata]
    ratings = _parse_ratings(udata, "\t", q, cfg)
    df = ratings.sort_values(["user_id", "ts_s", "item_id"], kind="stable").reset_index(drop=True)
    df["pos"] = df.groupby("user_id").cumcount().astype(np.int64)
    events = _events_from(dataset, df, cfg)

    genres: list[str] = []
    if (data_dir / "u.genre").exists():
        sources.append(data_dir / "u.genre")
        pairs = []
        for ln, line in _lines(data_dir / "u.genre"):
            if not line.strip():
                continue
            name, _, idx = line.rpartition("|")
            try:
                pairs.append((_int(idx), name))
            except ValueError as e:
                q.add("u.genre", ln, "not_integer", f"genre index must be an integer; bad token {e}", line)
        genres = [n for _, n in sorted(pairs)]
    items = None
    if (data_dir / "u.item").exists():
        sources.append(data_dir / "u.item")
        rows = []
        for ln, line in _lines(data_dir / "u.item"):
            if not line.strip():
                continue
            parts = line.split("|")
            if len(parts) != 5 + len(genres) and genres:
                q.add("u.item", ln, "field_count", f"expected {5 + len(genres)} fields, got {len(parts)}", line)
                continue
            try:
                mid = _int(parts[0])
            except ValueError as e:
                q.add("u.item", ln, "not_integer", f"movie id must be an integer; bad token {e}", line)
                continue
            flags = parts[5:]
            g = [genres[i] for i, f in enumerate(flags) if f.strip() == "1" and i < len(genres)]
            extra = {"release_date": parts[2]} if parts[2] else {}
            rows.append(_movie_row(mid, parts[1], g, extra))
        items = pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)
    users = None
    if (data_dir / "u.user").exists():
        sources.append(data_dir / "u.user")
        rows = []
        for ln, line in _lines(data_dir / "u.user"):
            if not line.strip():
                continue
            parts = line.split("|")
            if len(parts) != 5:
                q.add("u.user", ln, "field_count", f"expected id|age|gender|occupation|zip, got {len(parts)} fields", line)
                continue
            try:
                uid, age = _int(parts[0]), _int(parts[1])
            except ValueError as e:
                q.add("u.user", ln, "not_integer", f"id and age must be integers; bad token {e}", line)
                continue
            attrs = {"gender": parts[2], "age": str(age), "occupation": parts[3], "zip3": parts[4][:3]}
            rows.append({"user_id": uid, "attributes": list(attrs.items()), "numeric": [("age", float(age))]})
        users = pa.Table.from_pylist(rows, schema=USERS_SCHEMA)
    return _finish(dataset, out, events, items, users, q, sources, "real", {"positive_threshold": cfg.positive_threshold})
