import pytest
import torch

from features.batch import (
    HIST_CATEGORY, HIST_ACTION, HIST_ITEM_ID, HIST_TS, ITEM_CATEGORY, ITEM_ID, USER_ID,
    BatchSpec, BatchValidationError, build_batch, concat_rows, kjt_columns, validate_batch,
)


def _batch(hist_lengths=(3, 0), num_candidates=(2, 1), **over):
    b = len(hist_lengths)
    n = sum(num_candidates)
    total = sum(hist_lengths)
    kw = dict(
        user={USER_ID: (list(range(1, b + 1)), [1] * b)},
        history={
            HIST_ITEM_ID: list(range(10, 10 + total)),
            HIST_TS: list(range(100, 100 + total)),
            HIST_ACTION: [2] * total,
            HIST_CATEGORY: [5] * total,
        },
        history_lengths=list(hist_lengths),
        candidates={ITEM_ID: (list(range(50, 50 + n)), [1] * n), ITEM_CATEGORY: ([1, 2, 3, 4], [2, 1, 1] + [0] * (n - 3))},
        num_candidates=list(num_candidates),
        request_ts=[1000] * b,
        user_dense=torch.zeros(b, 2),
        candidate_dense=torch.zeros(n, 3),
        labels=torch.ones(n, 1),
    )
    kw.update(over)
    return build_batch(**kw)


def test_valid_batch_passes_and_exposes_views():
    batch = validate_batch(_batch(), BatchSpec(num_tasks=1, user_dense_dim=2, candidate_dense_dim=3))
    assert batch.batch_size == 2 and batch.total_candidates == 3
    assert batch.user_ids().tolist() == [1, 2]
    assert batch.candidate_user_index().tolist() == [0, 0, 1]
    assert batch.history_lengths().tolist() == [3, 0]
    assert batch.candidates[ITEM_CATEGORY].lengths().tolist() == [2, 1, 1]


def test_parallel_history_keys_must_have_identical_lengths():
    b = _batch()
    from features.batch import make_kjt

    b.history = make_kjt({HIST_ITEM_ID: ([1, 2, 3], [3, 0]), HIST_TS: ([1, 2, 3], [2, 1]),
                          HIST_ACTION: ([1, 1, 1], [3, 0]), HIST_CATEGORY: ([1, 1, 1], [3, 0])}, stride=2)
    with pytest.raises(BatchValidationError, match=r"history.hist_ts: lengths differ .* row 0: 2 vs 3"):
        validate_batch(b)


def test_future_behavior_is_rejected():
    b = _batch(request_ts=[101, 1000])
    with pytest.raises(BatchValidationError, match="not before request_ts=101 .*see the future"):
        validate_batch(b)


def test_dense_shape_errors_name_the_feature():
    with pytest.raises(BatchValidationError, match=r"candidate_dense: shape \(2, 3\), expected \(3, D\)"):
        validate_batch(_batch(candidate_dense=torch.zeros(2, 3)))
    with pytest.raises(BatchValidationError, match="user_dense: has 2 columns, expected 4"):
        validate_batch(_batch(), BatchSpec(user_dense_dim=4))
    with pytest.raises(BatchValidationError, match=r"labels: non-finite value at \[1, 0\]"):
        validate_batch(_batch(labels=torch.tensor([[1.0], [float("nan")], [0.0]])))


def test_missing_key_and_candidate_count_errors():
    with pytest.raises(BatchValidationError, match=r"candidates: missing keys \['item_tag'\]"):
        validate_batch(_batch(), BatchSpec(candidate_keys=(ITEM_ID, "item_tag")))
    with pytest.raises(BatchValidationError, match="candidates: lengths has"):
        validate_batch(_batch(num_candidates=(3, 1), candidates={ITEM_ID: ([1, 2, 3], [1, 1, 1])},
                              candidate_dense=torch.zeros(4, 3), labels=torch.ones(4, 1)))
    with pytest.raises(BatchValidationError, match="history.hist_item_id: row 0 has 3 behaviors, max is 2"):
        validate_batch(_batch(), BatchSpec(max_history=2))


def test_batch_moves_devices_and_keeps_meta():
    b = _batch(meta={"split": "train"}).to(torch.device("cpu"))
    assert b.meta == {"split": "train"} and b.history_values(HIST_TS).dtype == torch.int64


def test_kjt_columns_equal_the_per_key_views():
    batch = _batch(hist_lengths=(3, 0, 7), num_candidates=(2, 5, 1))
    for kjt in (batch.user, batch.history, batch.candidates):
        cols = kjt_columns(kjt)
        assert list(cols) == kjt.keys()
        for key, (values, lengths) in cols.items():
            assert torch.equal(values, kjt[key].values())
            assert torch.equal(lengths, kjt[key].lengths().to(torch.int64))


def test_concat_rows_stacks_every_key_in_order():
    a, b = _batch(hist_lengths=(3, 0)), _batch(hist_lengths=(1, 4, 2), num_candidates=(1, 2, 1))
    for name in ("user", "history", "candidates"):
        ka, kb = getattr(a, name), getattr(b, name)
        got = concat_rows([ka, kb], ka.keys())
        assert got.stride() == ka.stride() + kb.stride()
        for key in ka.keys():
            assert torch.equal(got[key].values(), torch.cat([ka[key].values(), kb[key].values()]))
            assert torch.equal(got[key].lengths().long(), torch.cat([ka[key].lengths(), kb[key].lengths()]).long())
