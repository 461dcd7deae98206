"""Amazon reviews in the S3-Rec/ICLRec sequence format (e.g. ``Beauty.txt``).

One line per user: ``user_id item_id item_id ...``, chronological (5-core,
sorted by review time), ids remapped to 1..N. There are no ratings and no
timestamps: every event is an ``interaction`` (implicit positive, label 1.0)
with an *ordinal* timestamp (position x 1000 ms); the last item is the
leave-one-out test item. Items and users carry ids only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from features.datasets.common import Quarantine, prepare_out_dir
from features.datasets.movielens import ORDINAL_STEP_MS, ImportResult, _event_ids, _finish, parse_sequence_file
from features.datasets.common import events_table
from features.schema import ITEMS_SCHEMA, USERS_SCHEMA


def import_sequence_file(path: Path, out: Path, *, dataset: str | None = None, overwrite: bool = False) -> ImportResult:
    """Imports a ``user item item ...`` file (Amazon/ICLRec format) into canonical Parquet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequence file {path} does not exist")
    dataset = dataset or path.stem.lower()
    out = prepare_out_dir(out, overwrite)
    q = Quarantine()
    df = parse_sequence_file(path, q)
    users = df["user_id"].to_numpy()
    items = df["item_id"].to_numpy()
    pos = df["pos"].to_numpy()
    n = len(df)
    events = events_table(
        _event_ids(dataset, users, pos),
        users,
        items,
        pos * ORDINAL_STEP_MS,
        ["interaction"] * n,
        np.ones(n, dtype=np.float32),
        np.full(n, np.nan, dtype=np.float32),
    )
    item_tbl = pa.table({"item_id": np.unique(items)}).cast(pa.schema([ITEMS_SCHEMA.field("item_id")]))
    item_tbl = pa.Table.from_pydict(
        {"item_id": item_tbl["item_id"], **{f.name: pa.nulls(item_tbl.num_rows, f.type) for f in ITEMS_SCHEMA if f.name != "item_id"}},
        schema=ITEMS_SCHEMA,
    )
    uids = np.unique(users)
    user_tbl = pa.Table.from_pydict(
        {"user_id": uids, **{f.name: pa.nulls(len(uids), f.type) for f in USERS_SCHEMA if f.name != "user_id"}},
        schema=USERS_SCHEMA,
    )
    return _finish(dataset, out, events, item_tbl, user_tbl, q, [path], "ordinal (position x 1000 ms)", {})
