"""hash_ids / bucketize: bit-exact with the id hash spec v1 (features.hashing) on every backend."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
from features import hashing

BACKENDS = ["auto", "torch", "triton"]  # auto on CPU: numpy
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_vectors_hash_ids(backend):
    cases = hashing.GOLDEN_VECTORS["hash_ids"]
    for feature in {args[1] for args, _ in cases}:
        ids = torch.tensor([args[0] for args, _ in cases if args[1] == feature])
        expected = [want for args, want in cases if args[1] == feature]
        got = kernels.hash_ids(ids, hashing.feature_seed(feature), backend=backend)
        assert got.tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_vectors_bucketize(backend):
    for (x, feature, num_buckets), want in hashing.GOLDEN_VECTORS["bucketize"]:
        got = kernels.bucketize(torch.tensor([x]), feature, num_buckets, backend=backend)
        assert got.tolist() == [want], (x, feature, num_buckets)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(ids=st.lists(INT64, min_size=0, max_size=300), seed=INT64,
       num_buckets=st.one_of(st.none(), st.integers(min_value=1, max_value=2**63 - 1)))
def test_matches_the_numpy_spec_exactly(ids, seed, num_buckets):
    x = torch.tensor(ids, dtype=torch.int64)
    want = hashing.hash_int64(np.array(ids, dtype=np.int64), seed)
    if num_buckets is not None:
        want = np.mod(want, np.int64(num_buckets))
    for backend in BACKENDS:
        got = kernels.hash_ids(x, seed, num_buckets, backend=backend)
        assert got.dtype == torch.int64 and got.shape == x.shape
        assert np.array_equal(got.numpy(), want), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_the_shape_and_accepts_int32_ids(backend):
    ids = torch.arange(-6, 6, dtype=torch.int32).view(3, 4)
    got = kernels.bucketize(ids, "item_id", 97, backend=backend)
    assert got.shape == (3, 4)
    assert got.flatten().tolist() == hashing.bucketize(ids.flatten().numpy(), "item_id", 97).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_ids_and_seeds(backend):
    ids = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 2**32, -(2**32)])
    for seed in (0, -1, 2**63 - 1, -(2**63)):
        got = kernels.hash_ids(ids, seed, backend=backend)
        assert got.tolist() == [hashing.hash_int64_scalar(int(i), seed) for i in ids]
