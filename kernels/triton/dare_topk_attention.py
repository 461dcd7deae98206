"""DARE top-K attention with decoupled embeddings (Feng et al. 2024) as Triton kernels.

    s[n, l] = scale * q_att[n] . k_att[l]                 l in rows(u(n))
    T[n]    = top_k of s[n, .]       out[n] = sum_{l in T[n]} softmax_T(s[n, l]) v_rep[l]

* select: one program per block of BLOCK_N candidates (sorted by user) streams
  its users' rows in tiles of K_PAD = next_pow2(top_k) keys, scores them with a
  ``tl.dot`` and merges them into a running per-candidate top-K_PAD buffer. A
  score and its row are packed into one sortable int64 key: the order-preserving
  int32 image of the fp32 score in the high half, the complement of the row's
  position in the low half (so equal scores prefer the lower row); the merge is
  one bitonic ``tl.topk`` of buffer ++ tile, skipped when no key of the tile can enter.
  It writes the kept rows and scores (N, top_k) (-1 = no row).
* aggregate: one program per candidate: softmax over its kept scores and the
  weighted sum of the gathered v_rep rows.
* backward: one program per candidate: dw = v_rep[T] dout, ds = w (dw - w.dw),
  dq_att = scale ds k_att[T]; dk_att[T] += scale ds q_att and dv_rep[T] += w dout
  with atomic adds (rows are shared by the candidates of a user).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._common import INTERPRETER_ACTIVE, NEG, block, candidate_block, dot, group_candidates, pow2

MAX_TOP_K = 1024
_INVALID: tl.constexpr = tl.constexpr(-(1 << 63))  # the smallest int64: sorts after every real key


@triton.jit
def _sortable(s):
    """fp32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _unsortable(key32):
    bits = key32 ^ ((key32 >> 31) & 0x7FFFFFFF)  # the map is an involution
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _merge_top(best, keys, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr):
    """The K_PAD largest of best ++ keys per row, sorted descending."""
    both = tl.reshape(tl.permute(tl.join(best, keys), (0, 2, 1)), (BLOCK_N, 2 * K_PAD))
    return tl.topk(both, K_PAD, dim=1)


