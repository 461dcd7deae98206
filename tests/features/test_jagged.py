"""features.jagged: the one copy of jagged index arithmetic the reader, the models and the server's catalog use."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from features.jagged import jagged_tail, offsets_of, segment_indices, segment_rows, tail_index


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_jagged_tail_takes_last_n_per_row(n):
    values = torch.arange(10)
    lengths = torch.tensor([4, 0, 1, 5])
    v, l = jagged_tail(values, lengths, n)
    rows = torch.split(values, lengths.tolist())
    expected = [r[max(len(r) - n, 0):] for r in rows] if n else [r[:0] for r in rows]
    assert l.tolist() == [len(e) for e in expected]
    assert v.tolist() == torch.cat(expected).tolist()


def test_tail_index_is_none_when_nothing_is_cut():
    idx, lengths = tail_index(torch.tensor([2, 0, 3]), 3)
    assert idx is None and lengths.tolist() == [2, 0, 3]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 6)), max_size=30))
def test_segment_rows_and_segment_indices_equal_a_loop(segs):
    starts = [s for s, _ in segs]
    lens = [n for _, n in segs]
    want = [s + i for s, n in segs for i in range(n)]
    assert segment_rows(torch.tensor(starts, dtype=torch.int64), torch.tensor(lens, dtype=torch.int64)).tolist() == want
    assert segment_indices(np.array(starts, np.int64), np.array(lens, np.int64)).tolist() == want


def test_offsets_of_starts_at_zero():
    assert offsets_of(torch.tensor([3, 0, 2])).tolist() == [0, 3, 3, 5]
