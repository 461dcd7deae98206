"""Data sources of the training loop (`ranking.train.RankingData`).

* `InMemoryRankingData`: ready `Batch`es per split (tests, the synthetic
  long-sequence benchmark);
* `FeatureStoreRankingData`: the shared feature reader (`features.reader`) over a
  `cascade build-features` output, i.e. what `cascade train-ranker` trains on.

Both shard by rank the same way: every rank gets an equal number of training
batches per epoch (sharded modules run collectives every step), evaluation
batches are dealt round-robin and the loop pads the shorter ranks.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from features.batch import Batch
from features.train.loop import reader_batches_per_rank
from ranking.config import DataConfig, ModelConfig


class InMemoryRankingData:
    """Batches held in memory, one list per split. Training order is reshuffled every epoch (seeded)."""

    def __init__(self, train: Sequence[Batch], valid: Sequence[Batch], test: Sequence[Batch], seed: int = 0) -> None:
        if not train:
            raise ValueError("InMemoryRankingData: the train split has no batches")
        self.splits = {"train": list(train), "valid": list(valid), "test": list(test)}
        self.seed = seed
        first = self.splits["train"][0]
        self.user_dense_dim = int(first.user_dense.shape[1])
        self.candidate_dense_dim = int(first.candidate_dense.shape[1])

    def num_train_batches(self, rank: int, world_size: int) -> int:
        return len(self.splits["train"]) // world_size

    def train_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.splits["train"]))
        n = self.num_train_batches(rank, world_size)
        for i in order[rank::world_size][:n]:
            yield self.splits["train"][int(i)]

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[Batch]:
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        yield from self.splits[split][rank::world_size]


class FeatureStoreRankingData:
    """Ranking samples of a features directory through the shared reader (`features.reader.FeatureStore`).

    Training: the reader's rank shards (equal batch counts on every rank). Evaluation:
    every row of the split, batches dealt round-robin to the ranks (the loop pads
    the ranks that get one batch fewer), so no sample is dropped from a metric.
    """

    def __init__(self, cfg: DataConfig, model: ModelConfig) -> None:
        from features.reader import FeatureStore, ReaderConfig

        if not cfg.features_dir:
            raise ValueError("data.features_dir is not set (a `cascade build-features` output directory)")
        self.store = FeatureStore(cfg.features_dir)
        check_features(model, self.store.user_keys, self.store.candidate_keys, cfg.features_dir)
        cap = min(model.sequence.history_len, self.store.long_cap)
        self.train_cfg = ReaderConfig(batch_size=cfg.batch_size, shuffle=True, seed=cfg.shuffle_seed, long_cap=cap,
                                      shuffle_buffer_rows=cfg.shuffle_buffer_rows, validate=cfg.validate)
        self.eval_cfg = ReaderConfig(batch_size=cfg.eval_batch_size, shuffle=False, long_cap=cap, validate=cfg.validate)
        self.user_dense_dim = len(self.store.user_dense_names)
        self.candidate_dense_dim = len(self.store.candidate_dense_names)

    def num_train_batches(self, rank: int, world_size: int) -> int:
        return reader_batches_per_rank(self.store.num_ranking_rows("train"), self.train_cfg.batch_size, world_size)

    def train_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        return self.store.ranking_batches("train", self.train_cfg, epoch=epoch, rank=rank, world_size=world_size)

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[Batch]:
        for i, b in enumerate(self.store.ranking_batches(split, self.eval_cfg)):
            if i % world_size == rank:
                yield b


def check_features(model: ModelConfig, user_keys: Sequence[str], candidate_keys: Sequence[str], where: str) -> None:
    """The model's pooled features must exist in the data; the error names the missing ones and what exists."""
    e = model.embedding
    for group, want, have in (("user_features", e.user_features, user_keys),
                              ("candidate_features", e.candidate_features, candidate_keys)):
        missing = [f for f in want if f not in have]
        if missing:
            raise ValueError(f"model.embedding.{group} lists {missing}, which {where} does not have "
                             f"(it has {list(have)})")


def open_ranking_data(cfg: DataConfig, model: ModelConfig) -> FeatureStoreRankingData:
    """The training data of `cascade train-ranker`."""
    return FeatureStoreRankingData(cfg, model)
