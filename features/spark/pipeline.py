"""`build_features`: every feature job over one canonical dataset, or any subset of them.

Stages, in order (each writes one output of `features.layout`; `only` runs a
subset and computes what it needs from the input, lazily, in the JVM):

    events             validate + deduplicate events -> quarantine/; as-of user columns (cached)
    items, users       item / user feature tables
    timelines          full chronological behavior arrays per user
    sequences          last long_cap / short_cap behaviors per user (serving state)
    popularity         train counts, logQ, negative-sampler probabilities per item
    retrieval_samples  leave-one-out next-item targets with hist_len and logq
    ranking_samples    point-in-time samples, sampled negatives, as-of counters, time split
    stats              latest user/item counters (serving bootstrap)
    report             validation.json / .txt / .png

Nothing is collected to the driver except aggregates (counts, cut
timestamps, histograms, attribute key names). The manifest is rewritten after
every stage, so an interrupted build says what it finished.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import fsspec
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from features import layout
from features.config import to_dict
from features.datasets.common import DATASET_MANIFEST
from features.hashing import HASH_SPEC_VERSION
from features.schema import SCHEMA_VERSION
from features.spark import events as ev
from features.spark import report as rep
from features.spark import samples as smp
from features.spark.config import FeatureBuildConfig
from features.spark.sequences import build_sequences, build_timelines
from features.spark.stats import latest_counters, with_user_asof
from features.spark.tables import TableInfo, build_items, build_users
from features.transforms import counter_columns

STAGES: tuple[str, ...] = (
    "events", "items", "users", "timelines", "sequences", "popularity",
    "retrieval_samples", "ranking_samples", "stats", "report",
)
# progress(stage, index (1-based), total, status "start"|"done", seconds, rows)
ProgressFn = Callable[[str, int, int, str, float, dict[str, int]], None]


@dataclass
class StageResult:
    name: str
    seconds: float
    rows: dict[str, int]
    path: str | None


@dataclass
class BuildResult:
    out: str
    manifest: dict[str, Any]
    stages: list[StageResult] = field(default_factory=list)
    report: dict[str, Any] | None = None


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, p = fsspec.core.url_to_fs(path)
    return fs, p


def _read_json(path: str) -> dict[str, Any] | None:
    fs, p = _fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "r") as f:
        return json.load(f)


def _write_text(path: str, text: str) -> None:
    fs, p = _fs(path)
    fs.makedirs(fs._parent(p), exist_ok=True)
    with fs.open(p, "w") as f:
        f.write(text)


def config_digest(cfg: FeatureBuildConfig) -> str:
    """sha256 of the config that shapes the outputs (the Spark runtime settings excluded)."""
    d = to_dict(cfg)
    d.pop("spark", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def input_digest(dataset: str) -> dict[str, Any]:
    """sha256 over the input manifest and (for local inputs) every input file's bytes."""
    fs, root = _fs(dataset)
    h = hashlib.sha256()
    files = 0
    total = 0
    for table in ("events", "items", "users"):
        if not fs.exists(f"{root}/{table}"):
            continue
        for p in sorted(fs.find(f"{root}/{table}")):
            if not p.endswith(".parquet"):
                continue
            h.update(p[len(root):].encode())
            with fs.open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    total += len(block)
            files += 1
    m = f"{root}/{layout.MANIFEST}"
    if fs.exists(m):
        with fs.open(m, "rb") as f:
            h.update(f.read())
    return {"sha256": h.hexdigest(), "files": files, "bytes": total}


