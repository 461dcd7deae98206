"""Jagged target attention with online softmax (flash attention, Dao et al. 2022) in Triton.

    out[n] = sum_{l in rows(u(n))} softmax_l(scale * q[n] . k[l]) v[l]        (0 if u(n) has no rows)

Candidates are sorted by user (`group_candidates`), so a block of BLOCK_N
sorted candidates covers one contiguous range of behavior rows; each row of the
block keeps only its own user's keys (mask ``start[n] <= l < end[n]``).

* forward: one program per candidate block streams its rows in BLOCK_L tiles
  with the online softmax (running max m, normalizer l, rescaled accumulator)
  and stores out and the log-sum-exp per candidate;
* backward (FlashAttention-2): delta[n] = dout[n] . out[n]; one program per tile
  of behavior rows accumulates dk and dv over the candidates of its users, and
  one program per candidate block accumulates dq over its rows:
  p = exp(s - lse), dv += p^T dout, ds = p * (dout v^T - delta), dk += scale ds^T q,
  dq += scale ds k.

Operands are fp32 (IEEE dots) for fp32 inputs and under the interpreter; on a
GPU, bf16/fp16 inputs use their native dot with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._common import (
    BIG, INTERPRETER_ACTIVE, NEG, CandidateGroups, block, candidate_block, dot, group_candidates, pow2,
)

@triton.jit
def _jta_fwd_kernel(
    q_ptr, k_ptr, v_ptr, offsets_ptr, perm_ptr, sorted_user_ptr, out_ptr, lse_ptr,
    n, dim, dim_v, scale,
    DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    rmask, cand, start, end, lo, hi = candidate_block(perm_ptr, sorted_user_ptr, offsets_ptr, n, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    de = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + cand[:, None] * dim + dd[None, :], mask=rmask[:, None] & (dd[None, :] < dim), other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype)  # (BLOCK_N, BLOCK_D)
    m_i = tl.full((BLOCK_N,), NEG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for l0 in range(lo, hi, BLOCK_L):
        ll = l0 + tl.arange(0, BLOCK_L)
        lmask = ll < hi
        k = tl.load(k_ptr + ll[:, None] * dim + dd[None, :], mask=lmask[:, None] & (dd[None, :] < dim), other=0.0)
        v = tl.load(v_ptr + ll[:, None] * dim_v + de[None, :], mask=lmask[:, None] & (de[None, :] < dim_v), other=0.0)
        s = dot(q, tl.trans(k), DOT_F32)  # (BLOCK_N, BLOCK_L)
        valid = (ll[None, :] >= start[:, None]) & (ll[None, :] < end[:, None])
        s = tl.where(valid, s, NEG)  # other users' rows; exp() of them stays finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(valid, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    has_rows = l_i > 0
    out = acc / tl.where(has_rows, l_i, 1.0)[:, None]
    tl.store(out_ptr + cand[:, None] * dim_v + de[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (de[None, :] < dim_v))
    tl.store(lse_ptr + cand, tl.where(has_rows, m_i + tl.log(tl.where(has_rows, l_i, 1.0)), 0.0), mask=rmask)


@triton.jit
def _jta_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, row_user_ptr, cand_offsets_ptr, perm_ptr, sorted_user_ptr,
    dk_ptr, dv_ptr,
    num_rows, dim, dim_v, scale,
    DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    ll = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    lmask = ll < num_rows
    ru = tl.load(row_user_ptr + ll, mask=lmask, other=-1)
    c_lo = tl.load(cand_offsets_ptr + tl.min(tl.where(lmask, ru, BIG), axis=0))
    c_hi = tl.load(cand_offsets_ptr + tl.max(ru, axis=0) + 1)
    dd = tl.arange(0, BLOCK_D)
    de = tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + ll[:, None] * dim + dd[None, :], mask=lmask[:, None] & (dd[None, :] < dim), other=0.0)
    v = tl.load(v_ptr + ll[:, None] * dim_v + de[None, :], mask=lmask[:, None] & (de[None, :] < dim_v), other=0.0)
    dk = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_L, BLOCK_DV), dtype=tl.float32)
    for n0 in range(c_lo, c_hi, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < c_hi
        cand = tl.load(perm_ptr + rows, mask=rmask, other=0)
        user = tl.load(sorted_user_ptr + rows, mask=rmask, other=-2)
        q = tl.load(q_ptr + cand[:, None] * dim + dd[None, :], mask=rmask[:, None] & (dd[None, :] < dim), other=0.0)
        q = (q.to(tl.float32) * scale).to(q.dtype)
        do = tl.load(do_ptr + cand[:, None] * dim_v + de[None, :], mask=rmask[:, None] & (de[None, :] < dim_v),
                     other=0.0)
        lse = tl.load(lse_ptr + cand, mask=rmask, other=0.0)
        delta = tl.load(delta_ptr + cand, mask=rmask, other=0.0)
        s = dot(q, tl.trans(k), DOT_F32)  # (BLOCK_N, BLOCK_L)
        valid = (user[:, None] == ru[None, :]) & rmask[:, None]
        p = tl.where(valid, tl.exp(tl.where(valid, s, NEG) - lse[:, None]), 0.0)
        dv += dot(tl.trans(p).to(do.dtype), do, DOT_F32)
        dp = dot(do, tl.trans(v), DOT_F32)
        ds = p * (dp - delta[:, None])
        dk += dot(tl.trans(ds).to(q.dtype), q, DOT_F32)  # q is pre-scaled: dk = scale * ds^T q
    tl.store(dk_ptr + ll[:, None] * dim + dd[None, :], dk, mask=lmask[:, None] & (dd[None, :] < dim))
    tl.store(dv_ptr + ll[:, None] * dim_v + de[None, :], dv, mask=lmask[:, None] & (de[None, :] < dim_v))


@triton.jit
def _jta_bwd_q_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, offsets_ptr, perm_ptr, sorted_user_ptr, dq_ptr,
    n, dim, dim_v, scale,
    DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    rmask, cand, start, end, lo, hi = candidate_block(perm_ptr, sorted_user_ptr, offsets_ptr, n, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    de = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + cand[:, None] * dim + dd[None, :], mask=rmask[:, None] & (dd[None, :] < dim), other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype)
    do = tl.load(do_ptr + cand[:, None] * dim_v + de[None, :], mask=rmask[:, None] & (de[None, :] < dim_v), other=0.0)
    lse = tl.load(lse_ptr + cand, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + cand, mask=rmask, other=0.0)
    dq = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for l0 in range(lo, hi, BLOCK_L):
        ll = l0 + tl.arange(0, BLOCK_L)
        lmask = ll < hi
        k = tl.load(k_ptr + ll[:, None] * dim + dd[None, :], mask=lmask[:, None] & (dd[None, :] < dim), other=0.0)
        v = tl.load(v_ptr + ll[:, None] * dim_v + de[None, :], mask=lmask[:, None] & (de[None, :] < dim_v), other=0.0)
        s = dot(q, tl.trans(k), DOT_F32)
        valid = (ll[None, :] >= start[:, None]) & (ll[None, :] < end[:, None])
        p = tl.where(valid, tl.exp(tl.where(valid, s, NEG) - lse[:, None]), 0.0)
        ds = p * (dot(do, tl.trans(v), DOT_F32) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, DOT_F32)
    tl.store(dq_ptr + cand[:, None] * dim + dd[None, :], dq * scale, mask=rmask[:, None] & (dd[None, :] < dim))


def _meta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, num_rows: int) -> dict:
    return dict(
        DOT_F32=INTERPRETER_ACTIVE or q.dtype == torch.float32,
        BLOCK_N=block(n, hi=64), BLOCK_L=block(num_rows, hi=64), BLOCK_D=pow2(q.shape[1]), BLOCK_DV=pow2(v.shape[1]),
    )


class _JaggedTargetAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offsets, cand_user, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        n, num_rows = q.shape[0], k.shape[0]
        groups = group_candidates(cand_user, offsets, num_rows)
        out = torch.empty((n, v.shape[1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((n,), dtype=torch.float32, device=q.device)
        meta = _meta(q, k, v, n, num_rows)
        _jta_fwd_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](
            q, k, v, offsets, groups.perm, groups.sorted_user, out, lse,
            n, q.shape[1], v.shape[1], scale, **meta,
        )
        ctx.save_for_backward(q, k, v, offsets, out, lse, *vars(groups).values())
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, offsets, out, lse, *group_tensors = ctx.saved_tensors
        groups = CandidateGroups(*group_tensors)
        n, num_rows, scale = q.shape[0], k.shape[0], ctx.scale
        do = grad_out.to(q.dtype).contiguous()
        delta = (do.float() * out.float()).sum(-1)  # (N,)
        meta = _meta(q, k, v, n, num_rows)
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
        _jta_bwd_kv_kernel[(triton.cdiv(num_rows, meta["BLOCK_L"]),)](
            q, k, v, do, lse, delta, groups.row_user, groups.cand_offsets, groups.perm, groups.sorted_user, dk, dv,
            num_rows, q.shape[1], v.shape[1], scale, **meta,
        )
        _jta_bwd_q_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](
            q, k, v, do, lse, delta, offsets, groups.perm, groups.sorted_user, dq,
            n, q.shape[1], v.shape[1], scale, **meta,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def jagged_target_attention(q, k, v, offsets, cand_user, scale: float) -> torch.Tensor:
    if q.shape[0] == 0 or k.shape[0] == 0:
        return (q.new_zeros(q.shape[0], v.shape[1]) + 0 * q.sum()).to(q.dtype)
    return _JaggedTargetAttention.apply(q, k, v, offsets, cand_user, scale)
