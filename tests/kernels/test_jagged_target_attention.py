"""Jagged target attention: reference and Triton against a per-candidate oracle, forward and gradients."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
from tests.kernels.cases import TOL, assert_triton_matches_reference, ragged, run_with_grads

LEAVES = ("q", "k", "v")


def _oracle(q, k, v, offsets, cand_user, scale):
    """softmax(scale q k^T) v per candidate over its user's rows, in float64; 0 without rows."""
    out = torch.zeros(q.shape[0], v.shape[1], dtype=torch.float64)
    for n in range(q.shape[0]):
        start, end = int(offsets[cand_user[n]]), int(offsets[cand_user[n] + 1])
        if end > start:
            weights = torch.softmax(scale * k[start:end].double() @ q[n].double(), 0)
            out[n] = weights @ v[start:end].double()
    return out


@st.composite
def attention_cases(draw, max_users=4, max_len=45, max_cands=12):
    r = draw(ragged(max_users, max_len, max_cands))
    dim, dim_v = draw(st.integers(1, 32)), draw(st.integers(1, 24))
    return dict(q=r.candidates(dim), k=r.rows(dim), v=r.rows(dim_v), offsets=r.offsets, cand_user=r.cand_user(),
                max_len=r.max_len)


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(case=attention_cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_reference_matches_the_oracle(case, dtype):
    want = _oracle(case["q"], case["k"], case["v"], case["offsets"], case["cand_user"], case["q"].shape[1] ** -0.5)
    got, _ = run_with_grads(kernels.jagged_target_attention, case, LEAVES, "torch", dtype=dtype)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(case=attention_cases())
def test_triton_matches_the_reference_forward_and_gradients(case):
    grad_out = torch.randn(case["q"].shape[0], case["v"].shape[1], generator=torch.Generator().manual_seed(0))
    assert_triton_matches_reference(kernels.jagged_target_attention, case, LEAVES, grad_out)


def test_triton_with_many_candidate_and_row_blocks():
    # 150 candidates (3 blocks of 64) over 4 users, 230 rows (4 tiles of 64) with users straddling tiles.
    gen = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0, 61, 61, 190, 230])
    case = dict(q=torch.randn(150, 32, generator=gen), k=torch.randn(230, 32, generator=gen),
                v=torch.randn(230, 16, generator=gen), offsets=offsets,
                cand_user=torch.randint(0, 4, (150,), generator=gen), max_len=129)
    assert_triton_matches_reference(kernels.jagged_target_attention, case, LEAVES, torch.randn(150, 16, generator=gen))


def test_reference_gradients_are_exact_in_float64():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, dtype=torch.float64, generator=gen, requires_grad=True) for s in ((4, 3), (9, 3), (9, 2)))
    offsets, cand_user = torch.tensor([0, 5, 5, 9]), torch.tensor([2, 0, 1, 0])
    assert torch.autograd.gradcheck(
        lambda q, k, v: kernels.jagged_target_attention(q, k, v, offsets, cand_user, 5, backend="torch"), (q, k, v))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_user_path_equals_the_batched_path(backend):
    # B = 1 takes the dense SDPA path; the same user with an empty neighbour takes the padded path.
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(20, 16, generator=gen), torch.randn(50, 16, generator=gen), torch.randn(50, 8, generator=gen)
    one = kernels.jagged_target_attention(q, k, v, torch.tensor([0, 50]), torch.zeros(20, dtype=torch.int64), 50,
                                          backend=backend)
    two = kernels.jagged_target_attention(q, k, v, torch.tensor([0, 0, 50]), torch.ones(20, dtype=torch.int64), 50,
                                          backend=backend)
    torch.testing.assert_close(one, two, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_users_without_behaviors_get_zeros_and_zero_gradients(backend):
    q = torch.randn(3, 8, requires_grad=True)
    k, v = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    out = kernels.jagged_target_attention(q, k, v, torch.tensor([0, 0, 4, 4]), torch.tensor([0, 1, 2]), 4,
                                          backend=backend)
    out.sum().backward()
    assert torch.equal(out[[0, 2]].detach(), torch.zeros(2, 8))
    assert torch.equal(q.grad[[0, 2]], torch.zeros(2, 8)) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_rows_at_all(backend):
    q = torch.randn(3, 8, requires_grad=True)
    out = kernels.jagged_target_attention(q, torch.randn(0, 8), torch.randn(0, 5), torch.tensor([0, 0]),
                                          torch.zeros(3, dtype=torch.int64), 0, backend=backend)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.zeros(3, 5)) and torch.equal(q.grad, torch.zeros(3, 8))


def test_a_candidates_output_does_not_depend_on_the_other_candidates():
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(6, 16, generator=gen), torch.randn(30, 16, generator=gen), torch.randn(30, 16, generator=gen)
    offsets, cand_user = torch.tensor([0, 12, 30]), torch.tensor([1, 0, 1, 1, 0, 0])
    together = kernels.jagged_target_attention(q, k, v, offsets, cand_user, 18)
    for i in range(6):
        alone = kernels.jagged_target_attention(q[i:i + 1], k, v, offsets, cand_user[i:i + 1], 18)
        torch.testing.assert_close(alone[0], together[i], **TOL[torch.float32])


def test_custom_scale():
    gen = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(3, 4, generator=gen), torch.randn(7, 4, generator=gen), torch.randn(7, 4, generator=gen)
    offsets, cand_user = torch.tensor([0, 7]), torch.zeros(3, dtype=torch.int64)
    for backend in ("torch", "triton"):
        got = kernels.jagged_target_attention(q, k, v, offsets, cand_user, 7, scale=0.3, backend=backend)
        torch.testing.assert_close(got.double(), _oracle(q, k, v, offsets, cand_user, 0.3), **TOL[torch.float32])