class _Build:
    """The lazily computed intermediates of one build (each computed at most once)."""

    def __init__(self, spark: SparkSession, dataset: str, out: str, cfg: FeatureBuildConfig) -> None:
        self.spark, self.dataset, self.out, self.cfg = spark, dataset.rstrip("/"), out.rstrip("/"), cfg
        self._cache: dict[str, Any] = {}
        self.written: set[str] = set()
        self.persisted: list[DataFrame] = []

    def path(self, output: str) -> str:
        return f"{self.out}/{output}"

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def remember(self, key: str, value: Any) -> None:
        self._cache[key] = value

    def forget(self, key: str) -> None:
        """Drops a lazily built intermediate, e.g. to read a just-written output back instead."""
        self._cache.pop(key, None)

    def _persist(self, df: DataFrame) -> DataFrame:
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        self.persisted.append(df)
        return df

    # -- inputs --
    @property
    def raw_events(self) -> DataFrame:
        return self._once("raw_events", lambda: ev.read_table(self.spark, self.dataset, "events"))

    @property
    def raw_items(self) -> DataFrame:
        return self._once("raw_items", lambda: ev.read_table(self.spark, self.dataset, "items"))

    @property
    def raw_users(self) -> DataFrame:
        return self._once("raw_users", lambda: ev.read_table(self.spark, self.dataset, "users"))

    @property
    def checked(self) -> ev.CheckedEvents:
        return self._once("checked", lambda: ev.check_events(self.raw_events))

    @property
    def input_counts(self) -> dict[str, Any]:
        """Input rows, invalid rows by reason and duplicates (raw - invalid - valid): no extra shuffle."""
        def make() -> dict[str, Any]:
            rows, invalid = ev.count_invalid(self.raw_events)
            dups = rows - sum(invalid.values()) - self.summary["events"]
            by_reason = dict(invalid, **({"duplicate_event_id": dups} if dups else {}))
            return {"rows": rows, "by_reason": by_reason, "duplicates": dups}

        return self._once("input_counts", make)

    @property
    def items(self) -> tuple[DataFrame, TableInfo]:
        return self._once("items", lambda: build_items(self.raw_items))

    @property
    def users(self) -> tuple[DataFrame, TableInfo]:
        return self._once("users", lambda: build_users(self.raw_users))

    @property
    def item_category(self) -> DataFrame:
        return self.items[0].select("item_id", "category")

    @property
    def events(self) -> DataFrame:
        """Valid events + category/action/indicators + hist_len, out_of_order and user counters (cached)."""
        return self._once("events", lambda: self._persist(
            with_user_asof(ev.enrich(self.checked.valid, self.item_category, self.cfg.sequence, self.cfg.stats), self.cfg.stats)
        ))

    @property
    def summary(self) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            r = self.events.agg(
                F.count(F.lit(1)).alias("events"),
                F.min("ts_ms").alias("min_ts"),
                F.max("ts_ms").alias("max_ts"),
                F.sum("is_beh").alias("behaviors"),
                F.sum(F.col("out_of_order").cast("long")).alias("out_of_order"),
                smp.cut_aggregate(self.cfg.ranking, self.cfg.split).alias("cuts"),  # same pass
            ).first()
            if not r["events"]:
                raise ValueError(f"{self.dataset}/events has no valid events (see {self.path(layout.QUARANTINE)})")
            out = {k: int(r[k] or 0) for k in ("events", "min_ts", "max_ts", "behaviors", "out_of_order")}
            out["cuts"] = r["cuts"]
            return out

        return self._once("summary", make)

    @property
    def cuts(self) -> smp.SplitCuts:
        return self._once("cuts", lambda: smp.cuts_from(self.summary["cuts"], self.cfg.ranking, self.cfg.split))

    @property
    def timelines(self) -> DataFrame:
        def make() -> DataFrame:
            if layout.TIMELINES in self.written:
                return self.spark.read.parquet(self.path(layout.TIMELINES))
            return build_timelines(self.events, self.cfg.split.min_behaviors_for_holdout)

        return self._once("timelines", make)

    @property
    def sampler(self) -> DataFrame:
        return self._once(
            "sampler", lambda: smp.sampler_items(self.events, self.item_category, self.cuts, self.cfg.ranking)
        )

    @property
    def retrieval_total(self) -> int:
        return self._once("retrieval_total", lambda: smp.retrieval_train_total(self.timelines))

    @property
    def popularity(self) -> DataFrame:
        def make() -> DataFrame:
            if layout.POPULARITY in self.written:
                return self.spark.read.parquet(self.path(layout.POPULARITY))
            return smp.popularity(self.timelines, self.sampler, self.retrieval_total)

        return self._once("popularity", make)

    def unpersist(self) -> None:
        for df in self.persisted:
            df.unpersist()
        self.persisted.clear()


