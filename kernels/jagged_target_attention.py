"""Target attention of candidates over their user's jagged long behavior sequence.

Jagged layout: B users; user b's behaviors are rows offsets[b]:offsets[b+1] of
(L, .) tensors; candidate n belongs to user cand_user[n]. Full softmax
attention over all of the user's behaviors (DIN-style target attention, Zhou et
al. 2018), computed with an online softmax (flash attention, Dao et al. 2022)
that never materializes the (N, L) score matrix. Forward and backward on every
backend. The DARE top-K variant is `kernels.dare_topk_attention`.
"""
from __future__ import annotations

import torch

from kernels import _dispatch as d
from kernels.reference import jagged_target_attention as jta_ref

__all__ = ["jagged_target_attention"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_attention(
    op: str, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str, str],
    offsets: torch.Tensor, cand_user: torch.Tensor, max_len: int,
) -> tuple[str, torch.Tensor, torch.Tensor]:
    qn, kn, vn = names
    for name, t in zip(names, (q, k, v)):
        d.check_tensor(op, name, t, 2, floating=True)
    d.check_dim(op, kn, k, 1, q.shape[1], f"{qn}.shape[1]")
    d.check_dim(op, vn, v, 0, k.shape[0], f"{kn}.shape[0]")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"{op}: {qn}, {kn}, {vn} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    device = d.check_same_device(op, **{qn: q, kn: k, vn: v}, offsets=offsets, cand_user=cand_user)
    offsets, cand_user = d.check_jagged(op, offsets, k.shape[0], kn, max_len, cand_user, q.shape[0])
    resolved = d.resolve_backend(op, backend, device)
    if resolved == "triton" and q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"{op}: the Triton kernel takes fp32/bf16/fp16 inputs, got {q.dtype} (use backend='torch')")
    return resolved, offsets, cand_user


def jagged_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    cand_user: torch.Tensor,
    max_len: int,
    *,
    scale: float | None = None,
    backend: d.Backend = "auto",
) -> torch.Tensor:
    """Softmax target attention of each candidate over its user's behaviors.

        out[n] = sum_{l in rows(u(n))} softmax_l(scale * q[n] . k[l]) v[l]      (0 if u(n) has no behaviors)

    Args:
        q: (N, D) candidate queries.
        k: (L, D) behavior keys of B users, user b in rows offsets[b]:offsets[b+1].
        v: (L, Dv) behavior values.
        offsets: (B+1,) int64.
        cand_user: (N,) int64 user of each candidate (need not be sorted).
        max_len: no user may have more than this many behaviors.
        scale: defaults to 1/sqrt(D).
        backend: "auto" | "torch" | "triton".

    Returns:
        (N, Dv) in q.dtype; gradients flow to q, k and v.

    Example:
        >>> q, k, v = torch.randn(3, 16), torch.randn(10, 16), torch.randn(10, 16)
        >>> jagged_target_attention(q, k, v, torch.tensor([0, 4, 10]), torch.tensor([0, 1, 1]), max_len=6).shape
        torch.Size([3, 16])
    """
    op = "jagged_target_attention"
    resolved, offsets, cand_user = check_attention(op, backend, q, k, v, ("q", "k", "v"), offsets, cand_user, max_len)
    scale = d.default_scale(scale, q.shape[1])
    if resolved == "triton":
        mod = d.triton_module(op, "jagged_target_attention")
        return mod.jagged_target_attention(q, k, v, offsets, cand_user, scale)
    return jta_ref.jagged_target_attention(q, k, v, offsets, cand_user, scale)
