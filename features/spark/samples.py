"""Splits, ranking samples (observed and sampled negatives), popularity and retrieval samples.

Ranking samples (point-in-time correct)
    Every event whose type is in `RankingConfig.event_types` is a sample with
    its observed label (MovieLens: rating >= 4 -> 1). Its history is never
    copied: `hist_len` = the user's behaviors strictly before its ts (so the
    history is ``timeline[:hist_len]``), and user/item counters are as of ts,
    strictly before it (`features.spark.stats`).

    Positive-only event types (`sampled_negative_event_types`, e.g.
    ``interaction``) get `negatives_per_positive` sampled negatives each, drawn
    from train-window item popularity ** alpha through a slot table: item i
    owns ``slot_end_i - slot_start_i`` of ``S = sampler_slots`` slots, and the
    j-th negative of event e takes slot ``pmod(xxhash64(seed, event_id, j), S)``:
    deterministic by seed, an equi-join in the JVM, and ``sampling_prob`` is
    exactly the item's slot share. A draw that hits the positive's own item is
    dropped (counted in the report). Negatives keep the positive's user, ts,
    `hist_len` and user counters; their item counters are as of ts like any sample.

Splits
    ranking: global time split at two cut timestamps (quantiles of the sample
    timestamps or explicit), train < valid_start <= valid < test_start <= test.
    retrieval: leave-one-out per user (`features.spark.sequences`): the last
    behavior is test, the second last valid, the rest train; users with fewer
    than `min_behaviors_for_holdout` behaviors are train only.

Retrieval samples
    One row per behavior at timeline position p >= 1: target item, ts,
    ``hist_len = p`` (the history is the sequence prefix, ties included, as in
    the published leave-one-out protocol) and ``logq = log(share of the target
    among all retrieval-train targets)`` (the in-batch sampling probability for
    logQ correction; an item never seen in train counts once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from features.layout import SPLIT_COLUMN
from features.spark import exprs
from features.spark.config import RankingConfig, SplitConfig
from features.spark.stats import with_asof_counters
from features.transforms import StatsConfig, counter_columns


@dataclass(frozen=True)
class SplitCuts:
    valid_start_ms: int
    test_start_ms: int
    method: str


def cut_aggregate(ranking: RankingConfig, split: SplitConfig) -> Column:
    """The aggregate whose value gives the quantile cuts (evaluate it with other aggregates, one pass)."""
    ts = F.when(exprs.in_list("event_type", ranking.event_types), F.col("ts_ms"))  # NULLs are ignored
    return F.percentile_approx(ts, [split.valid_quantile, split.test_quantile], split.quantile_accuracy)


def cuts_from(value: list[int] | None, ranking: RankingConfig, split: SplitConfig) -> SplitCuts:
    """Explicit cuts from the config, else the value of `cut_aggregate`."""
    if split.valid_start_ms is not None and split.test_start_ms is not None:
        return SplitCuts(split.valid_start_ms, split.test_start_ms, "explicit")
    if value is None or any(v is None for v in value):
        raise ValueError(
            f"no events of ranking.event_types {list(ranking.event_types)} in the input: cannot place the time split"
        )
    q = [int(v) for v in value]
    return SplitCuts(
        q[0], q[1],
        f"percentile_approx(ts_ms of samples, [{split.valid_quantile}, {split.test_quantile}], {split.quantile_accuracy})",
    )


def compute_cuts(events: DataFrame, ranking: RankingConfig, split: SplitConfig) -> SplitCuts:
    """The ranking split's cut timestamps (two numbers reach the driver)."""
    if split.valid_start_ms is not None and split.test_start_ms is not None:
        return cuts_from(None, ranking, split)
    return cuts_from(events.agg(cut_aggregate(ranking, split).alias("q")).first()["q"], ranking, split)


def split_of(ts: Column, cuts: SplitCuts) -> Column:
    return (
        F.when(ts < F.lit(cuts.valid_start_ms), F.lit("train"))
        .when(ts < F.lit(cuts.test_start_ms), F.lit("valid"))
        .otherwise(F.lit("test"))
    )


