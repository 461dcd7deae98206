"""User/item counters over time windows, as of each row's timestamp (strictly before it).

A counter over window ``w`` counts the entity's events with ts in
``[ts - w, ts - 1]`` (``(-inf, ts - 1]`` for ``all``): a row never counts itself,
events at the same millisecond, or anything later. It is computed as the
difference of two *growing* range frames over ``ts_ms``::

    sum(x) over (range unbounded preceding .. -1) - sum(x) over (range unbounded preceding .. -(w + 1))

because Spark evaluates growing frames incrementally (O(n) per partition)
while a sliding ``range -w .. -1`` frame re-aggregates its whole buffer for
every row (O(n x rows-in-window): quadratic for heavy users and popular
items). All windows of one entity share one sort (one Window spec, several
frames), in the JVM.

Column names and the meaning of the counters are defined in
`features.transforms` (shared with the reader and the server); the window rule
above is the JVM-side statement of `features.transforms.window_start`, which
every Python reader uses, and the Spark-vs-Python parity tests keep them equal.
"""
from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from features.transforms import StatsConfig, cnt_column, pos_column


def _upto(key: str, upper: int):
    """Growing frame: rows with ts_ms <= ts + upper (upper < 0)."""
    return Window.partitionBy(key).orderBy("ts_ms").rangeBetween(Window.unboundedPreceding, upper)


def _sum_upto(col: str, key: str, upper: int) -> Column:
    return F.coalesce(F.sum(col).over(_upto(key, upper)), F.lit(0)).cast("long")


def with_asof_counters(df: DataFrame, key: str, entity: str, cfg: StatsConfig) -> DataFrame:
    """Adds the counters of `entity` (partitioned by `key`) strictly before each row's ts.

    Rows need ``ts_ms, is_cnt, is_pos``; every growing sum is evaluated once.
    """
    sums = {("is_cnt", -1): "_c_b", ("is_pos", -1): "_p_b"}
    for ms in cfg.window_ms():
        if ms is not None:
            sums[("is_cnt", -(ms + 1))] = f"_c_{ms}"
            sums[("is_pos", -(ms + 1))] = f"_p_{ms}"
    staged = df.select("*", *[_sum_upto(c, key, up).alias(name) for (c, up), name in sums.items()])
    cols = []
    for w, ms in zip(cfg.windows, cfg.window_ms()):
        for c, name in (("is_cnt", cnt_column(entity, w)), ("is_pos", pos_column(entity, w))):
            before = F.col(sums[(c, -1)])
            cols.append((before if ms is None else before - F.col(sums[(c, -(ms + 1))])).alias(name))
    return staged.select(*df.columns, *cols)


def with_user_asof(events: DataFrame, cfg: StatsConfig) -> DataFrame:
    """Adds, per event: `hist_len` (the user's behaviors strictly before its ts), the user counters,
    and `out_of_order` (an earlier-timestamped event of the same user comes later in the input)."""
    before = _upto("user_id", -1)
    staged = events.select(
        "*",
        _sum_upto("is_beh", "user_id", -1).alias("hist_len"),
        (F.coalesce(F.max("row_id").over(before), F.lit(-1)) > F.col("row_id")).alias("out_of_order"),
    )
    return with_asof_counters(staged, "user_id", "user", cfg)


def latest_counters(events: DataFrame, key: str, entity: str, cfg: StatsConfig, as_of_ms: int) -> DataFrame:
    """Counters of every user/item over [as_of - w, as_of): the state serving bootstraps from."""
    aggs = []
    for w, ms in zip(cfg.windows, cfg.window_ms()):
        inside = F.lit(True) if ms is None else F.col("ts_ms") >= F.lit(as_of_ms - ms)
        aggs.append(F.sum(F.when(inside, F.col("is_cnt")).otherwise(0)).cast("long").alias(cnt_column(entity, w)))
        aggs.append(F.sum(F.when(inside, F.col("is_pos")).otherwise(0)).cast("long").alias(pos_column(entity, w)))
    return (
        events.filter(F.col("ts_ms") < F.lit(as_of_ms))
        .groupBy(key)
        .agg(*aggs, F.max("ts_ms").alias("last_ts_ms"))
        .withColumn("as_of_ms", F.lit(as_of_ms).cast("long"))
    )
