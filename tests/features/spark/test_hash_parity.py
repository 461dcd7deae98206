"""The JVM expressions of the data contract equal the Python spec bit for bit (hash spec v1 golden
vectors, action codes, primary category ids), so Spark-built features and serving agree."""
import numpy as np
from pyspark.sql import functions as F

from features import hashing as h
from features.schema import EventType
from features.sequence import action_code, action_codes, category_id
from features.spark import exprs


def test_golden_vectors_in_spark(spark):
    cols = []
    expected = []
    for fn, cases in sorted(h.GOLDEN_VECTORS.items()):
        for i, (args, want) in enumerate(cases):
            if fn in ("hash_raw_id", "feature_seed"):
                col = F.xxhash64(F.lit(args[0]))
            elif fn == "hash_ids":
                col = exprs.hash_feature(args[1], F.lit(args[0]).cast("long"))
            elif fn == "hash_strings":
                col = exprs.hash_feature(args[1], F.lit(args[0]))
            else:
                col = exprs.bucketize(args[1], F.lit(args[0]).cast("long"), args[2])
            cols.append(col.alias(f"{fn}_{i}"))
            expected.append(((fn, args), want))
    row = spark.range(1).select(*cols).first()
    got = list(row)
    assert len(got) == len(expected) == sum(len(v) for v in h.GOLDEN_VECTORS.values())
    for (case, want), value in zip(expected, got):
        assert value == want, case


def test_action_code_and_category_id_match_python(spark):
    rows = [(t.name.lower(), float(lab)) for t in EventType for lab in (0.0, 0.49, 0.5, 1.0)]
    df = spark.createDataFrame(rows, "event_type string, label float")
    got = df.select(exprs.action_code("event_type", "label").alias("a")).collect()
    assert [r["a"] for r in got] == [action_code(t, lab) for t, lab in rows]
    assert action_codes([t for t, _ in rows], np.array([lab for _, lab in rows], np.float32)).tolist() == [
        r["a"] for r in got]  # the vectorised form the consumer and the bootstrap use

    cats = [(["Comedy", "Drama"],), ([],), (None,), (["Film-Noir"],), (["\u03a9mega", "x"],)]
    df = spark.createDataFrame(cats, "categories array<string>")
    got = [r["c"] for r in df.select(exprs.category_id("categories").alias("c")).collect()]
    assert got == [category_id(c) for (c,) in cats]
    assert got[1] == got[2] == 0  # not the feature seed: xxhash64 skips NULL arguments


def test_hash_array_skips_nulls_and_matches_hash_strings(spark):
    df = spark.createDataFrame([(["a", None, "b"],), (None,)], "tags array<string>")
    got = [r["t"] for r in df.select(exprs.hash_array("tag", "tags").alias("t")).collect()]
    assert got == [h.hash_strings(["a", "b"], "tag").tolist(), []]
