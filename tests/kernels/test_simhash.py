"""SimHash signatures: exact equality between backends, the tie rule, packing, fixed hyperplanes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels

BACKENDS = ["torch", "triton"]


def _oracle(x: torch.Tensor, planes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Codes computed bit by bit in float64 (exact for the dyadic inputs used below)."""
    proj = x.double() @ planes.double()
    n, m = x.shape[0], planes.shape[1] // num_bits
    codes = torch.zeros(n, m, dtype=torch.int64)
    for j in range(m):
        for b in range(num_bits):
            codes[:, j] += (proj[:, j * num_bits + b] > 0).long() << b
    return codes


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(n=st.integers(0, 70), dim=st.integers(1, 40), m=st.integers(1, 9), tau=st.integers(1, 7),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_backends_agree_exactly_with_the_oracle_on_exact_inputs(n, dim, m, tau, dtype, seed):
    # Small dyadic values: every product and partial sum is exact in fp32, so any summation order
    # gives the same projection -- including exact zeros, which exercise the tie rule.
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randint(-4, 5, (n, dim), generator=gen) / 4).to(dtype)
    planes = torch.randint(-4, 5, (dim, m * tau), generator=gen) / 8
    want = _oracle(x.float(), planes, tau)
    for backend in BACKENDS:
        got = kernels.simhash(x, planes, tau, backend=backend)
        assert got.dtype == torch.int64 and got.shape == (n, m)
        assert torch.equal(got, want), backend


@pytest.mark.parametrize("n, dim, m, tau", [(300, 64, 16, 3), (129, 32, 8, 4), (17, 48, 21, 3)])
def test_backends_agree_exactly_on_gaussian_embeddings(n, dim, m, tau):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(n))
    planes = kernels.make_hyperplanes(dim, m, tau, seed=7)
    ref = kernels.simhash(x, planes, tau, backend="torch")
    assert torch.equal(kernels.simhash(x, planes, tau, backend="triton"), ref)
    assert int(ref.min()) >= 0 and int(ref.max()) < 2**tau


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_rule_a_zero_projection_is_bit_zero(backend):
    planes = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]])  # one hash function, 3 bits
    x = torch.tensor([[0.0, 0.0], [1.0, 5.0], [-1.0, 5.0]])
    got = kernels.simhash(x, planes, 3, backend=backend)
    # x=0 -> all projections 0 -> code 0; (1, 5) -> [1, -1, 0] -> bit0; (-1, 5) -> [-1, 1, 0] -> bit1
    assert got.tolist() == [[0], [1], [2]]


def test_bf16_input_is_hashed_as_its_fp32_upcast():
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    planes = kernels.make_hyperplanes(32, 8, 3, seed=1)
    assert torch.equal(kernels.simhash(x, planes, 3), kernels.simhash(x.float(), planes, 3))


def test_similar_vectors_collide_more_often():
    gen = torch.Generator().manual_seed(0)
    planes = kernels.make_hyperplanes(64, 48, 3, seed=0)
    base = torch.randn(200, 64, generator=gen)
    near = base + 0.1 * torch.randn(200, 64, generator=gen)
    far = torch.randn(200, 64, generator=gen)
    code = kernels.simhash(base, planes, 3)
    near_rate = (kernels.simhash(near, planes, 3) == code).float().mean()
    far_rate = (kernels.simhash(far, planes, 3) == code).float().mean()
    assert near_rate > 0.8 and far_rate < 0.25  # SimHash: P(collide) = (1 - angle/pi)**tau


def test_make_hyperplanes_is_fixed_by_its_seed():
    a = kernels.make_hyperplanes(16, 4, 3, seed=5)
    assert a.shape == (16, 12) and a.dtype == torch.float32
    assert torch.equal(a, kernels.make_hyperplanes(16, 4, 3, seed=5))
    assert not torch.equal(a, kernels.make_hyperplanes(16, 4, 3, seed=6))
    torch.manual_seed(123)  # the global RNG plays no part
    b = kernels.make_hyperplanes(16, 4, 3, seed=5)
    assert torch.equal(a, b)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_pack_unpack_round_trip(data):
    tau = data.draw(st.integers(1, 21))
    m = data.draw(st.integers(1, 63 // tau))
    n = data.draw(st.integers(0, 20))
    codes = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 2**tau - 1), min_size=m, max_size=m),
                                            min_size=n, max_size=n)), dtype=torch.int64).view(n, m)
    packed = kernels.pack_codes(codes, tau)
    assert packed.shape == (n,) and (packed >= 0).all()
    assert torch.equal(kernels.unpack_codes(packed, m, tau), codes)


def test_packed_layout_puts_hash_function_j_in_bits_j_tau():
    assert kernels.pack_codes(torch.tensor([[1, 2, 3]]), 2).tolist() == [1 | (2 << 2) | (3 << 4)]
