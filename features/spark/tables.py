"""The item and user feature tables: hashed attribute ids and numeric attributes.

items: ``item_id, category, categories, tags, item_attr_<key>..., num_<key>...``
users: ``user_id, user_attr_<key>..., num_<key>...``

Attribute keys are discovered from the data (a distinct over the map keys: a
handful of strings reach the driver, never rows) and recorded in the manifest.
A missing attribute is NULL (zero ids in the batch), never a hash of nothing.
Rows with a NULL id are dropped and counted; a repeated id keeps its first row
in input order and is counted (`TableInfo`).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from features.layout import (
    CATEGORY_FEATURE, TAG_FEATURE, item_attr_feature, numeric_column, sanitize_key, user_attr_feature,
)
from features.spark import exprs


@dataclass(frozen=True)
class TableInfo:
    attribute_keys: tuple[str, ...]
    numeric_keys: tuple[str, ...]


def _keys(df: DataFrame, col: str) -> tuple[str, ...]:
    rows = (
        df.select(F.explode(F.map_keys(F.col(col))).alias("k"))
        .filter(F.col("k").isNotNull()).distinct().orderBy("k").collect()
    )
    keys = tuple(r["k"] for r in rows)
    seen: dict[str, str] = {}
    for k in keys:
        s = sanitize_key(k)
        if s in seen:
            raise ValueError(f"{col} keys {seen[s]!r} and {k!r} both become column suffix {s!r}; rename one in the input")
        seen[s] = k
    return keys


def _first_per_id(df: DataFrame, id_col: str) -> DataFrame:
    w = Window.partitionBy(id_col).orderBy("_row")
    return (
        df.filter(F.col(id_col).isNotNull())
        .withColumn("_row", F.monotonically_increasing_id())
        .withColumn("_rn", F.row_number().over(w))
        .filter(F.col("_rn") == 1)
        .drop("_row", "_rn")
    )


def _hashed_attr(feature: str, value) -> F.Column:
    return F.when(value.isNull(), F.lit(None).cast("long")).otherwise(F.xxhash64(F.lit(feature), value))


def build_items(items: DataFrame) -> tuple[DataFrame, TableInfo]:
    """Canonical items -> the item feature table (one row per item id)."""
    info = TableInfo(_keys(items, "attributes"), _keys(items, "numeric"))
    attrs = [
        _hashed_attr(item_attr_feature(k), F.try_element_at("attributes", F.lit(k))).alias(item_attr_feature(k))
        for k in info.attribute_keys
    ]
    nums = [F.try_element_at("numeric", F.lit(k)).cast("double").alias(numeric_column(k)) for k in info.numeric_keys]
    out = _first_per_id(items, "item_id").select(
        "item_id",
        exprs.category_id("categories").alias("category"),
        exprs.hash_array(CATEGORY_FEATURE, "categories").alias("categories"),
        exprs.hash_array(TAG_FEATURE, "tags").alias("tags"),
        *attrs,
        *nums,
    )
    return out, info


def build_users(users: DataFrame) -> tuple[DataFrame, TableInfo]:
    """Canonical users -> the user feature table (one row per user id)."""
    info = TableInfo(_keys(users, "attributes"), _keys(users, "numeric"))
    attrs = [
        _hashed_attr(user_attr_feature(k), F.try_element_at("attributes", F.lit(k))).alias(user_attr_feature(k))
        for k in info.attribute_keys
    ]
    nums = [F.try_element_at("numeric", F.lit(k)).cast("double").alias(numeric_column(k)) for k in info.numeric_keys]
    return _first_per_id(users, "user_id").select("user_id", *attrs, *nums), info
