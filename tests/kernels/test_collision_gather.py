"""SDIM collision gather: reference and Triton against a loop oracle, gradients, and the BSE split."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
from kernels.reference import collision_gather as ref
from tests.kernels.cases import TOL as ATTENTION_TOL
from tests.kernels.cases import assert_triton_matches_reference, ragged

TOL = {**ATTENTION_TOL, torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}  # a sum of unit vectors: tighter in bf16


def _oracle(values, codes, offsets, cand_codes, cand_user):
    """Loops over candidates, hash functions and matching behaviors, in float64."""
    m = codes.shape[1]
    out = torch.zeros(cand_codes.shape[0], values.shape[1], dtype=torch.float64)
    for n in range(cand_codes.shape[0]):
        start, end = int(offsets[cand_user[n]]), int(offsets[cand_user[n] + 1])
        for j in range(m):
            s = sum((values[l].double() for l in range(start, end) if codes[l, j] == cand_codes[n, j]),
                    torch.zeros(values.shape[1], dtype=torch.float64))
            if s.norm() > 0:
                out[n] += s / s.norm() / m
    return out


@st.composite
def sdim_cases(draw, max_users=4, max_len=40):
    r = draw(ragged(max_users, max_len, max_cands=12))
    dim = draw(st.integers(1, 24))
    m, tau = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    planes = kernels.make_hyperplanes(dim, m, tau, seed=r.seed)
    values, cands = r.rows(dim), r.candidates(dim)
    return dict(values=values, codes=kernels.simhash(values, planes, tau), offsets=r.offsets,
                cand_codes=kernels.simhash(cands, planes, tau), cand_user=r.cand_user(), max_len=r.max_len), tau


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(case=sdim_cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_reference_matches_the_oracle(case, dtype):
    args, _ = case
    want = _oracle(**{k: v for k, v in args.items() if k != "max_len"})
    got = kernels.collision_gather(**{**args, "values": args["values"].to(dtype)}, backend="torch")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(case=sdim_cases())
def test_triton_matches_the_reference_forward_and_gradient(case):
    args, _ = case
    grad_out = torch.randn(args["cand_codes"].shape[0], args["values"].shape[1], generator=torch.Generator().manual_seed(1))
    assert_triton_matches_reference(kernels.collision_gather, args, ("values",), grad_out)


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(case=sdim_cases(max_users=3, max_len=60))
def test_bucket_sums_then_gather_equals_collision_gather(case):
    args, tau = case
    buckets = kernels.sdim_bucket_sums(args["values"], args["codes"], args["offsets"], tau)
    assert buckets.shape == (args["offsets"].numel() - 1, args["codes"].shape[1], 2**tau, args["values"].shape[1])
    got = kernels.gather_buckets(buckets, args["cand_codes"], args["cand_user"])
    torch.testing.assert_close(got, kernels.collision_gather(**args), **TOL[torch.float32])


def test_triton_with_many_candidate_and_row_blocks():
    # 150 candidates (5 blocks of 32) of 3 users, 300 rows (5 tiles of 64); users straddle tiles.
    gen = torch.Generator().manual_seed(2)
    planes = kernels.make_hyperplanes(20, 5, 3, seed=2)
    values = torch.randn(300, 20, generator=gen, requires_grad=True)
    cands = torch.randn(150, 20, generator=gen)
    offsets = torch.tensor([0, 70, 201, 300])
    cand_user = torch.randint(0, 3, (150,), generator=gen)
    args = (kernels.simhash(values.detach(), planes, 3), offsets, kernels.simhash(cands, planes, 3), cand_user, 131)
    grad_out = torch.randn(150, 20, generator=gen)
    results = []
    for backend in ("torch", "triton"):
        values.grad = None
        out = kernels.collision_gather(values, *args, backend=backend)
        (out * grad_out).sum().backward()
        results.append((out.detach(), values.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL[torch.float32])
    torch.testing.assert_close(results[1][1], results[0][1], **TOL[torch.float32])


def test_sparse_bucket_lookup_matches_the_dense_table(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(50, 8, generator=gen)
    codes = torch.randint(0, 1000, (50, 4), generator=gen)
    cand_codes = codes[torch.tensor([3, 7, 40])].clone()
    cand_codes[1, 2] = 999_999  # a code no behavior has
    offsets, cand_user = torch.tensor([0, 20, 50]), torch.tensor([0, 0, 1])
    dense = ref.collision_gather(values, codes, offsets, cand_codes, cand_user)
    monkeypatch.setattr(ref, "_DENSE_TABLE_LIMIT", 0)  # force the searchsorted path
    sparse = ref.collision_gather(values, codes, offsets, cand_codes, cand_user)
    assert torch.equal(dense, sparse)
    torch.testing.assert_close(sparse.double(), _oracle(values, codes, offsets, cand_codes, cand_user))


def test_reference_gradient_is_exact_in_float64():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(16, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    codes = torch.randint(0, 4, (16, 3), generator=gen)
    cand_codes = torch.randint(0, 4, (6, 3), generator=gen)
    offsets, cand_user = torch.tensor([0, 7, 7, 16]), torch.tensor([0, 2, 1, 0, 2, 2])
    assert torch.autograd.gradcheck(lambda v: ref.collision_gather(v, codes, offsets, cand_codes, cand_user), (values,))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_collision_and_zero_sums_give_zero_and_finite_gradients(backend):
    values = torch.zeros(6, 4)
    values[3:] = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    values.requires_grad_()
    codes = torch.tensor([[0], [0], [0], [1], [1], [1]])
    offsets = torch.tensor([0, 3, 6])  # user 0: zero vectors (sum 0); user 1: real vectors
    cand_codes, cand_user = torch.tensor([[0], [2], [1]]), torch.tensor([0, 1, 1])  # zero sum, no collision, hit
    out = kernels.collision_gather(values, codes, offsets, cand_codes, cand_user, 3, backend=backend)
    out.sum().backward()
    assert torch.equal(out[:2].detach(), torch.zeros(2, 4))
    s = values[3:].detach().sum(0)
    torch.testing.assert_close(out[2].detach(), s / s.norm())
    assert torch.isfinite(values.grad).all() and torch.equal(values.grad[:3], torch.zeros(3, 4))


def test_a_candidates_output_does_not_depend_on_the_other_candidates():
    gen = torch.Generator().manual_seed(0)
    planes = kernels.make_hyperplanes(16, 8, 2, seed=0)
    values, cands = torch.randn(40, 16, generator=gen), torch.randn(5, 16, generator=gen)
    codes, cand_codes = kernels.simhash(values, planes, 2), kernels.simhash(cands, planes, 2)
    offsets, cand_user = torch.tensor([0, 25, 40]), torch.tensor([1, 0, 1, 0, 0])
    together = kernels.collision_gather(values, codes, offsets, cand_codes, cand_user, 25)
    for i in range(5):
        alone = kernels.collision_gather(values, codes, offsets, cand_codes[i:i + 1], cand_user[i:i + 1], 25)
        torch.testing.assert_close(alone[0], together[i])
