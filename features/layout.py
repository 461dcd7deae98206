"""The on-disk layout of a features directory (written by `cascade build-features`).

Shared by the writer (`features/spark/`), the reader (`features/reader.py`),
the server (which bootstraps Redis from `sequences/`, `stats/` and loads
`items/`), and the benchmark's single-process baseline. No pyspark, no torch.

    FEATURES_DIR/manifest.json       versions, config, input checksum, rows per output, splits, timings
    FEATURES_DIR/items/              item_id, category (primary, 0 = none), categories array<long>,
                                     tags array<long>, item_attr_<key> long, num_<key> double
    FEATURES_DIR/users/              user_id, user_attr_<key> long, num_<key> double
    FEATURES_DIR/timelines/          user_id, item_id[], ts_ms[], action[], category[] (every behavior,
                                     chronological by (ts_ms, event_id)), length, retrieval_train_len
    FEATURES_DIR/sequences/          user_id, long_{item_id,ts_ms,action,category}[] (last long_cap),
                                     short_*[] (last short_cap), length, last_ts_ms: the serving state
    FEATURES_DIR/popularity/         item_id, retrieval_train_count, logq, ranking_train_count, sampler_prob
    FEATURES_DIR/ranking_samples/split=train|valid|test/
                                     sample_id, user_id, item_id, item_category, ts_ms, event_type, label,
                                     hist_len, weight, sampling_prob, is_sampled_negative,
                                     user_cnt_<w>, user_pos_<w>, item_cnt_<w>, item_pos_<w>
    FEATURES_DIR/retrieval_samples/split=train|valid|test/
                                     user_id, item_id (target), ts_ms, hist_len, logq
    FEATURES_DIR/stats/users/, stats/items/   the latest counters as of the snapshot end (as_of_ms)
    FEATURES_DIR/quarantine/         input rows that failed validation: reason, detail, raw fields
    FEATURES_DIR/report/             validation.json, validation.txt, validation.png

A sample's history is never materialized: it is ``timeline[max(0, hist_len -
long_cap) : hist_len]`` of its user (`hist_len` = behaviors strictly before
the sample's ts for ranking, the target's position for retrieval).

Hashed attribute ids use `features.hashing` spec v1 with the feature name as
the seed: ``category`` (all categories; ``category`` column = the first),
``tag``, ``item_attr_<key>``, ``user_attr_<key>``. The same names are the keys
of the batch's KeyedJaggedTensors.
"""
from __future__ import annotations

import re

FEATURE_SET_VERSION = 1
MANIFEST = "manifest.json"

ITEMS = "items"
USERS = "users"
TIMELINES = "timelines"
SEQUENCES = "sequences"
POPULARITY = "popularity"
RANKING_SAMPLES = "ranking_samples"
RETRIEVAL_SAMPLES = "retrieval_samples"
STATS_USERS = "stats/users"
STATS_ITEMS = "stats/items"
QUARANTINE = "quarantine"
REPORT = "report"

OUTPUTS: tuple[str, ...] = (
    QUARANTINE, ITEMS, USERS, TIMELINES, SEQUENCES, POPULARITY, RETRIEVAL_SAMPLES, RANKING_SAMPLES,
    STATS_USERS, STATS_ITEMS,
)
SPLITS: tuple[str, ...] = ("train", "valid", "test")
SPLIT_COLUMN = "split"

# Hash-spec feature names (the seeds of features.hashing), the same in Spark, the models and serving.
ITEM_FEATURE = "item_id"  # item ids (a model hashing them several times adds "item_id#1", ...)
CATEGORY_FEATURE = "category"  # category ids
TAG_FEATURE = "tag"
TIMELINE_FIELDS: tuple[str, ...] = ("item_id", "ts_ms", "action", "category")


def split_dir(output: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{output}/{SPLIT_COLUMN}={split}"


def sanitize_key(key: str) -> str:
    """An attribute key -> a safe column/feature suffix (letters, digits, underscore)."""
    s = re.sub(r"[^0-9A-Za-z_]", "_", key)
    if not s:
        raise ValueError(f"attribute key {key!r} has no usable characters")
    return s


def user_attr_feature(key: str) -> str:
    return f"user_attr_{sanitize_key(key)}"


def item_attr_feature(key: str) -> str:
    return f"item_attr_{sanitize_key(key)}"


def numeric_column(key: str) -> str:
    return f"num_{sanitize_key(key)}"
