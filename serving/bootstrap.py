"""Bulk-load the online state from a canonical dataset (events + users), as of a time.

What it writes equals what the `events` consumer would hold after applying
every event before `as_of_ms` (a test checks user by user): each user's
record is the consumer's transition (`serving.state.update.EventArrays`, then
`apply_user_batch`) applied to the user's events in (ts_ms, event_id) order:

* sequence: the last `long_cap` behaviors by (ts_ms, event_id) (= folding
  `features.sequence.append_event`, the Spark path's `sort_array` + `slice`);
* counter logs: the user's counted events within the retention of its newest
  one, totals over all of them; items the same, with the retention relative to
  the newest event of the dataset (the consumers' pruning cutoff) and older
  events folded into summary records;
* popularity: behaviors per item; attributes: ``user_attr_<key>`` hashed ids
  (`features.layout`);
* SDIM signatures of the sequences when a model with SDIM is given.

Duplicate event ids keep their first occurrence in input order (as Spark and
the consumers do).

With ``marks=True`` every loaded event's id is also marked applied (the
consumers' dedupe marks), so an event of the dataset that the events topic
delivers again is a no-op. The first bootstrap of an empty store sets its
state epoch (`serving.rebuild`), which tells the server the state exists.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.datasets.common import read_table
from features.hashing import hash_string
from features.layout import user_attr_feature
from features.sequence import SequenceState
from serving.catalog import ItemCatalog
from serving.config import StateConfig
from serving.models import ModelBundle
from serving.state.base import OnlineStore
from serving.state.codec import CounterLog, UserAttrs, UserRecord, encode_item_log, summary_records
from serving.state.update import EventArrays, apply_user_batch, with_bucket_sums

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapSummary:
    events: int
    duplicates: int
    users: int
    items_with_counters: int
    behaviors_kept: int
    as_of_ms: int
    seconds: float


def _user_attrs(dataset: Path) -> dict[int, UserAttrs]:
    try:
        t = read_table(dataset, "users")
    except FileNotFoundError:
        return {}
    out = {}
    for row in t.to_pylist():
        attrs = dict(row.get("attributes") or ())
        sparse = {user_attr_feature(k): (hash_string(v, user_attr_feature(k)),) for k, v in sorted(attrs.items())}
        out[int(row["user_id"])] = UserAttrs(sparse, {k: float(v) for k, v in dict(row.get("numeric") or ()).items()})
    return out


def build_records(dataset: Path, state: StateConfig, catalog: ItemCatalog, as_of_ms: int | None = None,
                  bundle: ModelBundle | None = None, user_ids: np.ndarray | None = None):
    """-> (records {user: UserRecord}, item logs {item: bytes}, popularity {item: behaviors}, summary fields)."""
    t = read_table(Path(dataset), "events", ["event_id", "user_id", "item_id", "ts_ms", "event_type", "label"])
    n_in = t.num_rows
    dup = t.column("event_id").to_pandas().duplicated().to_numpy()
    if dup.any():
        t = t.filter(~dup)
    if as_of_ms is not None:
        t = t.filter(pc.less(t.column("ts_ms"), as_of_ms))
    if user_ids is not None:
        t = t.filter(pc.is_in(t.column("user_id"), value_set=pa.array(np.asarray(user_ids, np.int64))))
    t = t.take(pc.sort_indices(t, sort_keys=[("user_id", "ascending"), ("ts_ms", "ascending"), ("event_id", "ascending")]))
    user = t.column("user_id").to_numpy()
    item = t.column("item_id").to_numpy()
    ts = t.column("ts_ms").to_numpy()
    et = t.column("event_type").to_numpy(zero_copy_only=False)
    label = t.column("label").to_numpy()
    if as_of_ms is None:
        as_of_ms = int(ts.max()) + 1 if len(ts) else int(time.time() * 1000)
    arrays = EventArrays.of_columns(item, ts, et, label, catalog.primary_categories,
                                    state.sequence.behavior_event_types, state.stats.counted_event_types())
    beh, cnt, pos = arrays.beh, arrays.cnt, arrays.pos
    retention = state.retention_ms()
    attrs = _user_attrs(dataset)
    sig_spec = bundle.sig_spec if bundle is not None else 0
    signatures = bundle.signatures if sig_spec else None

    uniq, starts = np.unique(user, return_index=True)
    records: dict[int, UserRecord] = {}
    kept = 0
    # each user's events are contiguous and in order: the consumer's transition from an empty record (the
    # counter-log retention counted back from the user's newest event: every event is before as_of_ms)
    for u, ub in zip(uniq.tolist(), arrays.spans([*starts.tolist(), len(user)])):
        rec = UserRecord(SequenceState.empty(), CounterLog.empty(), attrs.get(u, UserAttrs()))
        records[u] = apply_user_batch(rec, ub, state.sequence, retention, sig_spec, signatures, now_ms=as_of_ms)
        kept += len(records[u].seq)
    if bundle is not None and bundle.sums_window:  # SDIM bucket sums beside the sequences, many users per call
        records = with_bucket_sums(records, bundle)
    wanted = None if user_ids is None else set(np.asarray(user_ids).tolist())
    for u, a in attrs.items():  # users with attributes but no events: attributes only
        if (wanted is None or u in wanted) and u not in records:
            records[u] = UserRecord(SequenceState.empty(), CounterLog.empty(), a)

    # items: counter logs within the retention of the newest event, totals, popularity
    ci = np.flatnonzero(cnt)
    cutoff = (int(ts.max()) - retention) if len(ts) else 0
    order = ci[np.argsort(item[ci], kind="stable")]
    logs = {}
    if len(order):
        iu, istart = np.unique(item[order], return_index=True)
        iend = np.r_[istart[1:], len(order)]
        for i, s, e in zip(iu.tolist(), istart.tolist(), iend.tolist()):
            rows = order[s:e]
            rows = rows[np.argsort(ts[rows], kind="stable")]
            old = ts[rows] < cutoff
            w = rows[~old]
            logs[i] = summary_records(int(old.sum()), int(pos[rows[old]].sum())) + encode_item_log(ts[w], pos[w])
    bi, bc = np.unique(item[beh], return_counts=True)
    popularity = dict(zip(bi.tolist(), bc.astype(float).tolist()))
    summary = dict(events=int(len(user)), duplicates=int(dup.sum()), input_rows=n_in, behaviors_kept=kept,
                   as_of_ms=int(as_of_ms), event_ids=t.column("event_id"), user_ids=user)
    return records, logs, popularity, summary


def bootstrap_dataset(store: OnlineStore, dataset: Path, state: StateConfig, catalog: ItemCatalog,
                      as_of_ms: int | None = None, bundle: ModelBundle | None = None,
                      progress: Callable[[str], None] | None = None, marks: bool = False,
                      set_epoch: bool = True) -> BootstrapSummary:
    """Loads the state of every user and item of `dataset` (events before `as_of_ms`) into `store`
    (`marks`: and marks those events applied)."""
    t0 = time.perf_counter()
    say = progress or (lambda s: log.info("%s", s))
    say(f"bootstrap: reading {dataset}")
    records, logs, pop, s = build_records(Path(dataset), state, catalog, as_of_ms, bundle)
    say(f"bootstrap: writing {len(records):,} users, {len(logs):,} items' counters")
    store.put_users(records)
    store.put_item_logs(logs)
    store.add_popularity(pop)
    if marks:
        say(f"bootstrap: marking {s['events']:,} events applied")
        store.put_marks(s["user_ids"].tolist(), s["event_ids"].to_pylist())
    summary = BootstrapSummary(events=s["events"], duplicates=s["duplicates"], users=len(records),
                               items_with_counters=len(logs), behaviors_kept=s["behaviors_kept"], as_of_ms=s["as_of_ms"],
                               seconds=time.perf_counter() - t0)
    store.set_meta({"source": str(dataset), "as_of_ms": str(summary.as_of_ms), "events": str(summary.events),
                    "users": str(summary.users), "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if not set_epoch:  # the caller (a rebuild) installs its own epoch
        return summary
    try:  # an empty store now holds a state: give it an epoch (positions stay the consumers' committed ones)
        store.create_epoch(new_epoch_id(), {"epoch_rewind": "none"}, replace=False)
    except NotImplementedError:
        pass
    return summary


def new_epoch_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:12]}"
