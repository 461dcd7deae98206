"""SDIM signature-collision aggregation (Cao et al. 2022) as Triton kernels, forward and backward.

    S[n, j] = sum_{l in rows(u(n)), codes[l, j] == cand_codes[n, j]} values[l]
    out[n]  = (1/m) * sum_j S[n, j] / ||S[n, j]||          (0 where S[n, j] == 0)

Candidates are sorted by user (`group_candidates`), so a block of BLOCK_N
sorted candidates covers a contiguous range of behavior rows. Forward: one
program per candidate block; for each hash function j it streams the rows of
its users in BLOCK_L tiles and accumulates ``hit @ values`` with a 0/1 collision
matrix hit (BLOCK_N, BLOCK_L) in a ``tl.dot``. Backward: with
g[n, j] = dout/dS[n, j] = (go - u (u . go)) / (m ||S||), u = S/||S||, one program
per tile of behavior rows accumulates ``hit^T @ g`` over the candidates of its users.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._common import BIG, CandidateGroups, block, candidate_block, group_candidates, pow2


@triton.jit
def _cg_fwd_kernel(
    values_ptr, codes_ptr, offsets_ptr, cand_codes_ptr, perm_ptr, sorted_user_ptr, out_ptr, sums_ptr,
    n, num_hashes, dim, stride_v, inv_m,
    SAVE_SUMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rmask, cand, start, end, lo, hi = candidate_block(perm_ptr, sorted_user_ptr, offsets_ptr, n, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < dim
    out = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in range(0, num_hashes):
        cc = tl.load(cand_codes_ptr + cand * num_hashes + j, mask=rmask, other=-1)  # (BLOCK_N,)
        s = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for l0 in range(lo, hi, BLOCK_L):
            ll = l0 + tl.arange(0, BLOCK_L)
            lmask = ll < hi
            bc = tl.load(codes_ptr + ll * num_hashes + j, mask=lmask, other=-2)  # (BLOCK_L,)
            v = tl.load(values_ptr + ll[:, None] * stride_v + dd[None, :],
                        mask=lmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (BLOCK_L, BLOCK_D)
            hit = (cc[:, None] == bc[None, :]) & (ll[None, :] >= start[:, None]) & (ll[None, :] < end[:, None])
            s += tl.dot(hit.to(tl.float32), v, input_precision="ieee")
        if SAVE_SUMS:
            tl.store(sums_ptr + (cand[:, None] * num_hashes + j) * dim + dd[None, :], s,
                     mask=rmask[:, None] & dmask[None, :])
        norm = tl.sqrt(tl.sum(s * s, axis=1))
        inv = tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)
        out += s * inv[:, None]
    tl.store(out_ptr + cand[:, None] * dim + dd[None, :], (out * inv_m).to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _cg_bwd_kernel(
    grad_s_ptr, codes_ptr, row_user_ptr, cand_offsets_ptr, cand_codes_ptr, perm_ptr, sorted_user_ptr, dv_ptr,
    num_rows, num_hashes, dim,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    ll = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    lmask = ll < num_rows
    ru = tl.load(row_user_ptr + ll, mask=lmask, other=0)
    u_lo = tl.min(tl.where(lmask, ru, BIG), axis=0)
    u_hi = tl.max(tl.where(lmask, ru, -1), axis=0)
    c_lo = tl.load(cand_offsets_ptr + u_lo)
    c_hi = tl.load(cand_offsets_ptr + u_hi + 1)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < dim
    dv = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for j in range(0, num_hashes):
        bc = tl.load(codes_ptr + ll * num_hashes + j, mask=lmask, other=-2)  # (BLOCK_L,)
        for n0 in range(c_lo, c_hi, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rmask = rows < c_hi
            cand = tl.load(perm_ptr + rows, mask=rmask, other=0)
            user = tl.load(sorted_user_ptr + rows, mask=rmask, other=-1)
            cc = tl.load(cand_codes_ptr + cand * num_hashes + j, mask=rmask, other=-1)
            g = tl.load(grad_s_ptr + (cand[:, None] * num_hashes + j) * dim + dd[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            hit = (bc[:, None] == cc[None, :]) & (ru[:, None] == user[None, :]) & lmask[:, None]
            dv += tl.dot(hit.to(tl.float32), g, input_precision="ieee")
    tl.store(dv_ptr + ll[:, None] * dim + dd[None, :], dv, mask=lmask[:, None] & dmask[None, :])


def _forward(values, codes, offsets, cand_codes, groups: CandidateGroups, save_sums: bool):
    num_rows, dim = values.shape
    n, m = cand_codes.shape
    out = torch.empty((n, dim), dtype=values.dtype, device=values.device)
    sums = torch.empty((n, m, dim) if save_sums else (1,), dtype=torch.float32, device=values.device)
    block_n = block(n, hi=32)
    _cg_fwd_kernel[(triton.cdiv(n, block_n),)](
        values, codes, offsets, cand_codes, groups.perm, groups.sorted_user, out, sums,
        n, m, dim, values.stride(0), 1.0 / m,
        SAVE_SUMS=save_sums, BLOCK_N=block_n, BLOCK_L=block(num_rows, hi=64), BLOCK_D=pow2(dim),
    )
    return out, sums


def _backward(grad_s, codes, cand_codes, groups: CandidateGroups, num_rows: int, dim: int):
    n, m = cand_codes.shape
    dv = torch.empty((num_rows, dim), dtype=torch.float32, device=grad_s.device)
    if num_rows:
        block_l = block(num_rows, hi=64)
        _cg_bwd_kernel[(triton.cdiv(num_rows, block_l),)](
            grad_s, codes, groups.row_user, groups.cand_offsets, cand_codes, groups.perm, groups.sorted_user, dv,
            num_rows, m, dim,
            BLOCK_N=block(n, hi=32), BLOCK_L=block_l, BLOCK_D=pow2(dim),
        )
    return dv


class _CollisionGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, codes, offsets, cand_codes, cand_user):
        values = values.contiguous()
        codes, cand_codes = codes.contiguous(), cand_codes.contiguous()
        groups = group_candidates(cand_user, offsets, values.shape[0])
        save = ctx.needs_input_grad[0]
        out, sums = _forward(values, codes, offsets, cand_codes, groups, save)
        if save:
            ctx.save_for_backward(codes, cand_codes, sums, *vars(groups).values())
            ctx.values_meta = (values.shape, values.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        codes, cand_codes, sums, *group_tensors = ctx.saved_tensors
        groups = CandidateGroups(*group_tensors)
        (num_rows, dim), dtype = ctx.values_meta
        m = sums.shape[1]
        norm = torch.linalg.vector_norm(sums, dim=-1, keepdim=True)  # (N, m, 1)
        inv = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))
        unit = sums * inv
        go = grad_out.float()[:, None, :]  # (N, 1, D)
        grad_s = (go - unit * (unit * go).sum(-1, keepdim=True)) * (inv / m)  # (N, m, D)
        dv = _backward(grad_s.contiguous(), codes, cand_codes, groups, num_rows, dim)
        return dv.to(dtype), None, None, None, None


def collision_gather(values, codes, offsets, cand_codes, cand_user):
    if cand_codes.shape[0] == 0:
        return values.new_zeros(0, values.shape[1])
    return _CollisionGather.apply(values, codes, offsets, cand_codes, cand_user)
