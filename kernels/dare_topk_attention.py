"""DARE top-K target attention with decoupled attention / representation embeddings.

Feng et al. 2024, "Long-Sequence Recommendation Models Need Decoupled
Embeddings" (DARE): each item has a small *attention* embedding, used only to
search the user's long sequence, and a separate *representation* embedding,
used only to aggregate what was found. Same jagged layout as
`kernels.jagged_target_attention`. A smaller attention dimension (e.g. d/2)
makes the search (the (N, L) scoring and the top-K over L) cheaper.
"""
from __future__ import annotations

import torch

from kernels import _dispatch as d
from kernels.jagged_target_attention import check_attention
from kernels.reference import dare_topk_attention as ref

__all__ = ["dare_topk_attention"]


def dare_topk_attention(
    q_att: torch.Tensor,
    k_att: torch.Tensor,
    v_rep: torch.Tensor,
    offsets: torch.Tensor,
    cand_user: torch.Tensor,
    max_len: int,
    top_k: int,
    *,
    scale: float | None = None,
    backend: d.Backend = "auto",
) -> torch.Tensor:
    """DARE: top-K search with attention embeddings, aggregation with representation embeddings.

        s[n, l] = scale * q_att[n] . k_att[l]                l in rows(u(n))
        T[n]    = the top_k behaviors of u(n) by s[n, .]      (all of them if it has fewer)
        out[n]  = sum_{l in T[n]} softmax_{T[n]}(s[n, l]) v_rep[l]      (0 if u(n) has no behaviors)

    Gradients reach q_att and k_att only through the kept scores and v_rep only
    through the aggregation, so the attention and representation tables learn
    separately (Feng et al. 2024). Ties at the top_k-th score: the torch backend
    keeps whichever `torch.topk` returns, the Triton backend keeps the lower
    row; both give the same output unless tied scores straddle the cut.

    Args:
        q_att: (N, Da) candidate attention embeddings.
        k_att: (L, Da) behavior attention embeddings (Da may be smaller than Dv, e.g. Dv / 2).
        v_rep: (L, Dv) behavior representation embeddings.
        offsets, cand_user, max_len: the jagged layout, as in `jagged_target_attention`.
        top_k: behaviors kept per candidate (>= 1; the Triton kernel takes up to 1024).
        scale: defaults to 1/sqrt(Da).
        backend: "auto" | "torch" | "triton".

    Returns:
        (N, Dv) in q_att.dtype.
    """
    op = "dare_topk_attention"
    resolved, offsets, cand_user = check_attention(
        op, backend, q_att, k_att, v_rep, ("q_att", "k_att", "v_rep"), offsets, cand_user, max_len)
    d.check_int(op, "top_k", top_k, 1)
    scale = d.default_scale(scale, q_att.shape[1])
    if resolved == "triton":
        mod = d.triton_module(op, "dare_topk_attention")
        if top_k > mod.MAX_TOP_K:
            raise ValueError(f"{op}: the Triton kernel keeps at most {mod.MAX_TOP_K} behaviors, got top_k={top_k}")
        return mod.dare_topk_attention(q_att, k_att, v_rep, offsets, cand_user, top_k, scale)
    return ref.dare_topk_attention(q_att, k_att, v_rep, offsets, cand_user, top_k, scale)