def _writer(df: DataFrame, b: _Build, by_split: bool):
    o = b.cfg.output
    w = (
        df.write.mode("overwrite")
        .option("compression", o.compression)
        .option("maxRecordsPerFile", o.max_records_per_file)
        .option("parquet.block.size", o.parquet_block_bytes)
    )
    return w.partitionBy(layout.SPLIT_COLUMN) if by_split else w


def _write(b: _Build, df: DataFrame, output: str, by_split: bool = False, extra: list | None = None) -> dict[str, int]:
    """Writes `df` as Parquet to the output's path; row counts (per split if split) and any `extra`
    aggregates are observed during the write itself (`DataFrame.observe`), not by reading it back."""
    if by_split:
        metrics = [F.sum((F.col(layout.SPLIT_COLUMN) == F.lit(s)).cast("long")).alias(s) for s in layout.SPLITS]
    else:
        metrics = [F.count(F.lit(1)).alias("rows")]
    metrics += extra or []
    obs = Observation(f"rows_{output.replace('/', '_')}")
    _writer(df.observe(obs, *metrics), b, by_split).parquet(b.path(output))
    b.written.add(output)
    return {k: int(v or 0) for k, v in obs.get.items()}


Rows = dict[str, dict[str, int]]  # output -> row counts


def _stage_events(b: _Build) -> Rows:
    b.summary  # materializes the cached events (validation, dedup, as-of user columns)
    counts = b.input_counts
    quarantine = b.checked.quarantine(with_duplicates=counts["duplicates"] > 0)
    return {layout.QUARANTINE: _write(b, quarantine, layout.QUARANTINE)}


def _stage_items(b: _Build) -> Rows:
    return {layout.ITEMS: _write(b, b.items[0], layout.ITEMS)}


def _stage_users(b: _Build) -> Rows:
    return {layout.USERS: _write(b, b.users[0], layout.USERS)}


def _stage_timelines(b: _Build) -> Rows:
    train_targets = F.sum(F.greatest(F.col("retrieval_train_len") - 1, F.lit(0))).alias("retrieval_train_targets")
    rows = _write(b, build_timelines(b.events, b.cfg.split.min_behaviors_for_holdout), layout.TIMELINES,
                  extra=[train_targets])
    b.remember("retrieval_total", rows.pop("retrieval_train_targets"))  # observed during the write
    b.forget("timelines")  # later stages read the written timelines back
    return {layout.TIMELINES: rows}


def _stage_sequences(b: _Build) -> Rows:
    return {layout.SEQUENCES: _write(b, build_sequences(b.timelines, b.cfg.sequence), layout.SEQUENCES)}


def _stage_popularity(b: _Build) -> Rows:
    rows = _write(b, smp.popularity(b.timelines, b.sampler, b.retrieval_total), layout.POPULARITY)
    b.forget("popularity")
    return {layout.POPULARITY: rows}


def _stage_retrieval(b: _Build) -> Rows:
    df = smp.retrieval_samples(b.timelines, b.popularity, b.retrieval_total)
    return {layout.RETRIEVAL_SAMPLES: _write(b, df, layout.RETRIEVAL_SAMPLES, by_split=True)}


def _stage_ranking(b: _Build) -> Rows:
    df = smp.ranking_samples(b.events, b.sampler, b.cuts, b.cfg.ranking, b.cfg.stats)
    return {layout.RANKING_SAMPLES: _write(b, df, layout.RANKING_SAMPLES, by_split=True)}


def _stage_stats(b: _Build) -> Rows:
    as_of = b.summary["max_ts"] + 1
    return {
        layout.STATS_USERS: _write(b, latest_counters(b.events, "user_id", "user", b.cfg.stats, as_of), layout.STATS_USERS),
        layout.STATS_ITEMS: _write(b, latest_counters(b.events, "item_id", "item", b.cfg.stats, as_of), layout.STATS_ITEMS),
    }


