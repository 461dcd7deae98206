"""Helpers of the ranker tests: tiny deterministic batches of the one Batch type, built as the reader and
serving build them (`features.batch.build_batch`), and tiny model configs.

Imported as ``tests.ranking.batches`` (run pytest as ``python -m pytest`` from the repository root, as the
spawned training workers import the test modules by name)."""
from __future__ import annotations

import numpy as np
import torch

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_TS, ITEM_CATEGORY, ITEM_ID, ITEM_TAG, Batch, build_batch
from features.sequence import action_code
from ranking.config import EmbeddingArchConfig, HeadsConfig, ModelConfig, MoEArchConfig, SequenceArchConfig

USER_DENSE = 4
CAND_DENSE = 3


def random_batch(seed: int, lengths: list[int], cands: list[int], num_items: int = 200, num_tasks: int = 1,
                 cand_items: list[int] | None = None) -> Batch:
    """B users with the given history lengths and candidate counts; ids drawn from `num_items` items."""
    rng = np.random.default_rng(seed)
    b, n, total = len(lengths), int(sum(cands)), int(sum(lengths))
    items = rng.integers(1, num_items, total)
    cats = items % 7 + 100  # an item's category is a function of the item
    ts = np.concatenate([np.sort(rng.integers(0, 10_000, ln)) for ln in lengths]) if total else np.zeros(0, np.int64)
    acts = np.array([action_code("rating", float(x)) for x in rng.integers(0, 2, total)], np.int64)
    ci = np.asarray(cand_items, np.int64) if cand_items is not None else rng.integers(1, num_items, n)
    n_tags = rng.integers(0, 3, n)
    return build_batch(
        user={"user_id": (rng.integers(1, 50, b), np.ones(b, np.int64)),
              "user_attr_age": (rng.integers(1, 7, b), np.ones(b, np.int64))},
        history={HIST_ITEM_ID: items, HIST_TS: ts, HIST_ACTION: acts, HIST_CATEGORY: cats},
        history_lengths=np.asarray(lengths, np.int64),
        candidates={ITEM_ID: (ci, np.ones(n, np.int64)), ITEM_CATEGORY: (ci % 7 + 100, np.ones(n, np.int64)),
                    ITEM_TAG: (rng.integers(1, 30, int(n_tags.sum())), n_tags)},
        num_candidates=np.asarray(cands, np.int64),
        request_ts=np.full(b, 20_000, np.int64),
        user_dense=rng.random((b, USER_DENSE), dtype=np.float32),
        candidate_dense=rng.random((n, CAND_DENSE), dtype=np.float32),
        labels=rng.integers(0, 2, (n, num_tasks)).astype(np.float32),
    )


def select(batch, users: list[int], cand_perm_per_user: list[list[int]]):
    """A batch of the given users (in order) with the given candidates of each (indices within the user)."""
    lengths = batch.history_lengths()
    hoff = batch.history_offsets()
    coff = torch.zeros(batch.batch_size + 1, dtype=torch.int64)
    coff[1:] = torch.cumsum(batch.num_candidates, 0)
    hist = {k: [] for k in batch.history.keys()}
    cand_items, cand_cats, tag_v, tag_l, cdense, labels = [], [], [], [], [], []
    tags = batch.candidates["item_tag"]
    toff = tags.offsets()
    for u, perm in zip(users, cand_perm_per_user):
        for k in hist:
            hist[k].append(batch.history_values(k)[hoff[u]:hoff[u + 1]])
        for j in perm:
            n = int(coff[u]) + j
            cand_items.append(batch.candidate_item_ids()[n:n + 1])
            cand_cats.append(batch.candidates["item_category"].values()[n:n + 1])
            tag_v.append(tags.values()[toff[n]:toff[n + 1]])
            tag_l.append(int(toff[n + 1] - toff[n]))
            cdense.append(batch.candidate_dense[n:n + 1])
            labels.append(batch.labels[n:n + 1])
    n = len(cand_items)
    ids = torch.tensor(users)
    return build_batch(
        user={k: (batch.user[k].values()[ids], torch.ones(len(users), dtype=torch.int64)) for k in batch.user.keys()},
        history={k: torch.cat(v) for k, v in hist.items()},
        history_lengths=lengths[ids],
        candidates={"item_id": (torch.cat(cand_items), torch.ones(n, dtype=torch.int64)),
                    "item_category": (torch.cat(cand_cats), torch.ones(n, dtype=torch.int64)),
                    "item_tag": (torch.cat(tag_v), torch.tensor(tag_l))},
        num_candidates=[len(p) for p in cand_perm_per_user],
        request_ts=batch.request_ts[ids],
        user_dense=batch.user_dense[ids],
        candidate_dense=torch.cat(cdense),
        labels=torch.cat(labels),
    )


def tiny_config(decoupled: bool, long: str, experts: int, short_len: int = 6, long_len: int = 40,
                tasks: tuple[str, ...] = ("click",)) -> ModelConfig:
    return ModelConfig(
        embedding=EmbeddingArchConfig(dim=16, attention_dim=8, decoupled=decoupled, item_buckets=512,
                                      category_buckets=64, user_features=("user_id", "user_attr_age"),
                                      user_buckets=128, candidate_features=("item_tag",), candidate_buckets=64,
                                      pooled_dim=4, init_std=0.3),
        sequence=SequenceArchConfig(short_len=short_len, long=long, long_len=long_len, top_k=5, sdim_hashes=4,
                                    sdim_bits=2),
        moe=MoEArchConfig(num_experts=experts, expert_hidden=(24, 12), gate_hidden=8),
        heads=HeadsConfig(tasks=tasks),
        user_dense_dim=USER_DENSE, candidate_dense_dim=CAND_DENSE, bf16_mlp=False,
    )
