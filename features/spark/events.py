"""Canonical events in, validated behaviors out: schema check, quarantine, dedup, enrichment.

Bad rows are never dropped silently: each goes to the quarantine with a reason
code (the first check it fails, in this order) and a readable detail:

    missing_event_id    event_id NULL or empty
    missing_field       user_id, item_id, ts_ms, event_type or label is NULL
    negative_ts         ts_ms < 0
    unknown_event_type  event_type is not an `EventType` name
    non_finite_label    label is NaN or infinite
    duplicate_event_id  a valid row whose (user_id, event_id) was already seen earlier
                        in the input (the first occurrence in input order is kept)

Duplicates are found per user: at-least-once delivery repeats whole events,
user included, and detecting them inside the user partitioning that every
later stage needs costs no extra shuffle. (The same event_id under two
different users is not detected here.)

`row_id` (`monotonically_increasing_id` right after the read: input order) is
kept for the first-occurrence rule and for the out-of-order diagnostic.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from features.schema import EVENT_TYPE_NAMES, TABLE_SCHEMAS, SchemaError
from features.sequence import SequenceConfig
from features.spark import exprs
from features.transforms import StatsConfig

_SPARK_TYPES = {
    "string": T.StringType(),
    "int64": T.LongType(),
    "float": T.FloatType(),
    "list<item: string>": T.ArrayType(T.StringType()),
    "map<string, string>": T.MapType(T.StringType(), T.StringType()),
    "map<string, float>": T.MapType(T.StringType(), T.FloatType()),
}

QUARANTINE_COLUMNS = ("reason", "detail", "event_id", "user_id", "item_id", "ts_ms", "event_type", "label")


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def read_table(spark: SparkSession, dataset_dir: str, table: str) -> DataFrame:
    """Reads canonical `table` of a dataset directory and checks its columns against the contract."""
    path = f"{dataset_dir.rstrip('/')}/{table}"
    if not _is_remote(path) and not Path(path.removeprefix("file://")).exists():
        raise FileNotFoundError(
            f"{path} does not exist: is {dataset_dir} a canonical dataset directory "
            f"(written by `cascade data import|synth`)?"
        )
    df = spark.read.parquet(path)
    check_schema(df, table, path)
    return df


def check_schema(df: DataFrame, table: str, where: str) -> None:
    """Raises SchemaError naming the column if `df` lacks a canonical column or has another type."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    for f in TABLE_SCHEMAS[table]:
        if f.name not in fields:
            raise SchemaError(f"{table} in {where}: column {f.name!r} is missing (have {sorted(fields)})")
        want = _SPARK_TYPES[str(f.type)]
        got = fields[f.name]
        if got != want:
            raise SchemaError(f"{table} in {where}: column {f.name!r} has type {got.simpleString()}, expected {want.simpleString()}")


def _reason(df: DataFrame) -> Column:
    eid, label = F.col("event_id"), F.col("label")
    known = exprs.in_list("event_type", EVENT_TYPE_NAMES)
    return (
        F.when(eid.isNull() | (eid == F.lit("")), F.lit("missing_event_id"))
        .when(
            F.col("user_id").isNull() | F.col("item_id").isNull() | F.col("ts_ms").isNull()
            | F.col("event_type").isNull() | label.isNull(),
            F.lit("missing_field"),
        )
        .when(F.col("ts_ms") < 0, F.lit("negative_ts"))
        .when(~known, F.lit("unknown_event_type"))
        .when(F.isnan(label) | (F.abs(label) == F.lit(float("inf"))), F.lit("non_finite_label"))
    )


def _detail(reason: Column) -> Column:
    nulls = F.concat_ws(
        ", ",
        *[F.when(F.col(c).isNull(), F.lit(c)) for c in ("user_id", "item_id", "ts_ms", "event_type", "label")],
    )
    return (
        F.when(reason == "missing_event_id", F.lit("event_id is NULL or empty"))
        .when(reason == "missing_field", F.concat(F.lit("NULL in: "), nulls))
        .when(reason == "negative_ts", F.format_string("ts_ms=%d is negative", F.col("ts_ms")))
        .when(reason == "unknown_event_type", F.format_string(
            "event_type %s is not one of: %s", F.col("event_type"), F.lit(", ".join(EVENT_TYPE_NAMES))))
        .when(reason == "non_finite_label", F.format_string("label=%s is not finite", F.col("label").cast("string")))
        .when(reason == "duplicate_event_id", F.format_string(
            "event_id %s of user %d already appeared earlier in the input; the first occurrence is kept",
            F.col("event_id"), F.col("user_id")))
    )


