"""Training data of the second stage: the retriever's candidate lists (`features.candidate_lists`) as batches.

A request's batch row is the user as of the request (history ``timeline[:hist_len]``
capped to what the model reads, user attributes), its N candidates with their
item features and `list_features` (retriever logit, log rank, gap to the top)
as `candidate_dense`, and label 1 on the target. The ranker trains listwise
(`loss.kind = listwise`) with `model.residual_column = 0`.

Training keeps the lists that hold their target (a list without it carries no
signal for a softmax over the list); evaluation keeps every request, so the list
HR/NDCG it reports is the two-stage system's (a target the retriever missed is a
miss).

    data = ListRankingData(store, {"train": train_lists, "valid": valid_lists, "test": test_lists},
                           history_cap=200, lists_per_batch=16)
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from features.batch import Batch, build_batch
from features.candidate_lists import LIST_FEATURE_NAMES, CandidateLists, list_features


class ListRankingData:
    """`ranking.train.RankingData` over candidate lists (see the module docstring)."""

    user_dense_dim = 0
    candidate_dense_dim = len(LIST_FEATURE_NAMES)

    def __init__(self, store: Any, splits: Mapping[str, CandidateLists], history_cap: int, lists_per_batch: int,
                 seed: int = 0) -> None:
        missing = {"train", "valid", "test"} - set(splits)
        if missing:
            raise ValueError(f"ListRankingData needs train/valid/test lists, missing {sorted(missing)}")
        if history_cap <= 0 or lists_per_batch <= 0:
            raise ValueError(f"history_cap and lists_per_batch must be positive, got {history_cap}, {lists_per_batch}")
        train = splits["train"]
        self.splits = {"train": train.take(np.flatnonzero(train.hit())), "valid": splits["valid"],
                       "test": splits["test"]}
        if len(self.splits["train"]) == 0:
            raise ValueError("ListRankingData: no training list holds its target")
        self.store, self.cap, self.per_batch, self.seed = store, history_cap, lists_per_batch, seed

    def batch(self, lists: CandidateLists) -> Batch:
        hist, lens = self.store.history(lists.user_ids, lists.hist_len, self.cap)
        r, n = lists.items.shape
        ts = self.store.timeline_values["ts_ms"]
        rows, _ = self.store.timeline_users.rows(lists.user_ids)
        last = self.store.timeline_offsets[rows] + np.maximum(lists.hist_len - 1, 0)
        return build_batch(user=self.store.user_features(lists.user_ids), history=hist, history_lengths=lens,
                           candidates=self.store.candidate_features(lists.items.ravel()),
                           num_candidates=np.full(r, n, np.int64),
                           request_ts=ts[last] + 1,  # just after the last behavior the request sees
                           user_dense=np.zeros((r, 0), np.float32), candidate_dense=list_features(lists.logits),
                           labels=lists.labels().reshape(r * n, 1))

    def num_train_batches(self, rank: int, world_size: int) -> int:
        return len(self.splits["train"]) // self.per_batch // world_size

    def train_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.splits["train"]))[rank::world_size]
        for i in range(self.num_train_batches(rank, world_size)):
            yield self.batch(self.splits["train"].take(order[i * self.per_batch:(i + 1) * self.per_batch]))

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[Batch]:
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        lists = self.splits[split]
        for j, s in enumerate(range(0, len(lists), self.per_batch)):
            if j % world_size == rank:
                yield self.batch(lists.take(np.arange(s, min(s + self.per_batch, len(lists)))))
