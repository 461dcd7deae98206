"""DARE top-K attention: reference and Triton against a per-candidate oracle, gradients, decoupling."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
from kernels.reference import dare_topk_attention as dare_ref
from tests.kernels.cases import TOL, assert_triton_matches_reference, ragged, run_with_grads

LEAVES = ("q_att", "k_att", "v_rep")


def _oracle(q_att, k_att, v_rep, offsets, cand_user, top_k, scale):
    """Per candidate: float64 scores over its user's rows, top_k, softmax over the kept, weighted v_rep."""
    out = torch.zeros(q_att.shape[0], v_rep.shape[1], dtype=torch.float64)
    for n in range(q_att.shape[0]):
        start, end = int(offsets[cand_user[n]]), int(offsets[cand_user[n] + 1])
        if end > start:
            scores = scale * k_att[start:end].double() @ q_att[n].double()
            kept, pos = scores.topk(min(top_k, end - start))
            out[n] = torch.softmax(kept, 0) @ v_rep[start:end][pos].double()
    return out


@st.composite
def dare_cases(draw, max_users=3, max_len=40, max_cands=10):
    r = draw(ragged(max_users, max_len, max_cands))
    dim_att, dim_rep = draw(st.integers(1, 16)), draw(st.integers(1, 24))
    return dict(q_att=r.candidates(dim_att), k_att=r.rows(dim_att), v_rep=r.rows(dim_rep), offsets=r.offsets,
                cand_user=r.cand_user(), max_len=r.max_len, top_k=draw(st.integers(1, 20)))


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(case=dare_cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_reference_matches_the_oracle(case, dtype):
    rounded = {k: (v.to(dtype).double() if v.is_floating_point() else v) if isinstance(v, torch.Tensor) else v
               for k, v in case.items()}
    want = _oracle(rounded["q_att"], rounded["k_att"], rounded["v_rep"], case["offsets"], case["cand_user"],
                   case["top_k"], case["q_att"].shape[1] ** -0.5)
    got, _ = run_with_grads(kernels.dare_topk_attention, case, LEAVES, "torch", dtype=dtype)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(case=dare_cases())
def test_triton_matches_the_reference_forward_and_gradients(case):
    grad_out = torch.randn(case["q_att"].shape[0], case["v_rep"].shape[1], generator=torch.Generator().manual_seed(0))
    assert_triton_matches_reference(kernels.dare_topk_attention, case, LEAVES, grad_out)


def test_triton_with_many_candidate_blocks_and_tiles():
    # 40 candidates (3 blocks of 16), top-16 buffers merged over 5 tiles of 16 rows per user.
    gen = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0, 75, 75, 120])
    case = dict(q_att=torch.randn(40, 8, generator=gen), k_att=torch.randn(120, 8, generator=gen),
                v_rep=torch.randn(120, 16, generator=gen), offsets=offsets,
                cand_user=torch.randint(0, 3, (40,), generator=gen), max_len=75, top_k=11)
    assert_triton_matches_reference(kernels.dare_topk_attention, case, LEAVES, torch.randn(40, 16, generator=gen))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_k_covering_every_behavior_is_full_attention(backend):
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(7, 8, generator=gen), torch.randn(30, 8, generator=gen), torch.randn(30, 12, generator=gen)
    offsets, cand_user = torch.tensor([0, 0, 13, 30]), torch.tensor([1, 2, 0, 2, 1, 1, 2])
    dare = kernels.dare_topk_attention(q, k, v, offsets, cand_user, 17, top_k=17, backend=backend)
    full = kernels.jagged_target_attention(q, k, v, offsets, cand_user, 17, backend=backend)
    torch.testing.assert_close(dare, full, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_are_decoupled(backend):
    """k_att and v_rep get gradient only on kept rows; v_rep's is the softmax weight times dout."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, generator=gen, requires_grad=True)
    k = torch.randn(20, 4, generator=gen, requires_grad=True)
    v = torch.randn(20, 6, generator=gen, requires_grad=True)
    offsets, cand_user = torch.tensor([0, 20]), torch.zeros(1, dtype=torch.int64)
    out = kernels.dare_topk_attention(q, k, v, offsets, cand_user, 20, top_k=5, backend=backend)
    grad_out = torch.randn(1, 6, generator=gen)
    (out * grad_out).sum().backward()
    scores = 0.5 * (k.detach() @ q.detach()[0])
    kept = scores.topk(5).indices
    dropped = torch.ones(20, dtype=torch.bool)
    dropped[kept] = False
    assert torch.equal(k.grad[dropped], torch.zeros(15, 4)) and torch.equal(v.grad[dropped], torch.zeros(15, 6))
    weights = torch.softmax(scores[kept], 0)
    torch.testing.assert_close(v.grad[kept], weights[:, None] * grad_out, **TOL[torch.float32])
    assert k.grad[kept].abs().sum() > 0


def test_triton_breaks_ties_at_the_cut_by_the_lower_row():
    k = torch.zeros(6, 4)  # every score is 0: a tie everywhere
    v = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 2)
    out = kernels.dare_topk_attention(torch.ones(1, 4), k, v, torch.tensor([0, 6]), torch.zeros(1, dtype=torch.int64),
                                      6, top_k=3, backend="triton")
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0]]))  # mean of rows 0, 1, 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_users_without_behaviors_get_zeros_and_finite_gradients(backend):
    q = torch.randn(3, 4, requires_grad=True)
    k, v = torch.randn(5, 4, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    out = kernels.dare_topk_attention(q, k, v, torch.tensor([0, 0, 5]), torch.tensor([0, 1, 0]), 5, top_k=3,
                                      backend=backend)
    out.sum().backward()
    assert torch.equal(out[[0, 2]].detach(), torch.zeros(2, 6))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[[0, 2]], torch.zeros(2, 4))


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(rows=st.integers(1, 40), width=st.integers(2048, 12000), k=st.integers(1, 300),
       padded=st.booleans(), seed=st.integers(0, 2**16))
def test_block_pruned_topk_keeps_the_same_set_as_topk(rows, width, k, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, width, generator=gen)
    if padded:  # the multi-user path pads short users with -inf
        lengths = torch.randint(0, width + 1, (rows,), generator=gen)
        scores = scores.masked_fill(torch.arange(width)[None, :] >= lengths[:, None], float("-inf"))
    kept, cols = dare_ref.topk_rows(scores, k)
    want = scores.topk(k, dim=1).values
    assert torch.equal(kept.sort(1, descending=True).values, want)
    assert torch.equal(scores.gather(1, cols), kept)
    finite = torch.isfinite(kept)
    assert all(len(set(c[f].tolist())) == int(f.sum()) for c, f in zip(cols, finite))  # no column twice


@pytest.mark.parametrize("offsets", [[0, 5000], [0, 3000, 3100, 5000]])
def test_reference_on_long_sequences_matches_the_oracle(offsets):
    gen = torch.Generator().manual_seed(4)
    offsets = torch.tensor(offsets)
    q, k, v = torch.randn(6, 16, generator=gen), torch.randn(5000, 16, generator=gen), torch.randn(5000, 8, generator=gen)
    cand_user = torch.randint(0, offsets.numel() - 1, (6,), generator=gen)
    got = kernels.dare_topk_attention(q, k, v, offsets, cand_user, 5000, top_k=100, backend="torch")
    torch.testing.assert_close(got.double(), _oracle(q, k, v, offsets, cand_user, 100, 0.25), **TOL[torch.float32])
