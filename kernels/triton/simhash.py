"""SimHash signatures (SDIM, Cao et al. 2022) as a Triton kernel.

    code[n, j] = sum_{b < tau} [ x[n] . planes[:, j*tau + b] > 0 ] << b

The launcher lays the hyperplanes out as (D, M_PAD * TAU_PAD) with hash function
j in columns [j*TAU_PAD, j*TAU_PAD + tau) and zero columns elsewhere: a zero
column projects to exactly 0, which is bit 0, so the padding adds nothing and
one ``tl.reshape`` to (BLOCK_N, M_PAD, TAU_PAD) groups the bits per hash
function. The projection is an fp32 ``tl.dot`` with IEEE precision (no TF32),
so the signs are those of the fp32 reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._common import block, pow2


@triton.jit
def _simhash_kernel(
    x_ptr, planes_ptr, out_ptr,
    n, dim, num_hashes, stride_xn,
    M_PAD: tl.constexpr, TAU_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    H: tl.constexpr = M_PAD * TAU_PAD
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, H)
    proj = tl.zeros((BLOCK_N, H), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + dd[None, :],
                    mask=(rows[:, None] < n) & (dd[None, :] < dim), other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        p = tl.load(planes_ptr + dd[:, None] * H + cols[None, :], mask=dd[:, None] < dim, other=0.0)  # (BLOCK_D, H)
        proj += tl.dot(x, p, input_precision="ieee")
    bits = tl.reshape((proj > 0).to(tl.int64), (BLOCK_N, M_PAD, TAU_PAD))
    shifts = tl.arange(0, TAU_PAD).to(tl.int64)
    codes = tl.sum(bits << shifts[None, None, :], axis=2)  # (BLOCK_N, M_PAD)
    j = tl.arange(0, M_PAD)
    tl.store(out_ptr + rows[:, None] * num_hashes + j[None, :], codes,
             mask=(rows[:, None] < n) & (j[None, :] < num_hashes))


def simhash(x: torch.Tensor, planes: torch.Tensor, num_bits: int) -> torch.Tensor:
    n, dim = x.shape
    num_hashes = planes.shape[1] // num_bits
    out = torch.empty((n, num_hashes), dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    m_pad, tau_pad = pow2(num_hashes, lo=1), pow2(num_bits, lo=1)
    if m_pad * tau_pad < 16:  # keep the dot's N dimension >= 16
        m_pad = 16 // tau_pad
    padded = torch.zeros((dim, m_pad, tau_pad), dtype=torch.float32, device=x.device)
    padded[:, :num_hashes, :num_bits] = planes.float().view(dim, num_hashes, num_bits)
    x = x if x.stride(1) == 1 else x.contiguous()
    block_n = block(n, hi=64)
    _simhash_kernel[(triton.cdiv(n, block_n),)](
        x, padded, out, n, dim, num_hashes, x.stride(0),
        M_PAD=m_pad, TAU_PAD=tau_pad, BLOCK_N=block_n, BLOCK_D=block(dim, hi=64),
    )
    return out