@dataclass
class CheckedEvents:
    """Lazily defined views of the input events (one plan; nothing computed yet).

    valid       checked, deduplicated events (+ row_id), hash-partitioned by user_id
    invalid     rows failing a check, as quarantine rows (a filter on the scan: no shuffle)
    duplicates  repeated (user_id, event_id) rows, as quarantine rows (needs the dedup shuffle)
    """

    valid: DataFrame
    invalid: DataFrame
    duplicates: DataFrame

    def quarantine(self, with_duplicates: bool = True) -> DataFrame:
        return self.invalid.unionByName(self.duplicates) if with_duplicates else self.invalid


def _as_quarantine(df: DataFrame) -> DataFrame:
    return df.withColumn("detail", _detail(F.col("reason"))).select(*QUARANTINE_COLUMNS)


def check_events(raw: DataFrame) -> CheckedEvents:
    """Splits raw canonical events into valid (deduplicated) rows, invalid rows and duplicates."""
    base = raw.select(
        "event_id", "user_id", "item_id", "ts_ms", "event_type", "label",
        F.monotonically_increasing_id().alias("row_id"),
    )
    checked = base.withColumn("reason", _reason(base))
    invalid = _as_quarantine(checked.filter(F.col("reason").isNotNull()))
    # the one shuffle: dedup and every per-user window after it reuse this partitioning
    ok = checked.filter(F.col("reason").isNull()).drop("reason").repartition("user_id")
    first = Window.partitionBy("user_id", "event_id").orderBy("row_id")
    ranked = ok.withColumn("_rn", F.row_number().over(first))
    duplicates = _as_quarantine(ranked.filter(F.col("_rn") > 1).withColumn("reason", F.lit("duplicate_event_id")))
    valid = ranked.filter(F.col("_rn") == 1).drop("_rn")
    return CheckedEvents(valid=valid, invalid=invalid, duplicates=duplicates)


def count_invalid(raw: DataFrame) -> tuple[int, dict[str, int]]:
    """(input rows, invalid rows by reason) in one scan, without a shuffle of the events."""
    base = raw.select("event_id", "user_id", "item_id", "ts_ms", "event_type", "label")
    reasons = ("missing_event_id", "missing_field", "negative_ts", "unknown_event_type", "non_finite_label")
    r = base.withColumn("reason", _reason(base)).agg(
        F.count(F.lit(1)).alias("_rows"),
        *[F.sum((F.col("reason") == F.lit(x)).cast("long")).alias(x) for x in reasons],
    ).first()
    return int(r["_rows"]), {x: int(r[x] or 0) for x in reasons if r[x]}


def enrich(valid: DataFrame, item_category: DataFrame, seq: SequenceConfig, stats: StatsConfig) -> DataFrame:
    """Adds per-event fields: category (of the item, 0 if unknown), action code and 0/1 indicators.

        is_beh  the event is a behavior (`SequenceConfig.behavior_event_types`)
        is_cnt  the event is counted by the statistics (`StatsConfig.event_types`)
        is_pos  counted and label >= 0.5
    """
    cnt = exprs.in_list("event_type", stats.counted_event_types()).cast("int")
    return (
        valid.join(item_category, on="item_id", how="left")
        .select(
            "event_id", "user_id", "item_id", "ts_ms", "event_type", "label", "row_id",
            F.coalesce(F.col("category"), F.lit(0).cast("long")).alias("category"),
            exprs.action_code("event_type", "label").alias("action"),
            exprs.in_list("event_type", seq.behavior_event_types).cast("int").alias("is_beh"),
            cnt.alias("is_cnt"),
            (cnt * (F.col("label") >= F.lit(0.5)).cast("int")).alias("is_pos"),
        )
    )
