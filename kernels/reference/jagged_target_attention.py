"""Target attention of candidates over their user's jagged behavior sequence, in PyTorch.

DIN-style target attention (Zhou et al. 2018) with a softmax over the user's
behaviors, as scaled dot-product attention:

    out[n] = sum_{l in rows(u(n))} softmax_l(scale * q[n] . k[l]) v[l]        (0 if u(n) has no rows)

This is the CPU path used in training and serving, so it is built on fused
kernels rather than written out:

* one user (serving: B = 1, C candidates, L up to 10k): one
  ``scaled_dot_product_attention`` on the user's rows, which on CPU is a
  flash-attention kernel (online softmax over key blocks, Dao et al. 2022), so
  the (C, L) score matrix is never materialized;
* many users (training): candidates and behaviors are scattered into a padded
  per-user layout (B, C_max, D) / (B, L_max, D) and SDPA runs with a key mask;
  a user without behaviors gets one zero key and value, i.e. an output of 0.

Inputs in bf16/fp16 are computed in fp32 and the result is cast back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference._jagged import acc_dtype, candidate_slots, pad_rows, padded_rows


def jagged_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    cand_user: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """(N, D), (L, D), (L, Dv), (B+1,), (N,) -> (N, Dv) in q.dtype."""
    n, num_users, dv = q.shape[0], offsets.numel() - 1, v.shape[1]
    out_dtype, dtype = q.dtype, acc_dtype(q)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if n == 0 or k.shape[0] == 0:
        return (q.new_zeros(n, dv) + 0 * q.sum()).to(out_dtype)  # 0 * q.sum(): q still gets a (zero) gradient
    if num_users == 1:  # serving: every candidate attends to all rows
        out = F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], scale=scale)
        return out[0, 0].to(out_dtype)
    lengths = offsets.diff()
    width = int(lengths.max())
    slot, c_max = candidate_slots(cand_user, num_users)
    qp = pad_rows(q, cand_user, slot, num_users, c_max)  # (B, C_max, D)
    kp = padded_rows(k, offsets, width)  # (B, L_max, D)
    vp = padded_rows(v, offsets, width)  # (B, L_max, Dv)
    # Key mask; a user without rows attends to its (zero) first slot, so its output is 0.
    mask = torch.arange(width, device=q.device)[None, :] < lengths.clamp_min(1)[:, None]  # (B, L_max)
    out = F.scaled_dot_product_attention(qp[:, None], kp[:, None], vp[:, None], attn_mask=mask[:, None, None, :],
                                         scale=scale)  # (B, 1, C_max, Dv)
    return out.reshape(num_users * c_max, dv)[cand_user * c_max + slot].to(out_dtype)