def _stage_report(b: _Build, manifest: dict[str, Any]) -> tuple[Rows, dict[str, Any]]:
    def existing(output: str) -> DataFrame | None:
        fs, p = _fs(b.path(output))
        return b.spark.read.parquet(b.path(output)) if fs.exists(p) else None

    inputs = rep.ReportInputs(
        raw_events=b.raw_events, events=b.events, input_counts=b.input_counts,
        raw_items=b.raw_items, raw_users=b.raw_users, items=b.items[0], users=b.users[0], timelines=b.timelines,
        ranking_samples=existing(layout.RANKING_SAMPLES), retrieval_samples=existing(layout.RETRIEVAL_SAMPLES),
        summary=b.summary, manifest=manifest, cfg=b.cfg,
    )
    report = rep.build_report(inputs)
    rep.write_report(report, b.path(layout.REPORT), plot=b.cfg.report.plot)
    return {}, report


_RUNNERS: dict[str, Callable[[_Build], Rows]] = {
    "events": _stage_events,
    "items": _stage_items,
    "users": _stage_users,
    "timelines": _stage_timelines,
    "sequences": _stage_sequences,
    "popularity": _stage_popularity,
    "retrieval_samples": _stage_retrieval,
    "ranking_samples": _stage_ranking,
    "stats": _stage_stats,
}


def _prepare_out(out: str, cfg: FeatureBuildConfig, digest: dict[str, Any], full: bool, overwrite: bool) -> dict | None:
    """Checks the output directory; returns the previous manifest when a partial build may update it."""
    fs, root = _fs(out)
    previous = _read_json(f"{out}/{layout.MANIFEST}")
    if fs.exists(root) and fs.ls(root) and not overwrite:
        if previous is None:
            raise FileExistsError(f"{out} is not empty and has no {layout.MANIFEST}; pass --overwrite to replace it")
        if full:
            raise FileExistsError(f"{out} already holds a feature build; pass --overwrite to rebuild it")
        if previous.get("config_sha256") != config_digest(cfg):
            raise ValueError(
                f"{out} was built with another configuration; a partial build (--only) must use the same one "
                f"(or rebuild everything with --overwrite)"
            )
        if previous.get("input", {}).get("sha256") != digest["sha256"]:
            raise ValueError(f"{out} was built from other input data; rebuild everything with --overwrite")
        return previous
    if overwrite and fs.exists(root):
        for name in (*layout.OUTPUTS, "stats", layout.REPORT, layout.MANIFEST):
            p = f"{root}/{name}"
            if fs.exists(p):
                fs.rm(p, recursive=True)
    fs.makedirs(root, exist_ok=True)
    return None


