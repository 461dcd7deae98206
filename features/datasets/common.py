"""Shared machinery of the dataset importers and the generator: canonical
Parquet sinks, the quarantine, checksums and the manifest.

Layout of an imported dataset directory::

    <out>/events/part-00000.parquet ...   canonical `events`
    <out>/items/part-00000.parquet        canonical `items`
    <out>/users/part-00000.parquet        canonical `users`
    <out>/quarantine/part-00000.parquet   rows that failed to parse, with the reason
    <out>/manifest.json                   schema version, row counts, time range, source checksums
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.hashing import HASH_SPEC_VERSION
from features.schema import QUARANTINE_SCHEMA, SCHEMA_VERSION, TABLE_SCHEMAS

DATASET_MANIFEST = "manifest.json"  # <out>/manifest.json of a canonical dataset directory


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TableSink:
    """Writes one canonical table as Parquet part files of at most `rows_per_file` rows."""

    def __init__(self, out_dir: Path, table: str, rows_per_file: int = 2_000_000) -> None:
        self.dir = Path(out_dir) / table
        self.table = table
        self.schema = TABLE_SCHEMAS[table]
        self.rows_per_file = rows_per_file
        self.rows = 0
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self.min_ts: int | None = None
        self.max_ts: int | None = None
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, t: pa.Table) -> None:
        if t.num_rows == 0:
            return
        t = t.select(self.schema.names).cast(self.schema)
        if "ts_ms" in t.column_names:
            mn, mx = pc.min_max(t["ts_ms"]).values()
            self.min_ts = mn.as_py() if self.min_ts is None else min(self.min_ts, mn.as_py())
            self.max_ts = mx.as_py() if self.max_ts is None else max(self.max_ts, mx.as_py())
        start = 0
        while start < t.num_rows:
            if self._writer is None:
                name = f"part-{len(self.files):05d}.parquet"
                self._writer = pq.ParquetWriter(self.dir / name, self.schema, compression="zstd")
                self.files.append(f"{self.table}/{name}")
                self._rows_in_file = 0
            take = min(t.num_rows - start, self.rows_per_file - self._rows_in_file)
            self._writer.write_table(t.slice(start, take), row_group_size=256_000)
            self._rows_in_file += take
            self.rows += take
            start += take
            if self._rows_in_file >= self.rows_per_file:
                self._writer.close()
                self._writer = None

    def close(self) -> dict[str, Any]:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self.files:  # an empty table still gets a file with the schema
            name = "part-00000.parquet"
            pq.write_table(self.schema.empty_table(), self.dir / name)
            self.files.append(f"{self.table}/{name}")
        return {"rows": self.rows, "files": self.files}


@dataclass
class Quarantine:
    """Collects rows that failed to parse/validate; nothing is dropped silently."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)

    def add(self, source: str, line: int, reason: str, detail: str, raw: str) -> None:
        self.rows.append({"source": source, "line": line, "reason": reason, "detail": detail, "raw": raw[:4096]})
        self.by_reason[reason] += 1

    def __len__(self) -> int:
        return len(self.rows)

    def write(self, out_dir: Path) -> dict[str, Any]:
        sink = TableSink(out_dir, "quarantine")
        if self.rows:
            sink.write(pa.Table.from_pylist(self.rows, schema=QUARANTINE_SCHEMA))
        info = sink.close()
        info["by_reason"] = dict(sorted(self.by_reason.items()))
        return info


def prepare_out_dir(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        for sub in ("events", "items", "users", "quarantine"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / DATASET_MANIFEST).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_manifest(
    out: Path,
    *,
    dataset: str,
    tables: dict[str, dict[str, Any]],
    sources: Iterable[Path],
    time_range: tuple[int | None, int | None],
    timestamps: str,
    stats: dict[str, Any],
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes <out>/manifest.json and returns it."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "hash_spec_version": HASH_SPEC_VERSION,
        "dataset": dataset,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tables": tables,
        "time_range": {
            "min_ts_ms": time_range[0],
            "max_ts_ms": time_range[1],
            "min_utc": _utc(time_range[0]),
            "max_utc": _utc(time_range[1]),
        },
        "timestamps": timestamps,
        "stats": stats,
        "params": params or {},
        "sources": [
            {"path": str(p), "bytes": Path(p).stat().st_size, "sha256": sha256_file(Path(p))} for p in sources
        ],
    }
    (Path(out) / DATASET_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _utc(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(path: Path) -> dict[str, Any]:
    p = Path(path)
    p = p / DATASET_MANIFEST if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"no {DATASET_MANIFEST} in {p.parent}: is this a canonical dataset directory?")
    return json.loads(p.read_text())


def events_table(
    event_id: list[str],
    user_id: np.ndarray,
    item_id: np.ndarray,
    ts_ms: np.ndarray,
    event_type: list[str] | np.ndarray,
    label: np.ndarray,
    value: np.ndarray,
    context: list | None = None,
) -> pa.Table:
    """Column arrays -> canonical events table (value NaN -> null)."""
    value = np.asarray(value, dtype=np.float32)
    n = len(event_id)
    return pa.Table.from_arrays(
        [
            pa.array(event_id, pa.string()),
            pa.array(np.asarray(user_id, dtype=np.int64)),
            pa.array(np.asarray(item_id, dtype=np.int64)),
            pa.array(np.asarray(ts_ms, dtype=np.int64)),
            pa.array(event_type, pa.string()),
            pa.array(np.asarray(label, dtype=np.float32)),
            pa.array(value, mask=np.isnan(value)),
            pa.array(context if context is not None else [None] * n, TABLE_SCHEMAS["events"].field("context").type),
        ],
        schema=TABLE_SCHEMAS["events"],
    )


def read_table(dataset_dir: Path, table: str, columns: list[str] | None = None) -> pa.Table:
    """Reads one canonical table of a dataset directory (all part files)."""
    d = Path(dataset_dir) / table
    if not d.exists():
        raise FileNotFoundError(f"{d} does not exist: is {dataset_dir} a canonical dataset directory?")
    return pq.read_table(d, columns=columns, schema=TABLE_SCHEMAS[table])
