"""Windowed counters at request time from counter logs (the online side of `features.transforms`).

Spark computes, per sample, the counted events of the user/item in
``[t - w, t)`` (``all``: everything before t). Online, each entity keeps a log
of its counted events within the retention plus totals ever; at time t:

    cnt_w(t)   = #{log events with t - w <= ts < t}
    cnt_all(t) = total_cnt - #{log events with ts >= t}

(the same for pos). Exact for any t within the retention counted back from
min(newest event, wall clock) (`serving.state.update.prune_cutoff`), which is
always the case for "now": no event's timestamp, however far ahead, prunes
what a request at the current time counts. The result is the counters mapping that
`features.transforms.DenseLayout` turns into dense features, so the transform
itself is shared, not re-implemented.
"""
from __future__ import annotations

import numpy as np

from features.transforms import StatsConfig, cnt_column, in_window, pos_column


def window_counters(
    entity: str,
    cfg: StatsConfig,
    t_ms: int,
    ts: np.ndarray,  # (M,) int64 log timestamps of all entities
    pos: np.ndarray,  # (M,) 0/1
    owner: np.ndarray,  # (M,) entity row of each log entry, in [0, n)
    total_cnt: np.ndarray,  # (n,)
    total_pos: np.ndarray,  # (n,)
) -> dict[str, np.ndarray]:
    """Counter columns ``{entity}_cnt_{w}``, ``{entity}_pos_{w}`` -> (n,) float64 each."""
    n = int(total_cnt.shape[0])
    posf = pos.astype(np.float64)
    out: dict[str, np.ndarray] = {}
    for w, ms in zip(cfg.windows, cfg.window_ms()):
        inside = in_window(ts, t_ms, ms)
        if ms is None:  # the log keeps the retention only: everything before t = totals ever - the log from t on
            future = ~inside
            cnt = total_cnt.astype(np.float64) - np.bincount(owner[future], minlength=n)
            p = total_pos.astype(np.float64) - np.bincount(owner[future], weights=posf[future], minlength=n)
        else:
            cnt = np.bincount(owner[inside], minlength=n).astype(np.float64)
            p = np.bincount(owner[inside], weights=posf[inside], minlength=n)
        out[cnt_column(entity, w)] = cnt
        out[pos_column(entity, w)] = p
    return out
