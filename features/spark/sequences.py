"""Per-user behavior timelines (full, chronological) and the capped serving sequences.

Behaviors are sorted by (ts_ms, event_id) with one ``sort_array`` over a
``collect_list`` of structs per user, in the JVM; the capped sequences are
array slices of the timeline. This equals `features.sequence.fold_events`
(the streaming path's append semantics) row for row; a test proves it.
"""
from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from features.layout import TIMELINE_FIELDS
from features.sequence import SequenceConfig


def build_timelines(events: DataFrame, min_behaviors_for_holdout: int) -> DataFrame:
    """Enriched events -> one row per user with behaviors: arrays `item_id, ts_ms, action, category`.

    `length` is the number of behaviors; `retrieval_train_len` the leave-one-out
    training prefix (length - 2 when length >= `min_behaviors_for_holdout`, else length).
    """
    packed = (
        events.filter(F.col("is_beh") == 1)
        .groupBy("user_id")
        .agg(F.sort_array(F.collect_list(F.struct("ts_ms", "event_id", "item_id", "action", "category"))).alias("b"))
    )
    n = F.size("b")
    return packed.select(
        "user_id",
        *[F.col("b").getField(f).alias(f) for f in TIMELINE_FIELDS],
        n.alias("length"),
        F.when(n >= F.lit(min_behaviors_for_holdout), n - 2).otherwise(n).alias("retrieval_train_len"),
    )


def _tail(col: str, cap: int) -> F.Column:
    # slice is 1-based; a negative start beyond the length would return [], so clamp to 1
    return F.slice(F.col(col), F.greatest(F.size(col) - F.lit(cap) + 1, F.lit(1)), F.lit(cap))


def build_sequences(timelines: DataFrame, cfg: SequenceConfig) -> DataFrame:
    """Timelines -> the serving state: the last `long_cap` and last `short_cap` behaviors per user."""
    return timelines.select(
        "user_id",
        *[_tail(f, cfg.long_cap).alias(f"long_{f}") for f in TIMELINE_FIELDS],
        *[_tail(f, cfg.short_cap).alias(f"short_{f}") for f in TIMELINE_FIELDS],
        F.col("length"),
        F.element_at("ts_ms", -1).alias("last_ts_ms"),
    )
