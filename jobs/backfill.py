"""`cascade pipeline backfill`: rebuild the online state of the users active in a date range.

    cascade pipeline backfill --dataset data/ml-1m --start 2026-11-01 --end 2026-11-22 [--bundle DIR] \\
        [--artifacts var/artifacts] [--redis redis://127.0.0.1:6379/0]

After a schema change (sequence layout, hashing) or a model change (SDIM
hyperplanes) the users' Redis records — sequences, counters, SDIM signatures —
are recomputed from the canonical events with the *current* code and the given
bundle (default: the one the pipeline published under ``--artifacts``), through
the same `serving.bootstrap` fold the server uses. Users without events in the
range keep their records. The command belongs to the pipeline group, whose
published pointer it reads; the job is this module (`backfill`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class BackfillSummary:
    users: int
    events: int
    signatures: bool
    as_of_ms: int
    seconds: float


def day_ms(day: str, where: str) -> int:
    """Midnight UTC of `day` (YYYY-MM-DD) in ms; a ValueError names the flag `where` it came from."""
    try:
        d = dt.date.fromisoformat(day)
    except ValueError:
        raise ValueError(f"{where}: {day!r} is not a date (YYYY-MM-DD)") from None
    return int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp() * 1000)


def backfill(dataset: Path, bundle_dir: Path | None, redis_url: str, start: str, end: str,
             serving_overrides: tuple[str, ...] = (), say: Callable[[str], None] = print) -> BackfillSummary:
    """Rebuilds the online state of every user with events in [start, end) as of `end` (module docstring)."""
    import numpy as np
    import pyarrow.compute as pc

    from features.datasets.common import read_table
    from serving.app import load_serving_config
    from serving.bootstrap import build_records
    from serving.catalog import load_catalog
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import MANIFEST, ModelHolder, sha256_file
    from serving.runtime import CatalogRef
    from serving.state.redis_store import RedisOnlineStore

    t0 = time.perf_counter()
    lo, hi = day_ms(start, "--start"), day_ms(end, "--end")
    if hi <= lo:
        raise ValueError(f"--end {end} must be after --start {start}")
    cfg = load_serving_config(None, [f"redis.url={redis_url}", *serving_overrides])
    catalog = load_catalog(dataset)
    bundle = None
    if bundle_dir is not None:
        version = json.loads((bundle_dir / MANIFEST).read_text())["version"]
        bundle = ModelManager(ModelHolder(), CatalogRef(catalog), cfg.state, cfg.models, ServingMetrics()).load(
            bundle_dir, version, sha256_file(bundle_dir / MANIFEST))
    ev = read_table(dataset, "events", ["user_id", "ts_ms"])
    ts = ev.column("ts_ms")
    in_range = pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi))
    users = np.unique(ev.column("user_id").filter(in_range).to_numpy())
    say(f"backfill     {len(users):,} users with events in [{start}, {end}) -> {redis_url} "
        f"({'with SDIM signatures of ' + bundle.version if bundle is not None and bundle.sig_spec else 'no signatures'})")
    if len(users) == 0:
        return BackfillSummary(0, 0, False, hi, time.perf_counter() - t0)
    records, _, _, s = build_records(dataset, cfg.state, catalog, hi, bundle, user_ids=users)
    store = RedisOnlineStore(cfg.redis)
    try:
        store.put_users(records)
    finally:
        store.close()
    return BackfillSummary(len(records), int(s["events"]), bool(bundle is not None and bundle.sig_spec), hi,
                           time.perf_counter() - t0)


def register(psub: argparse._SubParsersAction) -> None:
    """Adds `backfill` to the pipeline group's subcommands (`cascade pipeline backfill`)."""
    b = psub.add_parser("backfill", help="rebuild users' online state (sequences, SDIM signatures) for a date range")
    b.add_argument("--dataset", type=Path, required=True, help="canonical dataset directory (events/)")
    b.add_argument("--start", required=True, help="first day (YYYY-MM-DD, UTC)")
    b.add_argument("--end", required=True, help="day after the last (YYYY-MM-DD, UTC)")
    b.add_argument("--bundle", type=Path, default=None,
                   help="model bundle for SDIM signatures (default: the published one under --artifacts)")
    b.add_argument("--artifacts", type=Path, default=Path("var/artifacts"))
    b.add_argument("--redis", default=os.environ.get("CASCADE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.pipeline import read_published

    bundle = args.bundle
    if bundle is None:
        pub = read_published(args.artifacts)
        bundle = Path(pub["bundle"]) if pub else None
    s = backfill(args.dataset, bundle, args.redis, args.start, args.end)
    print(f"backfill     {s.users:,} users rebuilt from {s.events:,} events as of {s.as_of_ms} "
          f"(signatures {'recomputed' if s.signatures else 'not stored'}) in {s.seconds:.1f}s")
    return 0