@triton.jit
def _dare_select_kernel(
    q_ptr, k_ptr, offsets_ptr, perm_ptr, sorted_user_ptr, rows_out_ptr, scores_out_ptr,
    n, dim, top_k, scale,
    DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rmask, cand, start, end, lo, hi = candidate_block(perm_ptr, sorted_user_ptr, offsets_ptr, n, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + cand[:, None] * dim + dd[None, :], mask=rmask[:, None] & (dd[None, :] < dim), other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype)
    best = tl.full((BLOCK_N, K_PAD), _INVALID, dtype=tl.int64)  # packed keys, sorted descending
    for l0 in range(lo, hi, K_PAD):
        ll = l0 + tl.arange(0, K_PAD)
        k = tl.load(k_ptr + ll[:, None] * dim + dd[None, :], mask=(ll[:, None] < hi) & (dd[None, :] < dim), other=0.0)
        s = dot(q, tl.trans(k), DOT_F32)  # (BLOCK_N, K_PAD)
        valid = (ll[None, :] >= start[:, None]) & (ll[None, :] < end[:, None])
        low = 0xFFFFFFFF - (ll[None, :] - start[:, None])  # lower row -> larger key on equal scores
        keys = (_sortable(s).to(tl.int64) << 32) | low
        keys = tl.where(valid, keys, _INVALID)
        kth = tl.min(best, axis=1)  # each row's current K_PAD-th key
        if tl.max((tl.max(keys, axis=1) > kth).to(tl.int32), axis=0) > 0:  # some row improves: merge
            best = _merge_top(best, keys, BLOCK_N, K_PAD)
    found = best != _INVALID
    row = tl.where(found, start[:, None] + (0xFFFFFFFF - (best & 0xFFFFFFFF)), -1)
    score = _unsortable((best >> 32).to(tl.int32))
    kk = tl.arange(0, K_PAD)
    out_mask = rmask[:, None] & (kk[None, :] < top_k)
    tl.store(rows_out_ptr + cand[:, None] * top_k + kk[None, :], row, mask=out_mask)
    tl.store(scores_out_ptr + cand[:, None] * top_k + kk[None, :], tl.where(found, score, 0.0), mask=out_mask)


@triton.jit
def _softmax_kept(rows_ptr, scores_ptr, n_idx, top_k, K_PAD: tl.constexpr):
    kk = tl.arange(0, K_PAD)
    kmask = kk < top_k
    rows = tl.load(rows_ptr + n_idx * top_k + kk, mask=kmask, other=-1)
    s = tl.load(scores_ptr + n_idx * top_k + kk, mask=kmask, other=0.0)
    valid = rows >= 0
    s = tl.where(valid, s, NEG)
    m = tl.max(s, axis=0)
    e = tl.where(valid, tl.exp(s - m), 0.0)
    w = e / tl.maximum(tl.sum(e, axis=0), 1.0)  # a row with a kept score sums to >= 1; none -> all 0
    return rows, valid, w


@triton.jit
def _dare_aggregate_kernel(
    v_ptr, rows_ptr, scores_ptr, out_ptr, dim_v, top_k,
    K_PAD: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    rows, valid, w = _softmax_kept(rows_ptr, scores_ptr, i, top_k, K_PAD)
    de = tl.arange(0, BLOCK_DV)
    v = tl.load(v_ptr + rows[:, None] * dim_v + de[None, :], mask=valid[:, None] & (de[None, :] < dim_v),
                other=0.0).to(tl.float32)  # (K_PAD, BLOCK_DV)
    out = tl.sum(w[:, None] * v, axis=0)
    tl.store(out_ptr + i * dim_v + de, out.to(out_ptr.dtype.element_ty), mask=de < dim_v)


@triton.jit
def _dare_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, rows_ptr, scores_ptr, dq_ptr, dk_ptr, dv_ptr,
    dim, dim_v, top_k, scale,
    K_PAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    rows, valid, w = _softmax_kept(rows_ptr, scores_ptr, i, top_k, K_PAD)
    dd = tl.arange(0, BLOCK_D)
    de = tl.arange(0, BLOCK_DV)
    dmask = valid[:, None] & (dd[None, :] < dim)
    emask = valid[:, None] & (de[None, :] < dim_v)
    do = tl.load(do_ptr + i * dim_v + de, mask=de < dim_v, other=0.0).to(tl.float32)  # (BLOCK_DV,)
    v = tl.load(v_ptr + rows[:, None] * dim_v + de[None, :], mask=emask, other=0.0).to(tl.float32)  # (K_PAD, BLOCK_DV)
    dw = tl.sum(v * do[None, :], axis=1)  # (K_PAD,)
    ds = w * (dw - tl.sum(w * dw, axis=0))  # softmax backward; 0 where not kept
    k = tl.load(k_ptr + rows[:, None] * dim + dd[None, :], mask=dmask, other=0.0).to(tl.float32)  # (K_PAD, BLOCK_D)
    q = tl.load(q_ptr + i * dim + dd, mask=dd < dim, other=0.0).to(tl.float32)
    tl.store(dq_ptr + i * dim + dd, scale * tl.sum(ds[:, None] * k, axis=0), mask=dd < dim)
    tl.atomic_add(dk_ptr + rows[:, None] * dim + dd[None, :], scale * ds[:, None] * q[None, :], mask=dmask)
    tl.atomic_add(dv_ptr + rows[:, None] * dim_v + de[None, :], w[:, None] * do[None, :], mask=emask)


def select(q_att, k_att, offsets, cand_user, top_k: int, scale: float):
    """(N, top_k) kept rows (-1: none) and their fp32 scores."""
    n, num_rows = q_att.shape[0], k_att.shape[0]
    groups = group_candidates(cand_user, offsets, num_rows)
    rows = torch.empty((n, top_k), dtype=torch.int64, device=q_att.device)
    scores = torch.empty((n, top_k), dtype=torch.float32, device=q_att.device)
    block_n = block(n, hi=16)
    _dare_select_kernel[(triton.cdiv(n, block_n),)](
        q_att, k_att, offsets, groups.perm, groups.sorted_user, rows, scores,
        n, q_att.shape[1], top_k, scale,
        DOT_F32=INTERPRETER_ACTIVE or q_att.dtype == torch.float32,
        BLOCK_N=block_n, K_PAD=pow2(top_k), BLOCK_D=pow2(q_att.shape[1]),
    )
    return rows, scores


class _DareTopkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_att, k_att, v_rep, offsets, cand_user, top_k, scale):
        q_att, k_att, v_rep = q_att.contiguous(), k_att.contiguous(), v_rep.contiguous()
        rows, scores = select(q_att, k_att, offsets, cand_user, top_k, scale)
        n, dim_v = q_att.shape[0], v_rep.shape[1]
        out = torch.empty((n, dim_v), dtype=q_att.dtype, device=q_att.device)
        _dare_aggregate_kernel[(n,)](v_rep, rows, scores, out, dim_v, top_k, K_PAD=pow2(top_k), BLOCK_DV=pow2(dim_v))
        ctx.save_for_backward(q_att, k_att, v_rep, rows, scores)
        ctx.top_k, ctx.scale = top_k, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_att, k_att, v_rep, rows, scores = ctx.saved_tensors
        n = q_att.shape[0]
        dq = torch.empty(q_att.shape, dtype=torch.float32, device=q_att.device)
        dk = torch.zeros(k_att.shape, dtype=torch.float32, device=q_att.device)
        dv = torch.zeros(v_rep.shape, dtype=torch.float32, device=q_att.device)
        _dare_bwd_kernel[(n,)](
            q_att, k_att, v_rep, grad_out.contiguous(), rows, scores, dq, dk, dv,
            q_att.shape[1], v_rep.shape[1], ctx.top_k, ctx.scale,
            K_PAD=pow2(ctx.top_k), BLOCK_D=pow2(q_att.shape[1]), BLOCK_DV=pow2(v_rep.shape[1]),
        )
        return dq.to(q_att.dtype), dk.to(k_att.dtype), dv.to(v_rep.dtype), None, None, None, None


def dare_topk_attention(q_att, k_att, v_rep, offsets, cand_user, top_k: int, scale: float) -> torch.Tensor:
    if q_att.shape[0] == 0 or k_att.shape[0] == 0:
        return (q_att.new_zeros(q_att.shape[0], v_rep.shape[1]) + 0 * q_att.sum()).to(q_att.dtype)
    return _DareTopkAttention.apply(q_att, k_att, v_rep, offsets, cand_user, top_k, scale)
