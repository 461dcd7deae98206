"""The retriever's view of a features directory, through the shared reader (features.reader.FeatureStore).

* training batches: `FeatureStore.retrieval_batches("train", ...)`, every user's
  leave-one-out training prefix (last max_len + 1 behaviors) as history = items[:-1],
  candidates = items[1:], candidate_dense = [logq]; shuffled per epoch, each rank
  its own users (with several ranks the reader yields equal numbers of full batches);
* evaluation batches: `retrieval_batches("valid" | "test")` (history before the
  target, one candidate = the target) plus what to mask: the user's training
  prefix (`FeatureStore.train_items`) and the history itself (for `test` it holds
  the valid item), i.e. everything the user interacted with before the target.
  Every rank reads the whole split and keeps every world_size-th batch, so no
  user is dropped from the metrics;
* the catalog: every item that occurs in a timeline (ML-1M: 3,706; Beauty:
  12,101 — the published protocol's item sets), with the reader's candidate
  features and logq.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from features.batch import HIST_ITEM_ID, Batch, make_kjt
from features.reader import FeatureStore, ReaderConfig
from features.train.loop import reader_batches_per_rank
from retrieval.catalog import Catalog, validate_catalog
from retrieval.config import RetrieverConfig
from retrieval.evaluate import EvalBatch


def build_catalog(store: FeatureStore) -> Catalog:
    """Every item of the timelines, with its candidate features (the reader's layout) and logq."""
    ids = np.unique(store.timeline_values["item_id"]).astype(np.int64)
    features, found = store.candidate_features(ids), store.items.rows(ids)[1]
    if not found.all():
        missing = ids[~found]
        raise ValueError(f"{store.root}: {len(missing)} item(s) of the timelines are missing from the items "
                         f"table, e.g. {missing[:5].tolist()}: the features directory is inconsistent (rebuild it)")
    logq = torch.from_numpy(store.logq(ids).astype(np.float32))
    return validate_catalog(Catalog(ids, make_kjt(features, stride=len(ids)), logq))


class FeatureStoreData:
    """`retrieval.train.RetrievalData` over a FeatureStore (`features.train.loop.TrainData`)."""

    def __init__(self, store: FeatureStore, cfg: RetrieverConfig) -> None:
        self.store = store
        self.max_len = cfg.model.user.max_len
        self.train_cfg = ReaderConfig(batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                      holdout_tail=cfg.train.holdout_tail)
        self.eval_cfg = ReaderConfig(batch_size=cfg.eval.batch_size, shuffle=False)
        self.catalog = build_catalog(store)

    def train_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        return self.store.retrieval_batches("train", self.train_cfg, self.max_len, epoch=epoch, rank=rank,
                                            world_size=world_size)

    def num_train_batches(self, rank: int, world_size: int) -> int:
        users = int((self.store.retrieval_train_ends(self.train_cfg.holdout_tail) >= 2).sum())
        return reader_batches_per_rank(users, self.train_cfg.batch_size, world_size)

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[EvalBatch]:
        for i, batch in enumerate(self.store.retrieval_batches(split, self.eval_cfg, self.max_len)):
            if i % world_size != rank:
                continue
            users = batch.user_ids().numpy()
            train_items, train_len = self.store.train_items(users)
            hist = batch.history[HIST_ITEM_ID]
            items = np.concatenate([train_items, hist.values().numpy()])
            owner = np.concatenate([np.repeat(np.arange(len(users)), train_len),
                                    np.repeat(np.arange(len(users)), hist.lengths().numpy())])
            yield EvalBatch(batch, torch.from_numpy(items.astype(np.int64)), torch.from_numpy(owner.astype(np.int64)))


def open_data(features: Path, cfg: RetrieverConfig) -> FeatureStoreData:
    return FeatureStoreData(FeatureStore(features), cfg)
