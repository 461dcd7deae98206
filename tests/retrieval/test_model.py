"""Metamorphic tests of the two-tower model: batch-mates, causality, truncation, cold items, shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_TS, ITEM_CATEGORY, ITEM_ID, USER_ID, build_batch
from retrieval.config import ItemTowerConfig, ModelConfig, UserTowerConfig
from retrieval.evaluate import empty_items, last_queries
from retrieval.model import TwoTowerRetriever

CFG = ModelConfig(
    dim=16,
    item=ItemTowerConfig(id_buckets=4096, category_buckets=256, attribute_buckets=256,
                         attribute_features=("item_attr_year",)),
    user=UserTowerConfig(max_len=6, num_layers=2, num_heads=2, user_features=("user_attr_gender",), use_action=True),
)


def _model() -> TwoTowerRetriever:
    torch.manual_seed(0)
    return TwoTowerRetriever(CFG, "cpu").eval()


def _batch(histories: list[list[int]], users: list[int] | None = None):
    users = users or list(range(1, len(histories) + 1))
    flat = np.concatenate([np.asarray(h, np.int64) for h in histories])
    lengths = [len(h) for h in histories]
    n = len(flat)
    return build_batch(
        user={USER_ID: (users, [1] * len(users)), "user_attr_gender": ([u % 2 + 7 for u in users], [1] * len(users))},
        history={HIST_ITEM_ID: flat, HIST_TS: np.arange(n), HIST_ACTION: flat % 5 + 8, HIST_CATEGORY: flat % 3},
        history_lengths=lengths, candidates={}, num_candidates=[0] * len(histories), request_ts=[10**9] * len(histories),
    )


def _items(ids: list[int], with_attrs: bool = True):
    n = len(ids)
    return build_batch(
        user={}, history={HIST_ITEM_ID: []}, history_lengths=[0], num_candidates=[n], request_ts=[0],
        candidates={ITEM_ID: (ids, [1] * n), ITEM_CATEGORY: ([i % 3 for i in ids] * 2, [2] * n),
                    "item_attr_year": ([1990 + i % 4 for i in ids], [1] * n)},
    ).candidates


def test_a_users_vectors_do_not_depend_on_batch_mates():
    m = _model()
    alone = m(_batch([[5, 9, 13]], [1]), empty_items()).queries
    together = m(_batch([[2, 4, 6, 8, 10], [5, 9, 13], [7]], [3, 1, 2]), empty_items())
    off = together.query_offsets
    torch.testing.assert_close(together.queries[off[1]:off[2]], alone, rtol=1e-5, atol=1e-6)


def test_queries_are_causal():
    m = _model()
    a = m(_batch([[5, 9, 13, 21]]), empty_items()).queries
    b = m(_batch([[5, 9, 13, 99]]), empty_items()).queries
    torch.testing.assert_close(a[:3], b[:3], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[3], b[3])


def test_history_beyond_max_len_keeps_the_latest_behaviors():
    m = _model()
    long = last_queries(m, _batch([[1, 2, 3, 4, 5, 6, 7, 8, 9]]))
    tail = last_queries(m, _batch([[4, 5, 6, 7, 8, 9]]))
    torch.testing.assert_close(long, tail)


def test_outputs_are_unit_vectors_with_the_documented_shapes():
    m = _model()
    out = m(_batch([[1, 2], [3, 4, 5]]), _items([1, 2, 3, 4]))
    assert out.queries.shape == (5, 16) and out.items.shape == (4, 16)
    assert out.query_offsets.tolist() == [0, 2, 5]
    torch.testing.assert_close(out.queries.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(out.items.norm(dim=1), torch.ones(4))


def test_item_vectors_do_not_depend_on_the_history_in_the_same_call():
    m = _model()
    a = m(_batch([[1, 2]]), _items([10, 11])).items
    b = m(_batch([[7, 8, 9]]), _items([10, 11])).items
    torch.testing.assert_close(a, b)


def test_an_empty_history_is_a_clear_error():
    with pytest.raises(ValueError, match="user row 1 has an empty history"):
        last_queries(_model(), _batch([[1], []]))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layers", [1, 2])
def test_last_only_equals_the_last_position_of_the_full_forward(groups, layers):
    """The user vector (serving, evaluation, candidate lists: `last_queries`) computes only the last position in
    the last block; it equals the full forward's query after each user's last behavior, for every length
    (including ones cut to max_len) and grouping."""
    import dataclasses

    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, user=dataclasses.replace(CFG.user, num_layers=layers, length_groups=groups))
    m = TwoTowerRetriever(cfg, "cpu").eval()
    b = _batch([[2, 4, 6, 8, 10], [5], [7, 9, 11, 13, 15, 17, 19, 21], [3, 1]])
    full = m(b, empty_items())
    last = m(b, empty_items(), last_only=True)
    torch.testing.assert_close(last.queries, full.queries[full.query_offsets[1:] - 1], rtol=1e-5, atol=1e-6)
    assert last.query_offsets.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(last_queries(m, b), last.queries)