def sampler_items(events: DataFrame, item_category: DataFrame, cuts: SplitCuts, cfg: RankingConfig) -> DataFrame:
    """Per item with train-window behaviors: its slot range in the negative-sampling table.

    Columns: item_id, category, ranking_train_count, slot_start, slot_end, sampler_prob.
    (One ordered window over the items, i.e. over the catalog, not over events.)
    """
    counts = (
        events.filter((F.col("is_beh") == 1) & (F.col("ts_ms") < F.lit(cuts.valid_start_ms)))
        .groupBy("item_id").agg(F.count(F.lit(1)).alias("ranking_train_count"))
    )
    ordered = Window.orderBy("item_id")
    whole = Window.partitionBy(F.lit(0))
    s = cfg.sampler_slots
    w = F.pow(F.col("ranking_train_count").cast("double"), F.lit(cfg.popularity_alpha))
    staged = (
        counts.withColumn("_w", w)
        .withColumn("_cum", F.sum("_w").over(ordered.rowsBetween(Window.unboundedPreceding, Window.currentRow)))
        .withColumn("_tot", F.sum("_w").over(whole))
        .withColumn("_n", F.count(F.lit(1)).over(whole))
        .withColumn("_i", F.row_number().over(ordered))
        .withColumn(
            "slot_end",
            F.when(F.col("_i") == F.col("_n"), F.lit(s).cast("long"))
            .otherwise(F.floor(F.col("_cum") / F.col("_tot") * F.lit(float(s))).cast("long")),
        )
        .withColumn("slot_start", F.coalesce(F.lag("slot_end", 1).over(ordered), F.lit(0).cast("long")))
    )
    return (
        staged.join(item_category, on="item_id", how="left")
        .select(
            "item_id",
            F.coalesce("category", F.lit(0).cast("long")).alias("category"),
            "ranking_train_count", "slot_start", "slot_end",
            ((F.col("slot_end") - F.col("slot_start")) / F.lit(float(s))).alias("sampler_prob"),
        )
    )


_SAMPLE_COLUMNS = (
    "sample_id", "user_id", "item_id", "item_category", "ts_ms", "event_type", "label", "hist_len",
    "weight", "sampling_prob", "is_sampled_negative",
)


def _negatives(events: DataFrame, sampler: DataFrame, user_counters: tuple[str, ...], cfg: RankingConfig) -> DataFrame:
    slots = (
        sampler.filter(F.col("slot_end") > F.col("slot_start"))
        .select(
            F.explode(F.sequence(F.col("slot_start"), F.col("slot_end") - 1)).alias("slot"),
            F.col("item_id").alias("neg_item"), F.col("category").alias("neg_category"), "sampler_prob",
        )
    )
    positives = events.filter(
        exprs.in_list("event_type", cfg.sampled_negative_event_types) & (F.col("label") >= F.lit(0.5))
    )
    draws = positives.select(
        "event_id", "user_id", "item_id", "ts_ms", "event_type", "hist_len", *user_counters,
        F.explode(F.sequence(F.lit(0), F.lit(cfg.negatives_per_positive - 1))).alias("j"),
    ).withColumn("slot", F.pmod(F.xxhash64(F.lit(cfg.seed), F.col("event_id"), F.col("j")), F.lit(cfg.sampler_slots).cast("long")))
    return (
        draws.join(F.broadcast(slots), on="slot", how="inner")
        .filter(F.col("neg_item") != F.col("item_id"))
        .select(
            F.concat(F.col("event_id"), F.lit("#neg"), F.col("j").cast("string")).alias("sample_id"),
            "user_id",
            F.col("neg_item").alias("item_id"),
            F.col("neg_category").alias("item_category"),
            "ts_ms", "event_type",
            F.lit(0.0).cast("float").alias("label"),
            "hist_len",
            F.lit(1.0).cast("float").alias("weight"),
            F.col("sampler_prob").alias("sampling_prob"),
            F.lit(True).alias("is_sampled_negative"),
            *user_counters,
            F.lit(True).alias("_is_sample"),
            F.lit(0).alias("is_cnt"),
            F.lit(0).alias("is_pos"),
        )
    )


