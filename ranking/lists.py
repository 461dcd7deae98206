"""Training data of the second stage: the retriever's candidate lists (`features.candidate_lists`) as batches.

A request's batch row is the user as of the request (history ``timeline[:hist_len]``
capped to what the model reads, user attributes), its N candidates with their
item features and `list_features` (retriever logit, log rank, gap to the top)
as `candidate_dense` (then the point-in-time context features and, with
`retriever_vectors`, the retriever's per-dimension logit terms, with
`retriever_similarity`, the retriever-space similarities to the last behaviors, with
`item_item_history`, the item-item model's score and gap from the last behaviors: the model each
split's lists carry, fitted on what their retriever trained on), and label 1 on the target. The ranker trains listwise
(`loss.kind = listwise`) with `model.residual_column = 0`.

Training keeps the lists that hold their target (a list without it carries no
signal for a softmax over the list) and, with `train_width` > 0, samples that
many of a list's candidates per step: the target plus uniformly drawn others, in
list order, their features computed on the whole list (a sampled softmax over
the list: cheaper steps, the same expected gradient direction up to the
uniform sampling constant). Evaluation keeps every request and every candidate,
so the list HR/NDCG it reports is the two-stage system's (a target the retriever
missed is a miss).

    data = ListRankingData(store, {"train": train_lists, "valid": valid_lists, "test": test_lists},
                           history_cap=200, lists_per_batch=16)
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from features.batch import Batch, build_batch
from features.candidate_lists import CandidateLists
from features.list_context import (
    SERVE_POINT, ContextCounts, event_order, recent_items, request_points, second_stage_dense, second_stage_dense_dim,
)


class ListRankingData:
    """`ranking.train.RankingData` over candidate lists (see the module docstring)."""

    user_dense_dim = 0

    def __init__(self, store: Any, splits: Mapping[str, CandidateLists], history_cap: int, lists_per_batch: int,
                 seed: int = 0, train_width: int = 0, context: ContextCounts | None = None,
                 retriever_vectors: bool = False, retriever_similarity: int = 0, item_item_history: int = 0) -> None:
        missing = {"train", "valid", "test"} - set(splits)
        if missing:
            raise ValueError(f"ListRankingData needs train/valid/test lists, missing {sorted(missing)}")
        if history_cap <= 0 or lists_per_batch <= 0:
            raise ValueError(f"history_cap and lists_per_batch must be positive, got {history_cap}, {lists_per_batch}")
        train = splits["train"]
        self.splits = {"train": train.take(np.flatnonzero(train.hit())), "valid": splits["valid"],
                       "test": splits["test"]}
        if not 0 <= train_width <= self.splits["train"].width:
            raise ValueError(f"train_width must be in [0, {self.splits['train'].width}], got {train_width}")
        self.store, self.cap, self.per_batch, self.seed = store, history_cap, lists_per_batch, seed
        self.train_width = train_width
        self.context = context
        if retriever_similarity < 0:
            raise ValueError(f"retriever_similarity must be >= 0, got {retriever_similarity}")
        self.retrieval_products, self.retrieval_similarity = 0, retriever_similarity
        if retriever_vectors or retriever_similarity:
            lacking = [k for k, v in self.splits.items() if v.user_vectors is None or v.item_vectors is None]
            if lacking:
                raise ValueError(f"retriever_vectors / retriever_similarity: the {lacking} lists carry no retriever "
                                 f"vectors (retrieval.lists.attach_vectors)")
            dims = {k: v.user_vectors.shape[1] for k, v in self.splits.items()}
            if len(set(dims.values())) != 1:
                raise ValueError(f"retriever_vectors: the splits' retrievers differ in dimension: {dims}")
            self.retrieval_products = dims["valid"] if retriever_vectors else 0
        if item_item_history < 0:
            raise ValueError(f"item_item_history must be >= 0, got {item_item_history}")
        self.item_item_history = item_item_history
        if item_item_history:
            lacking = [k for k, v in self.splits.items() if v.item_item is None]
            if lacking:
                raise ValueError(f"item_item_history: the {lacking} lists carry no item-item model "
                                 f"(CandidateLists.with_item_item; jobs.second_stage.fit_item_item)")
        self.candidate_dense_dim = second_stage_dense_dim(context is not None, self.retrieval_products,
                                                          retriever_similarity, item_item_history > 0)
        self._order = (event_order(store.timeline_values["ts_ms"], int(store.timeline_offsets[-1]))
                       if context is not None else None)

    @classmethod
    def for_ranker(cls, store: Any, lists: CandidateLists, ranker: Any, lists_per_batch: int = 32) -> "ListRankingData":
        """Scoring `lists` (every split) with a loaded second-stage ranker (`ranking.inference.RankerInference`):
        the inputs it was trained with, its exported context counts and item-item model. Lists it reads retriever
        vectors from must carry them (`retrieval.lists.attach_vectors`, with the retriever that made them)."""
        cfg = ranker.cfg
        if ranker.item_item is not None:
            lists = lists.with_item_item(ranker.item_item)
        return cls(store, {"train": lists, "valid": lists, "test": lists}, ranker.history_len, lists_per_batch,
                   context=ranker.context, retriever_vectors=cfg.retrieval_products > 0,
                   retriever_similarity=max(cfg.retrieval_similarity, 0), item_item_history=ranker.item_item_history)

    @property
    def item_item(self) -> Any:
        """The item-item model the served lists read (the valid split's: the served retriever's), exported with the
        ranker; None when the ranker reads no item-item features."""
        return self.splits["valid"].item_item if self.item_item_history else None

    @classmethod
    def context_counts(cls, store: Any, window: int = 5) -> ContextCounts:
        """`ContextCounts` over every user's retrieval-training prefix (held-out valid/test items never count)."""
        v = store.timeline_values
        return ContextCounts.from_timelines(store.timeline_offsets, v["item_id"], v["ts_ms"], v["category"],
                                            store.retrieval_train_len, window)


    def request_times(self, lists: CandidateLists) -> tuple[np.ndarray, np.ndarray | None]:
        """(R,) each request's time (ms, just after the last behavior it sees) and (R,) its order point for the
        context counts (`request_points`; None for a ranker without context features)."""
        offsets = self.store.timeline_offsets
        rows, _ = self.store.timeline_users.rows(lists.user_ids)
        last = offsets[rows] + np.maximum(lists.hist_len - 1, 0)
        request_ts = self.store.timeline_values["ts_ms"][last] + 1
        points = request_points(self._order, offsets, rows, lists.hist_len) if self.context is not None else None
        return request_ts, points

    def candidate_dense(self, lists: CandidateLists, columns: np.ndarray | None = None,
                        as_served_at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The lists' `second_stage_dense` (whole lists, or the (R, W) positions `columns`) and the requests'
        times; `as_served_at` as in `batch`."""
        request_ts, points = self.request_times(lists)
        rows, _ = self.store.timeline_users.rows(lists.user_ids)

        def last(width: int) -> np.ndarray:  # (R, width) the requests' last behaviors, right-aligned
            return recent_items(self.store.timeline_offsets, self.store.timeline_values["item_id"], rows,
                                lists.hist_len, width)

        recent = None
        if self.context is not None:
            recent = last(self.context.window)
            if as_served_at is not None:
                r = len(lists)
                points, request_ts = np.full(r, SERVE_POINT), np.full(r, as_served_at, np.int64)
        vectors = []
        if self.retrieval_products:
            vectors.append(lists.products(columns))
        if self.retrieval_similarity:
            vectors.append(lists.similarities(last(self.retrieval_similarity), columns))
        item_item = None
        if self.item_item_history:
            item_item = lists.item_item.list_features(last(self.item_item_history), lists.items, columns)
        feats = second_stage_dense(lists.logits, lists.items, self.context, recent, lists.hist_len, points,
                                   request_ts, columns, np.concatenate(vectors, 1) if vectors else None, item_item)
        return feats, request_ts

    def batch(self, lists: CandidateLists, columns: np.ndarray | None = None, as_served_at: int | None = None) -> Batch:
        """One batch of whole lists, or of the given (R, W) list positions of each (features from whole lists).

        Context features count what happened before each request; `as_served_at` (ms) instead asks them
        as the server does at that time: everything the counts hold (the serving parity check).
        """
        hist, lens = self.store.history(lists.user_ids, lists.hist_len, self.cap)
        r, n = lists.items.shape
        items, labels = lists.items, lists.labels()
        if columns is not None:
            n = columns.shape[1]
            items, labels = np.take_along_axis(items, columns, 1), np.take_along_axis(labels, columns, 1)
        feats, request_ts = self.candidate_dense(lists, columns, as_served_at)
        return build_batch(user=self.store.user_features(lists.user_ids), history=hist, history_lengths=lens,
                           candidates=self.store.candidate_features(items.ravel()),
                           num_candidates=np.full(r, n, np.int64),
                           request_ts=request_ts,
                           user_dense=np.zeros((r, 0), np.float32), candidate_dense=feats,
                           labels=labels.reshape(r * n, 1))

    def _sampled_columns(self, lists: CandidateLists, rng: np.random.Generator) -> np.ndarray:
        """(R, W) sorted positions per list: the target's and W - 1 uniformly drawn others."""
        r, n, w = len(lists), lists.width, self.train_width
        target_col = (lists.items == lists.target[:, None]).argmax(1)  # training lists all hold their target
        keys = rng.random((r, n))
        keys[np.arange(r), target_col] = -1.0  # always kept
        return np.sort(np.argpartition(keys, w - 1, axis=1)[:, :w], axis=1)

    def num_train_batches(self, rank: int, world_size: int) -> int:
        return len(self.splits["train"]) // self.per_batch // world_size

    def train_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.splits["train"]))[rank::world_size]
        rng = np.random.default_rng([self.seed, epoch, rank, 7])
        for i in range(self.num_train_batches(rank, world_size)):
            lists = self.splits["train"].take(order[i * self.per_batch:(i + 1) * self.per_batch])
            yield self.batch(lists, self._sampled_columns(lists, rng) if self.train_width else None)

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[Batch]:
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        lists = self.splits[split]
        for j, s in enumerate(range(0, len(lists), self.per_batch)):
            if j % world_size == rank:
                yield self.batch(lists.take(np.arange(s, min(s + self.per_batch, len(lists)))))

    def ranks(self, ranker: Any, split: str, chunk: int = 32) -> np.ndarray:
        """(R,) 0-based rank of each `split` ("valid" or "test") list's target after `ranker` (a `RankerInference`)
        reorders the whole list; inf where the list lacks it (the first stage missed it)."""
        from ranking.train import list_ranks

        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        lists = self.splits[split]
        out = []
        for s in range(0, len(lists), chunk):
            b = self.batch(lists.take(np.arange(s, min(s + chunk, len(lists)))))
            out.append(list_ranks(ranker.logits(b).numpy(), b.labels[:, 0].numpy(), b.num_candidates.numpy()))
        return np.concatenate(out) if out else np.zeros(0)
