"""Typed configuration of the feature jobs (pure dataclasses; no pyspark import).

Built at the edge by `jobs/build_features.py` with `features.config.load_config`
(YAML + ``key.sub=value`` overrides), e.g.::

    cascade build-features --dataset data/ml-1m --out features/ml-1m \\
        sequence.long_cap=2000 ranking.negatives_per_positive=8 split.valid_quantile=0.85
"""
from __future__ import annotations

from dataclasses import dataclass, field

from features.schema import EVENT_TYPE_NAMES, EventType
from features.sequence import SequenceConfig
from features.transforms import StatsConfig


@dataclass(frozen=True)
class SparkConfig:
    master: str | None = "local[*]"  # None: the master spark-submit was given
    app_name: str = "cascade-build-features"
    shuffle_partitions: int = 8
    driver_memory: str = "4g"  # local mode only (the JVM starts with it); spark-submit sets its own
    # Local mode only: extra JVM flags. "-XX:TieredStopAtLevel=1" (C1-only JIT) halves small builds on
    # 2 cores (ML-100K 65 s -> 36 s) but doubles cache/Parquet encoding at 3M+ events; default: none.
    driver_java_options: str = ""
    log_level: str = "ERROR"
    conf: dict[str, str] = field(default_factory=dict)  # any extra spark.* settings

    def __post_init__(self) -> None:
        if self.shuffle_partitions <= 0:
            raise ValueError(f"spark.shuffle_partitions must be positive, got {self.shuffle_partitions}")
        levels = ("ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF")
        if self.log_level.upper() not in levels:
            raise ValueError(f"spark.log_level {self.log_level!r} is not one of {levels}")


@dataclass(frozen=True)
class RankingConfig:
    """Which events become ranking samples and how positive-only ones get negatives."""

    event_types: tuple[str, ...] = EVENT_TYPE_NAMES  # events that are samples (with their observed label)
    # Positive-only event types (implicit feedback): each positive gets sampled negatives.
    sampled_negative_event_types: tuple[str, ...] = ("interaction",)
    negatives_per_positive: int = 4
    popularity_alpha: float = 0.75  # negatives ~ (train-window behavior count) ** alpha
    sampler_slots: int = 1 << 20  # resolution of the sampling table (probabilities are multiples of 1/slots)
    seed: int = 0

    def __post_init__(self) -> None:
        for t in self.event_types + self.sampled_negative_event_types:
            EventType.parse(t)
        missing = set(self.sampled_negative_event_types) - set(self.event_types)
        if missing:
            raise ValueError(f"ranking.sampled_negative_event_types {sorted(missing)} must also be in ranking.event_types")
        if self.negatives_per_positive < 0:
            raise ValueError(f"ranking.negatives_per_positive must be >= 0, got {self.negatives_per_positive}")
        if self.popularity_alpha < 0:
            raise ValueError(f"ranking.popularity_alpha must be >= 0, got {self.popularity_alpha}")
        if not 1 <= self.sampler_slots <= 1 << 28:
            raise ValueError(f"ranking.sampler_slots must be in [1, 2**28], got {self.sampler_slots}")


@dataclass(frozen=True)
class SplitConfig:
    """Ranking: a global time split. Retrieval: leave-one-out per user (last = test, second last = valid)."""

    valid_quantile: float = 0.8  # train: ts < q80 of sample timestamps
    test_quantile: float = 0.9  # valid: q80 <= ts < q90, test: ts >= q90
    valid_start_ms: int | None = None  # explicit cuts override the quantiles (exactly reproducible)
    test_start_ms: int | None = None
    quantile_accuracy: int = 100_000  # percentile_approx accuracy (relative rank error 1/accuracy)
    min_behaviors_for_holdout: int = 3  # users with fewer behaviors keep all of them in retrieval train

    def __post_init__(self) -> None:
        if not 0.0 < self.valid_quantile <= self.test_quantile <= 1.0:
            raise ValueError(
                f"split quantiles must satisfy 0 < valid_quantile <= test_quantile <= 1, "
                f"got {self.valid_quantile}, {self.test_quantile}"
            )
        if (self.valid_start_ms is None) != (self.test_start_ms is None):
            raise ValueError("split.valid_start_ms and split.test_start_ms must be given together")
        if self.valid_start_ms is not None and self.test_start_ms is not None and self.valid_start_ms > self.test_start_ms:
            raise ValueError(f"split.valid_start_ms={self.valid_start_ms} is after split.test_start_ms={self.test_start_ms}")
        if self.min_behaviors_for_holdout < 3:
            raise ValueError(f"split.min_behaviors_for_holdout must be >= 3, got {self.min_behaviors_for_holdout}")


def _default_buckets() -> dict[str, int]:
    return {"user_id": 1 << 20, "item_id": 1 << 20, "category": 1 << 12, "tag": 1 << 16}


@dataclass(frozen=True)
class ReportConfig:
    # Embedding-table sizes to report hash-bucket coverage and collision rates against.
    hash_buckets: dict[str, int] = field(default_factory=_default_buckets)
    plot: bool = True

    def __post_init__(self) -> None:
        for k, v in self.hash_buckets.items():
            if v <= 0:
                raise ValueError(f"report.hash_buckets.{k} must be positive, got {v}")


@dataclass(frozen=True)
class OutputConfig:
    max_records_per_file: int = 1_000_000  # more files = finer splitting across training ranks
    parquet_block_bytes: int = 32 << 20  # row-group size
    compression: str = "zstd"

    def __post_init__(self) -> None:
        if self.max_records_per_file <= 0 or self.parquet_block_bytes <= 0:
            raise ValueError("output.max_records_per_file and output.parquet_block_bytes must be positive")


@dataclass(frozen=True)
class FeatureBuildConfig:
    sequence: SequenceConfig = SequenceConfig()
    stats: StatsConfig = StatsConfig()
    ranking: RankingConfig = RankingConfig()
    split: SplitConfig = SplitConfig()
    report: ReportConfig = ReportConfig()
    output: OutputConfig = OutputConfig()
    spark: SparkConfig = SparkConfig()
