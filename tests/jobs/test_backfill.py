"""`cascade pipeline backfill` (jobs/backfill.py): the users with events in the range get their online record
rebuilt as of the range's end, through the server's own fold; everyone else is left alone. Real redis-server,
ML-100K."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow.compute as pc
import pytest

pytestmark = pytest.mark.integration


def _ms(day: str) -> int:
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc).timestamp() * 1000)


def test_backfill_rebuilds_only_the_users_active_in_the_range(ml100k_dataset, redis_server):
    from features.datasets.common import read_table
    from jobs.backfill import backfill
    from serving.app import load_serving_config
    from serving.state.redis_store import RedisOnlineStore

    s = backfill(ml100k_dataset, None, redis_server.address, "1998-03-01", "1998-03-08", say=lambda m: None)
    ev = read_table(ml100k_dataset, "events", ["user_id", "ts_ms"])
    ts = ev.column("ts_ms")
    mask = pc.and_(pc.greater_equal(ts, _ms("1998-03-01")), pc.less(ts, _ms("1998-03-08")))
    active = np.unique(ev.column("user_id").filter(mask).to_numpy())
    assert s.users == len(active) > 0 and s.as_of_ms == _ms("1998-03-08")

    store = RedisOnlineStore(load_serving_config(None, [f"redis.url={redis_server.address}"], env={}).redis)
    try:
        u = int(active[0])
        rec = store.read_user(u)
        mine = ev.filter(pc.and_(pc.equal(ev.column("user_id"), u), pc.less(ts, _ms("1998-03-08"))))
        assert rec is not None and len(rec.seq.item_ids) == mine.num_rows  # ML-100K histories fit the cap
        assert int(rec.seq.ts_ms.max()) < _ms("1998-03-08")
        inactive = sorted(set(range(1, 944)) - set(active.tolist()))[0]
        assert store.read_user(inactive) is None
    finally:
        store.close()


def test_an_empty_or_reversed_range_is_a_clear_error(ml100k_dataset, redis_server):
    from jobs.backfill import backfill

    with pytest.raises(ValueError, match="--end 1998-03-01 must be after --start 1998-03-08"):
        backfill(ml100k_dataset, None, redis_server.address, "1998-03-08", "1998-03-01")
    with pytest.raises(ValueError, match=r"--start: '1998-13-01' is not a date"):
        backfill(ml100k_dataset, None, redis_server.address, "1998-13-01", "1998-03-01")