def ranking_samples(
    events: DataFrame, sampler: DataFrame | None, cuts: SplitCuts, ranking: RankingConfig, stats: StatsConfig,
) -> DataFrame:
    """Events with user as-of columns (`stats.with_user_asof`) -> ranking samples with a `split` column."""
    user_counters = counter_columns("user", stats)
    observed = events.select(
        F.col("event_id").alias("sample_id"),
        "user_id", "item_id",
        F.col("category").alias("item_category"),
        "ts_ms", "event_type", "label", "hist_len",
        F.lit(1.0).cast("float").alias("weight"),
        F.lit(1.0).cast("double").alias("sampling_prob"),
        F.lit(False).alias("is_sampled_negative"),
        *user_counters,
        exprs.in_list("event_type", ranking.event_types).alias("_is_sample"),
        "is_cnt", "is_pos",
    )
    rows = observed
    if sampler is not None and ranking.negatives_per_positive > 0 and ranking.sampled_negative_event_types:
        rows = observed.unionByName(_negatives(events, sampler, user_counters, ranking))
    return (
        with_asof_counters(rows, "item_id", "item", stats)
        .filter(F.col("_is_sample"))
        .select(*_SAMPLE_COLUMNS, *user_counters, *counter_columns("item", stats), split_of(F.col("ts_ms"), cuts).alias(SPLIT_COLUMN))
    )


def retrieval_targets(timelines: DataFrame) -> DataFrame:
    """One row per behavior at position >= 1 with its leave-one-out split (no logq yet)."""
    z = timelines.select(
        "user_id", "length", "retrieval_train_len",
        F.posexplode(F.arrays_zip("item_id", "ts_ms")).alias("pos", "b"),
    ).filter(F.col("pos") >= 1)
    split = (
        F.when(F.col("pos") < F.col("retrieval_train_len"), F.lit("train"))
        .when(F.col("pos") == F.col("length") - 2, F.lit("valid"))
        .otherwise(F.lit("test"))
    )
    return z.select(
        "user_id",
        F.col("b").getField("item_id").alias("item_id"),
        F.col("b").getField("ts_ms").alias("ts_ms"),
        F.col("pos").cast("long").alias("hist_len"),
        split.alias(SPLIT_COLUMN),
    )


def retrieval_train_total(timelines: DataFrame) -> int:
    """Number of retrieval-train targets (positions 1 .. retrieval_train_len - 1 of every user)."""
    t = timelines.agg(F.sum(F.greatest(F.col("retrieval_train_len") - 1, F.lit(0))).alias("t")).first()["t"]
    return int(t or 0)


def unseen_logq(total: int) -> float:
    """logq of an item that never occurs as a retrieval-train target (counted once)."""
    return -math.log(max(total, 1))


def popularity(timelines: DataFrame, sampler: DataFrame, total: int) -> DataFrame:
    """item_id, retrieval_train_count, logq, ranking_train_count, sampler_prob (items seen in either count)."""
    retr = (
        retrieval_targets(timelines).filter(F.col(SPLIT_COLUMN) == "train")
        .groupBy("item_id").agg(F.count(F.lit(1)).alias("retrieval_train_count"))
    )
    rank = sampler.select("item_id", "ranking_train_count", "sampler_prob")
    denom = float(max(total, 1))
    count = F.coalesce("retrieval_train_count", F.lit(0))
    return (
        retr.join(rank, on="item_id", how="full_outer")
        .select(
            "item_id",
            count.cast("long").alias("retrieval_train_count"),
            F.log(F.greatest(count, F.lit(1)).cast("double") / F.lit(denom)).alias("logq"),
            F.coalesce("ranking_train_count", F.lit(0)).cast("long").alias("ranking_train_count"),
            F.coalesce("sampler_prob", F.lit(0.0)).alias("sampler_prob"),
        )
    )


def retrieval_samples(timelines: DataFrame, pop: DataFrame, total: int) -> DataFrame:
    """user_id, item_id, ts_ms, hist_len, logq, split."""
    return retrieval_targets(timelines).join(pop.select("item_id", "logq"), on="item_id", how="left").select(
        "user_id", "item_id", "ts_ms", "hist_len",
        F.coalesce("logq", F.lit(unseen_logq(total))).alias("logq"),
        SPLIT_COLUMN,
    )
