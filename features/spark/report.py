"""The validation report: what went in, what came out, and what looks wrong.

`build_report` computes only aggregates in Spark (counts, percentiles, log2
histograms, distinct counts) and collects those; `write_report` writes
``validation.json`` (machine-readable), ``validation.txt`` (the readable
summary) and ``validation.png`` (sequence-length and item-popularity
distributions).

Checks:
    rows per stage (the manifest's outputs), quarantine counts by reason,
    duplicate event ids, out-of-order events (an earlier-timestamped event of
    the same user appears later in the input), NULLs per input column, id
    coverage (event ids present in the item/user tables), hash-bucket usage and
    collision rate per hashed feature (vs. the rate expected of a uniform hash),
    sequence-length and popularity distributions, labels and sampled
    negatives per split.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import fsspec
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from features import layout
from features.schema import TABLE_SCHEMAS
from features.spark import exprs
from features.spark.config import FeatureBuildConfig


@dataclass
class ReportInputs:
    raw_events: DataFrame
    events: DataFrame  # valid, enriched (is_beh, out_of_order, ...)
    input_counts: dict[str, Any]  # rows, by_reason, duplicates
    raw_items: DataFrame
    raw_users: DataFrame
    items: DataFrame  # the item feature table
    users: DataFrame
    timelines: DataFrame
    ranking_samples: DataFrame | None
    retrieval_samples: DataFrame | None
    summary: dict[str, int]
    manifest: dict[str, Any]
    cfg: FeatureBuildConfig


def _histograms(parts: dict[str, DataFrame]) -> dict[str, list[dict[str, int]]]:
    """{name: one-column DataFrame `v`} -> {name: counts of positive v in bins [2^k, 2^(k+1))}, one Spark job."""
    union = None
    for name, df in parts.items():
        d = df.select(F.lit(name).alias("h"), F.col("v"))
        union = d if union is None else union.unionByName(d)
    out: dict[str, list[dict[str, int]]] = {name: [] for name in parts}
    if union is None:
        return out
    rows = (
        union.filter(F.col("v") > 0)
        .groupBy("h", F.floor(F.log2(F.col("v"))).cast("int").alias("k")).count().orderBy("h", "k").collect()
    )
    for r in rows:
        out[r["h"]].append({"from": 2 ** int(r["k"]), "to": 2 ** (int(r["k"]) + 1), "count": int(r["count"])})
    return out


def _expected_collision_rate(n: int, buckets: int) -> float:
    if n == 0:
        return 0.0
    used = buckets * -math.expm1(n * math.log1p(-1.0 / buckets)) if buckets > 1 else 1.0
    return 1.0 - used / n


def _hash_sources(r: ReportInputs) -> dict[str, DataFrame]:
    """Feature -> a one-column DataFrame `id` of the canonical ids that feature hashes."""
    src: dict[str, DataFrame] = {
        "user_id": r.events.select(F.col("user_id").alias("id")).unionByName(r.users.select(F.col("user_id").alias("id"))),
        "item_id": r.events.select(F.col("item_id").alias("id")).unionByName(r.items.select(F.col("item_id").alias("id"))),
        layout.CATEGORY_FEATURE: r.items.select(F.explode("categories").alias("id")),
        layout.TAG_FEATURE: r.items.select(F.explode("tags").alias("id")),
    }
    for table in (r.items, r.users):
        for c in table.columns:
            if c.startswith(("item_attr_", "user_attr_")):
                src[c] = table.select(F.col(c).alias("id")).filter(F.col("id").isNotNull())
    return src


def _one_row(*aggs: DataFrame) -> dict[str, Any]:
    """Several one-row aggregates evaluated in one Spark job (a cross join of 1-row frames)."""
    df = aggs[0]
    for a in aggs[1:]:
        df = df.crossJoin(a)
    return df.first().asDict()


def build_report(r: ReportInputs) -> dict[str, Any]:
    """Every check of the module docstring, as a JSON-able dict (aggregates only reach the driver)."""
    cfg = r.cfg
    warnings: list[str] = []
    out: dict[str, Any] = {
        "dataset": r.manifest.get("input", {}).get("dataset"),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": {k: v["rows"] for k, v in r.manifest.get("outputs", {}).items()},
    }
    ev_cols = [f.name for f in TABLE_SCHEMAS["events"]]
    from features.schema import EVENT_TYPE_NAMES

    def table_agg(df: DataFrame, key: str, p: str) -> DataFrame:
        return df.agg(
            F.count(F.lit(1)).alias(f"{p}_rows"), F.sum(F.col(key).isNull().cast("long")).alias(f"{p}_nulls"),
            F.countDistinct(key).alias(f"{p}_distinct"),
        )

    per_item = r.events.groupBy("item_id").agg(F.count(F.lit(1)).alias("n"), F.sum("is_beh").alias("n_beh"))
    per_user = r.events.groupBy("user_id").agg(F.count(F.lit(1)).alias("n"))
    rk = cfg.ranking
    sampled_pos = (exprs.in_list("event_type", rk.sampled_negative_event_types) & (F.col("label") >= 0.5)).cast("long")

    def coverage_agg(ids: DataFrame, key: str, table: DataFrame, p: str) -> DataFrame:
        known = table.select(key, F.lit(1).alias("_known"))
        return ids.join(known, on=key, how="left").agg(
            F.count(F.lit(1)).alias(f"{p}_ids"),
            F.sum(F.col("_known").isNotNull().cast("long")).alias(f"{p}_known"),
            F.sum(F.when(F.col("_known").isNull(), F.col("n")).otherwise(0)).alias(f"{p}_unknown_events"),
        )

    a = _one_row(
        r.raw_events.agg(
            F.count(F.lit(1)).alias("ev_rows"),
            *[F.sum(F.col(c).isNull().cast("long")).alias(f"null_{c}") for c in ev_cols],
            *[F.sum((F.col("event_type") == F.lit(t)).cast("long")).alias(f"type_{t}") for t in EVENT_TYPE_NAMES],
        ),
        r.events.agg(F.sum(sampled_pos).alias("sampled_pos")),
        table_agg(r.raw_items, "item_id", "it"),
        table_agg(r.raw_users, "user_id", "us"),
        coverage_agg(per_item, "item_id", r.items, "ci"),
        coverage_agg(per_user, "user_id", r.users, "cu"),
        per_item.filter(F.col("n_beh") > 0).agg(
            F.count(F.lit(1)).alias("pop_items"), F.sum("n_beh").alias("pop_total"), F.max("n_beh").alias("pop_max"),
            F.percentile_approx("n_beh", [0.5, 0.9, 0.99], 10_000).alias("pop_p"),
        ),
        r.timelines.agg(
            F.count(F.lit(1)).alias("sl_users"), F.min("length").alias("sl_min"), F.max("length").alias("sl_max"),
            F.avg("length").alias("sl_mean"), F.percentile_approx("length", [0.5, 0.9, 0.99], 10_000).alias("sl_p"),
            F.sum((F.col("length") >= cfg.sequence.long_cap).cast("long")).alias("sl_at_cap"),
            F.sum((F.col("length") < cfg.split.min_behaviors_for_holdout).cast("long")).alias("sl_short"),
        ),
    )

    # -- input events --
    nulls = {c: int(a[f"null_{c}"] or 0) for c in ev_cols}
    types = {t: int(a[f"type_{t}"] or 0) for t in EVENT_TYPE_NAMES if a[f"type_{t}"]}
    other = int(a["ev_rows"]) - sum(types.values())
    if other:
        types["(other or NULL)"] = other
    by_reason = dict(sorted(r.input_counts["by_reason"].items()))
    s = r.summary
    out["input"] = {
        "events": int(a["ev_rows"]),
        "valid_events": s["events"],
        "behaviors": s["behaviors"],
        "quarantined": {"total": sum(by_reason.values()), "by_reason": by_reason},
        "duplicate_event_ids": by_reason.get("duplicate_event_id", 0),
        "out_of_order_events": s["out_of_order"],
        "nulls": nulls,
        "event_types": types,
        "time_range": r.manifest.get("time_range"),
    }
    if by_reason:
        warnings.append(f"{sum(by_reason.values()):,} input events quarantined: {by_reason}")
    if s["out_of_order"]:
        warnings.append(f"{s['out_of_order']:,} events have an earlier-timestamped event of their user later in the input")
    if s["behaviors"] == 0:
        warnings.append("no behaviors: check sequence.behavior_event_types against the input's event types")

    # -- tables and id coverage --
    out["tables"] = {}
    for name, p in (("items", "it"), ("users", "us")):
        rows, n_null, distinct = int(a[f"{p}_rows"]), int(a[f"{p}_nulls"] or 0), int(a[f"{p}_distinct"])
        out["tables"][name] = {"rows": rows, "null_ids": n_null, "duplicate_ids": rows - n_null - distinct}
        if n_null or rows - n_null - distinct:
            warnings.append(f"{name} table: {n_null:,} NULL ids and {rows - n_null - distinct:,} repeated ids (first kept)")
    out["coverage"] = {}
    for name, p in (("items", "ci"), ("users", "cu")):
        ids_n, known_n = int(a[f"{p}_ids"]), int(a[f"{p}_known"] or 0)
        out["coverage"][name] = {
            "ids_in_events": ids_n, "in_table": known_n, "share": known_n / ids_n if ids_n else 1.0,
            "events_with_unknown_id": int(a[f"{p}_unknown_events"] or 0),
        }
        if ids_n and known_n < ids_n:
            warnings.append(f"{ids_n - known_n:,} of {ids_n:,} {name[:-1]} ids in events are missing from the {name} table")

    # -- hash buckets: every hashed feature in one job --
    sources = _hash_sources(r)
    wanted = {f: b for f, b in sorted(cfg.report.hash_buckets.items()) if f in sources}
    hashes: dict[str, Any] = {
        f: {"buckets": b, "note": "no such hashed feature in this dataset"}
        for f, b in sorted(cfg.report.hash_buckets.items()) if f not in sources
    }
    if wanted:
        union = None
        for f in wanted:
            d = sources[f].select(F.lit(f).alias("feature"), F.col("id").cast("long").alias("id"))
            union = d if union is None else union.unionByName(d)
        assert union is not None
        buckets = None
        for f, b in wanted.items():
            cond = F.col("feature") == F.lit(f)
            buckets = F.when(cond, F.lit(b)) if buckets is None else buckets.when(cond, F.lit(b))
        assert buckets is not None
        # xxhash64(feature column, id) == xxhash64(lit(feature), id): the hash chains over argument values
        bucket = F.pmod(F.xxhash64(F.col("feature"), F.col("id")), buckets.cast("long"))
        for row in union.distinct().groupBy("feature").agg(
            F.count(F.lit(1)).alias("ids"), F.countDistinct(bucket).alias("used"),
        ).collect():
            f, n, used = row["feature"], int(row["ids"]), int(row["used"] or 0)
            b = wanted[f]
            rate = 1.0 - used / n if n else 0.0
            hashes[f] = {
                "distinct_ids": n, "buckets": b, "buckets_used": used, "bucket_share_used": used / b,
                "collision_rate": rate, "expected_collision_rate": _expected_collision_rate(n, b),
            }
            if n > b:
                warnings.append(f"{f}: {n:,} distinct ids exceed its {b:,} hash buckets (collision rate {rate:.1%})")
        for f, b in wanted.items():
            hashes.setdefault(f, {"distinct_ids": 0, "buckets": b, "buckets_used": 0, "bucket_share_used": 0.0,
                                  "collision_rate": 0.0, "expected_collision_rate": 0.0})
    out["hash_buckets"] = dict(sorted(hashes.items()))

    # -- sequences and popularity --
    hist = _histograms({
        "sequence_length": r.timelines.select(F.col("length").alias("v")),
        "popularity": per_item.select(F.col("n_beh").alias("v")),
    })
    p = a["sl_p"] or [0, 0, 0]
    out["sequence_length"] = {
        "users": int(a["sl_users"]), "min": int(a["sl_min"] or 0), "mean": float(a["sl_mean"] or 0.0),
        "p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(a["sl_max"] or 0),
        "users_at_long_cap": int(a["sl_at_cap"] or 0), "long_cap": cfg.sequence.long_cap,
        "users_without_holdout": int(a["sl_short"] or 0),
        "histogram_log2": hist["sequence_length"],
    }
    pp = a["pop_p"] or [0, 0, 0]
    out["popularity"] = {
        "items_with_behaviors": int(a["pop_items"]), "behaviors": int(a["pop_total"] or 0),
        "p50_per_item": int(pp[0]), "p90_per_item": int(pp[1]), "p99_per_item": int(pp[2]),
        "max_per_item": int(a["pop_max"] or 0),
        "histogram_log2": hist["popularity"],
    }

    # -- samples --
    if r.ranking_samples is not None:
        rs = {
            x[layout.SPLIT_COLUMN]: {
                "rows": int(x["rows"]), "positives": int(x["pos"] or 0),
                "positive_rate": (int(x["pos"] or 0) / int(x["rows"])) if x["rows"] else 0.0,
                "sampled_negatives": int(x["neg"] or 0),
                "min_hist_len": int(x["min_h"] or 0), "max_hist_len": int(x["max_h"] or 0),
            }
            for x in r.ranking_samples.groupBy(layout.SPLIT_COLUMN).agg(
                F.count(F.lit(1)).alias("rows"), F.sum((F.col("label") >= 0.5).cast("long")).alias("pos"),
                F.sum(F.col("is_sampled_negative").cast("long")).alias("neg"),
                F.min("hist_len").alias("min_h"), F.max("hist_len").alias("max_h"),
            ).collect()
        }
        n_pos = int(a["sampled_pos"] or 0)
        expected = n_pos * rk.negatives_per_positive
        written = sum(v["sampled_negatives"] for v in rs.values())
        out["ranking_samples"] = {
            "splits": rs,
            "sampled_negatives": {
                "positives_of_sampled_types": n_pos, "expected": expected, "written": written,
                "dropped_same_item": expected - written,
            },
        }
        for split in layout.SPLITS:
            if rs.get(split, {}).get("rows", 0) == 0:
                warnings.append(f"ranking_samples split {split!r} is empty")
    if r.retrieval_samples is not None:
        out["retrieval_samples"] = {
            x[layout.SPLIT_COLUMN]: int(x["count"]) for x in r.retrieval_samples.groupBy(layout.SPLIT_COLUMN).count().collect()
        }
    out["warnings"] = warnings
    return out


def summary_text(rep: dict[str, Any]) -> str:
    """The readable summary (validation.txt)."""
    i = rep["input"]
    lines = [f"Cascade feature validation — {rep.get('dataset')} — {rep['created_at']}", ""]
    lines.append(
        f"input events      {i['events']:,}  valid {i['valid_events']:,}  behaviors {i['behaviors']:,}  "
        f"quarantined {i['quarantined']['total']:,} {i['quarantined']['by_reason'] or ''}"
    )
    lines.append(f"duplicates        {i['duplicate_event_ids']:,}   out-of-order {i['out_of_order_events']:,}")
    nn = {k: v for k, v in i["nulls"].items() if v}
    lines.append(f"nulls             {nn or 'none'}")
    lines.append(f"event types       {i['event_types']}")
    lines.append("")
    lines.append("rows per output")
    for k, v in rep["rows"].items():
        lines.append(f"  {k:<20} {', '.join(f'{s}={n:,}' for s, n in v.items())}")
    lines.append("")
    for name, c in rep["coverage"].items():
        lines.append(f"coverage {name:<8} {c['in_table']:,}/{c['ids_in_events']:,} ids in table ({c['share']:.1%}); "
                     f"{c['events_with_unknown_id']:,} events with an unknown id")
    lines.append("hash buckets")
    for f, h in rep["hash_buckets"].items():
        if "distinct_ids" in h:
            lines.append(f"  {f:<22} {h['distinct_ids']:>10,} ids -> {h['buckets_used']:>10,}/{h['buckets']:,} buckets  "
                         f"collisions {h['collision_rate']:.2%} (uniform hash: {h['expected_collision_rate']:.2%})")
        else:
            lines.append(f"  {f:<22} {h['note']}")
    sl = rep["sequence_length"]
    lines.append("")
    lines.append(f"sequence length   users {sl['users']:,}  min {sl['min']}  p50 {sl['p50']}  p90 {sl['p90']}  p99 {sl['p99']}  "
                 f"max {sl['max']:,}  mean {sl['mean']:.1f}  at long_cap ({sl['long_cap']:,}) {sl['users_at_long_cap']:,}")
    pp = rep["popularity"]
    lines.append(f"popularity        {pp['items_with_behaviors']:,} items with behaviors; per item p50 {pp['p50_per_item']:,}  "
                 f"p90 {pp['p90_per_item']:,}  p99 {pp['p99_per_item']:,}  max {pp['max_per_item']:,}")
    if "ranking_samples" in rep:
        lines.append("")
        lines.append("ranking samples")
        for s in layout.SPLITS:
            v = rep["ranking_samples"]["splits"].get(s)
            if v:
                lines.append(f"  {s:<6} {v['rows']:>12,} rows  positive rate {v['positive_rate']:.3f}  "
                             f"sampled negatives {v['sampled_negatives']:,}  hist_len {v['min_hist_len']}..{v['max_hist_len']:,}")
        n = rep["ranking_samples"]["sampled_negatives"]
        lines.append(f"  sampled negatives: {n['written']:,} of {n['expected']:,} drawn ({n['dropped_same_item']:,} hit the positive's item and were dropped)")
    if "retrieval_samples" in rep:
        lines.append(f"retrieval samples {rep['retrieval_samples']}")
    lines.append("")
    lines.append("warnings" if rep["warnings"] else "warnings          none")
    lines += [f"  - {w}" for w in rep["warnings"]]
    return "\n".join(lines) + "\n"


def _plot(rep: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title, xlabel in (
        (axes[0], "sequence_length", "behaviors per user", "behaviors (log2 bins)"),
        (axes[1], "popularity", "behaviors per item", "behaviors (log2 bins)"),
    ):
        h = rep[key]["histogram_log2"]
        xs = [b["from"] for b in h]
        ax.bar(range(len(h)), [b["count"] for b in h], color="#4472c4")
        ax.set_xticks(range(len(h)))
        ax.set_xticklabels([f"{x:,}" for x in xs], rotation=60, fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("users" if key == "sequence_length" else "items")
        ax.set_title(title)
    sl = rep["sequence_length"]
    axes[0].text(0.98, 0.95, f"p50 {sl['p50']}  p99 {sl['p99']}  max {sl['max']:,}", transform=axes[0].transAxes,
                 ha="right", va="top", fontsize=8)
    fig.suptitle(f"{rep.get('dataset')}: sequence lengths and item popularity")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(rep: dict[str, Any], directory: str, *, plot: bool = True) -> None:
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/validation.json", "w") as f:
        f.write(json.dumps(rep, indent=2) + "\n")
    with fs.open(f"{root}/validation.txt", "w") as f:
        f.write(summary_text(rep))
    if plot:
        with fs.open(f"{root}/validation.png", "wb") as f:
            f.write(_plot(rep))
