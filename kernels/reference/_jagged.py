"""Jagged-layout helpers shared by the references (B users; user b owns rows offsets[b]:offsets[b+1])."""
from __future__ import annotations

import torch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: fp32 for half types, the input's own for fp32/fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def row_users(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(L,) the user of each behavior row of a jagged layout."""
    num_users = offsets.numel() - 1
    return torch.repeat_interleave(torch.arange(num_users, device=offsets.device), offsets.diff(),
                                   output_size=num_rows)


def candidate_slots(cand_user: torch.Tensor, num_users: int) -> tuple[torch.Tensor, int]:
    """(N,) user of each candidate -> (N,) its rank among its user's candidates, and the max count."""
    sorted_user, perm = torch.sort(cand_user, stable=True)
    counts = torch.bincount(cand_user, minlength=num_users)
    first = torch.cumsum(counts, 0) - counts  # (B,) sorted position of each user's first candidate
    slot = torch.empty_like(cand_user)
    slot[perm] = torch.arange(cand_user.numel(), device=cand_user.device) - first[sorted_user]
    return slot, int(counts.max()) if cand_user.numel() else 0


def pad_rows(x: torch.Tensor, user: torch.Tensor, pos: torch.Tensor, num_users: int, width: int) -> torch.Tensor:
    """Scatter rows x[i] to [user[i], pos[i]] of a zero (B, width, D) tensor (differentiable)."""
    flat = x.new_zeros(num_users * width, x.shape[1])
    return flat.index_copy(0, user * width + pos, x).view(num_users, width, x.shape[1])


def padded_rows(x: torch.Tensor, offsets: torch.Tensor, width: int) -> torch.Tensor:
    """Jagged (L, D) rows -> (B, width, D) zero-padded."""
    num_users = offsets.numel() - 1
    user = row_users(offsets, x.shape[0])
    pos = torch.arange(x.shape[0], device=x.device) - offsets[:-1][user]
    return pad_rows(x, user, pos, num_users, width)
