"""Leave-one-out full-ranking evaluation (the published protocol).

For each user, the held-out item (the second-to-last behavior for `valid`, the
last for `test`) is ranked against every catalog item by cos(user, item); every
item the user interacted with before it is masked, except the target itself
(ICLRec/ICSRec: ``rating_pred[train_matrix > 0] = 0``). The 0-based rank goes
to `features.train.metrics.topk_metrics` (HR/NDCG @10/50/200, Recall @100/500).
Ties with the target count against it (pessimistic), so identical vectors —
e.g. from hash collisions — can never flatter the metrics.

In a distributed run every rank scores its own users and the ranks are
gathered; every rank embeds the whole catalog (a collective forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, Batch, build_batch
from features.train.loop import aligned
from features.train.metrics import topk_metrics
from retrieval.catalog import Catalog
from retrieval.config import EvalConfig
from retrieval.model import TwoTowerRetriever


@dataclass
class EvalBatch:
    """A leave-one-out batch (one candidate per user: the held-out item) and what to mask for it."""

    batch: Batch
    seen_items: torch.Tensor  # (S,) ids of items the users interacted with before their target (repeats allowed)
    seen_user: torch.Tensor  # (S,) the batch row of the user of each seen item


def empty_items() -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=[], values=torch.empty(0, dtype=torch.int64),
                             lengths=torch.empty(0, dtype=torch.int32), stride=0)


def empty_batch() -> Batch:
    e = np.empty(0, np.int64)
    return build_batch(user={}, history={HIST_ITEM_ID: e, HIST_CATEGORY: e, HIST_ACTION: e}, history_lengths=e,
                       candidates={}, num_candidates=e, request_ts=e)


@torch.no_grad()
def item_matrix(model: TwoTowerRetriever, catalog: Catalog, keys: list[str], chunk: int = 16384) -> torch.Tensor:
    """(N, D) L2-normalized vectors of every catalog item, in catalog order."""
    parts = []
    eb = empty_batch()
    for s in range(0, len(catalog), chunk):
        rows = torch.arange(s, min(s + chunk, len(catalog)))
        parts.append(model(eb, catalog.select(rows, keys)).items)
    return torch.cat(parts) if parts else torch.zeros(0, model.cfg.dim)


@torch.no_grad()
def last_queries(model: TwoTowerRetriever, batch: Batch) -> torch.Tensor:
    """(B, D) user vectors after each user's last history position."""
    lengths = batch.history_lengths()
    if lengths.numel() and int(lengths.min()) == 0:
        row = int((lengths == 0).nonzero()[0])
        raise ValueError(f"user row {row} has an empty history: the user tower needs at least one behavior")
    return model(batch, empty_items(), last_only=True).queries  # the last block computes only those positions


def target_ranks(user_vecs: torch.Tensor, items: torch.Tensor, target_rows: torch.Tensor,
                 seen_rows: torch.Tensor, seen_owner: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items, seen items (other than the target) masked.

    user_vecs (B, D), items (N, D), target_rows (B,), seen_rows / seen_owner (S,): catalog
    row and user row of every masked interaction. Ties count against the target.
    """
    scores = user_vecs @ items.T  # (B, N)
    b = torch.arange(scores.shape[0])
    t = scores[b, target_rows].clone()  # (B,)
    if seen_rows.numel():
        scores.index_put_((seen_owner, seen_rows), torch.tensor(float("-inf")))
    scores[b, target_rows] = t
    return (scores > t[:, None]).sum(1) + (scores == t[:, None]).sum(1) - 1


def evaluate(
    model: TwoTowerRetriever, catalog: Catalog, keys: list[str], batches: Iterable[EvalBatch], cfg: EvalConfig,
    desc: str = "eval", progress: bool = True, total: int | None = None,
) -> dict[str, float]:
    """Metrics over this rank's users, gathered over ranks (collective when distributed)."""
    was_training = model.training
    model.eval()
    items = item_matrix(model, catalog, keys)
    ranks: list[torch.Tensor] = []
    world = dist.get_world_size() if dist.is_initialized() else 1
    batches = _first_users(batches, -(-cfg.max_users // world)) if cfg.max_users else batches
    with torch.no_grad():
        for eb, real in tqdm(aligned(batches), desc=desc, total=total, disable=not progress, leave=False,
                             unit="batch"):
            q = last_queries(model, eb.batch)  # collective: every rank, every step
            if not real:
                continue
            if cfg.mask_history:
                rows, owner = _known_rows(catalog, eb.seen_items, eb.seen_user)
            else:
                rows = owner = torch.empty(0, dtype=torch.int64)
            ranks.append(target_ranks(q, items, catalog.rows_of(eb.batch.candidate_item_ids()), rows, owner))
    model.train(was_training)
    local = torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[torch.Tensor] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, local)
        local = torch.cat(gathered)
    return topk_metrics(local.numpy(), ks=tuple(cfg.ks), recall_ks=tuple(cfg.recall_ks))


def _first_users(batches: Iterable[EvalBatch], n: int) -> Iterator[EvalBatch]:
    seen = 0
    for eb in batches:
        if seen >= n:
            return
        seen += eb.batch.batch_size
        yield eb


def _known_rows(catalog: Catalog, items: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Catalog rows of the seen ids that are in the catalog, and their user row."""
    ids = items.numpy()
    pos = np.searchsorted(catalog.item_ids, ids).clip(max=max(len(catalog) - 1, 0))
    known = catalog.item_ids[pos] == ids
    return torch.from_numpy(pos[known].astype(np.int64)), owner[torch.from_numpy(known)]