def build_features(
    spark: SparkSession,
    dataset: str | Path,
    out: str | Path,
    cfg: FeatureBuildConfig = FeatureBuildConfig(),
    *,
    only: tuple[str, ...] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> BuildResult:
    """Runs the feature jobs on canonical `dataset` into `out` (see the module docstring).

    `only`: stage names to run (default: all). Returns the manifest and per-stage timings.
    """
    dataset, out = str(dataset), str(out)
    selected = STAGES if not only else tuple(s for s in STAGES if s in set(only))
    unknown = sorted(set(only or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are: {', '.join(STAGES)}")
    in_manifest = _read_json(f"{dataset.rstrip('/')}/{DATASET_MANIFEST}")
    if in_manifest is None:
        raise FileNotFoundError(f"no {DATASET_MANIFEST} in {dataset}: is it a canonical dataset directory (cascade data import|synth)?")
    digest = input_digest(dataset)
    previous = _prepare_out(out, cfg, digest, full=selected == STAGES, overwrite=overwrite)
    b = _Build(spark, dataset, out, cfg)
    manifest: dict[str, Any] = previous or {
        "feature_set_version": layout.FEATURE_SET_VERSION,
        "schema_version": SCHEMA_VERSION,
        "hash_spec_version": HASH_SPEC_VERSION,
        "config": to_dict(cfg),
        "config_sha256": config_digest(cfg),
        "input": {
            "path": dataset,
            "dataset": in_manifest.get("dataset"),
            "timestamps": in_manifest.get("timestamps"),
            "tables": {k: v.get("rows") for k, v in in_manifest.get("tables", {}).items()},
            "time_range": in_manifest.get("time_range"),
            **digest,
        },
        "outputs": {},
        "timings_s": {},
    }
    manifest["spark"] = {"version": spark.version, "master": spark.sparkContext.master}
    manifest["updated_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = BuildResult(out=out, manifest=manifest)
    try:
        for i, name in enumerate(selected, start=1):
            if progress:
                progress(name, i, len(selected), "start", 0.0, {})
            t0 = time.perf_counter()
            if name == "report":
                rows, result.report = _stage_report(b, manifest)
                manifest["report"] = {
                    "path": layout.REPORT, "files": ["validation.json", "validation.txt"]
                    + (["validation.png"] if cfg.report.plot else []),
                    "warnings": result.report["warnings"],
                }
            else:
                rows = _RUNNERS[name](b)
                _record(b, manifest, name)
            secs = time.perf_counter() - t0
            for o, r in rows.items():
                manifest["outputs"][o] = {"path": o, "rows": r}
            manifest["timings_s"][name] = round(secs, 3)
            _write_text(f"{out}/{layout.MANIFEST}", json.dumps(manifest, indent=2) + "\n")
            flat = {f"{o}.{k}" if len(rows) > 1 or k != "rows" else o: v for o, r in rows.items() for k, v in r.items()}
            if name == "events":
                flat = {"valid_events": b.summary["events"], **flat}
            if name == "report" and result.report is not None:
                flat = {"warnings": len(result.report["warnings"])}
            path = f"{out}/{next(iter(rows))}" if rows else f"{out}/{layout.REPORT}"
            result.stages.append(StageResult(name, secs, flat, path))
            if progress:
                progress(name, i, len(selected), "done", secs, flat)
    finally:
        b.unpersist()
    return result


def _record(b: _Build, manifest: dict[str, Any], stage: str) -> None:
    """Stage facts the reader and the server need, recorded in the manifest."""
    cfg = b.cfg
    if stage == "events":
        s = b.summary
        manifest["time_range"] = {
            "min_ts_ms": s["min_ts"], "max_ts_ms": s["max_ts"], "snapshot_end_ms": s["max_ts"] + 1,
        }
        c = b.input_counts
        manifest["events"] = {
            "input": c["rows"], "valid": s["events"], "behaviors": s["behaviors"], "quarantined": c["by_reason"],
            "duplicates": c["duplicates"], "out_of_order": s["out_of_order"],
        }
    if stage in ("items", "users"):
        info = b.items[1] if stage == "items" else b.users[1]
        manifest.setdefault("tables", {})[stage] = {
            "attribute_keys": list(info.attribute_keys), "numeric_keys": list(info.numeric_keys),
        }
    if stage in ("items", "ranking_samples", "popularity"):
        manifest.setdefault("dense", {})["item_numeric_keys"] = list(b.items[1].numeric_keys)
    if stage in ("popularity", "ranking_samples"):
        c = b.cuts
        manifest["splits"] = {
            "ranking": {"valid_start_ms": c.valid_start_ms, "test_start_ms": c.test_start_ms, "method": c.method},
            "retrieval": {
                "method": "leave-one-out per user: last behavior = test, second last = valid, rest = train",
                "min_behaviors_for_holdout": cfg.split.min_behaviors_for_holdout,
            },
        }
    if stage == "ranking_samples":
        r = (
            b.events.filter((F.col("ts_ms") < F.lit(b.cuts.valid_start_ms)) & (F.col("is_cnt") == 1))
            .agg(F.count(F.lit(1)).alias("n"), F.sum("is_pos").alias("p")).first()
        )
        n, p = int(r["n"] or 0), int(r["p"] or 0)
        manifest.setdefault("dense", {})["prior_rate"] = p / n if n else 0.0
        manifest["dense"]["counted_train_events"] = n
        manifest["dense"]["user_counters"] = list(counter_columns("user", cfg.stats))
        manifest["dense"]["item_counters"] = list(counter_columns("item", cfg.stats))
    if stage == "retrieval_samples":
        manifest["retrieval"] = {"train_targets": b.retrieval_total, "unseen_logq": smp.unseen_logq(b.retrieval_total)}
