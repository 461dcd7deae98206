"""Spark column expressions for the data contract's functions, evaluated in the JVM.

Each mirrors a Python function bit for bit (tests compare them):

    hash_feature(f, c)     features.hashing.hash_ids / hash_strings   xxhash64(lit(f), c)
    bucketize(f, c, B)     features.hashing.bucketize                 pmod(xxhash64(lit(f), c), B)
    event_type_code(c)     features.schema.EventType[c.upper()]
    action_code(t, l)      features.sequence.action_code              2 * code + CAST(label >= 0.5 AS INT)
    category_id(cats)      features.sequence.category_id              hash of the first category, 0 if none

Note on `category_id`: Spark's hash functions *skip* NULL arguments, so
``xxhash64(lit('category'), NULL)`` is the feature seed, not NULL; the
"no category" case must be an explicit CASE, not a ``coalesce``.
"""
from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

from features.layout import CATEGORY_FEATURE
from features.schema import EventType


def hash_feature(feature: str, col: Column | str) -> Column:
    """XXH64 of a long or string column seeded with the feature name (hash spec v1)."""
    return F.xxhash64(F.lit(feature), F.col(col) if isinstance(col, str) else col)


def bucketize(feature: str, col: Column | str, num_buckets: int) -> Column:
    return F.pmod(hash_feature(feature, col), F.lit(num_buckets).cast("long"))


def hash_array(feature: str, col: Column | str) -> Column:
    """array<string> -> array<long> of hashed values; NULL elements are dropped, a NULL array is []."""
    arr = F.col(col) if isinstance(col, str) else col
    kept = F.filter(F.coalesce(arr, F.array().cast("array<string>")), lambda x: x.isNotNull())
    return F.transform(kept, lambda x: F.xxhash64(F.lit(feature), x))


def event_type_code(col: Column | str) -> Column:
    """Event type name -> its `EventType` code; NULL for unknown names."""
    c = F.col(col) if isinstance(col, str) else col
    out = None
    for e in EventType:
        cond = c == F.lit(e.name.lower())
        out = F.when(cond, F.lit(int(e.value))) if out is None else out.when(cond, F.lit(int(e.value)))
    assert out is not None
    return out.otherwise(F.lit(None).cast("int"))


def action_code(event_type: Column | str, label: Column | str) -> Column:
    lab = F.col(label) if isinstance(label, str) else label
    return (event_type_code(event_type) * 2 + (lab >= F.lit(0.5)).cast("int")).cast("long")


def category_id(categories: Column | str) -> Column:
    """Primary category id of an array<string> of categories (0 when empty or NULL)."""
    first = F.try_element_at(F.col(categories) if isinstance(categories, str) else categories, F.lit(1))
    return F.when(first.isNull(), F.lit(0).cast("long")).otherwise(F.xxhash64(F.lit(CATEGORY_FEATURE), first))


def in_list(col: Column | str, values: tuple[str, ...]) -> Column:
    c = F.col(col) if isinstance(col, str) else col
    if not values:
        return F.lit(False)
    return c.isin(*values)
