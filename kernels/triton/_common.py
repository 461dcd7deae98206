"""What every Triton launcher needs: interpreter detection, block sizes, candidate grouping.

Kernels here follow the rules that keep them valid both on a GPU and under the
CPU interpreter (``TRITON_INTERPRET=1``): blocks >= 16 and powers of two, no
block pointers, no libdevice, no autotune, and every ``tl.dot`` on fp32 operands
(bf16 dots are wrong under the interpreter, so kernels upcast after loading).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


# TRITON_INTERPRET=1 was set before triton decorated the kernels of this package.
INTERPRETER_ACTIVE: bool = isinstance(_probe, InterpretedFunction)

MIN_BLOCK = 16  # the smallest tl.dot dimension a GPU accepts

BIG: tl.constexpr = tl.constexpr(1 << 62)  # above any row index: the identity of a min over masked lanes
NEG: tl.constexpr = tl.constexpr(-1.0e30)  # finite "minus infinity": exp(NEG - m) underflows to 0, never NaN


@triton.jit
def dot(a, b, DOT_F32: tl.constexpr):
    """a @ b: fp32 operands with IEEE precision (no TF32) if DOT_F32, else native (bf16/fp16) operands."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def candidate_block(perm_ptr, sorted_user_ptr, offsets_ptr, n, BLOCK_N: tl.constexpr):
    """The sorted candidates of this program: original index, user, row range, and the block's row range."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    cand = tl.load(perm_ptr + rows, mask=rmask, other=0)
    user = tl.load(sorted_user_ptr + rows, mask=rmask, other=0)
    start = tl.load(offsets_ptr + user, mask=rmask, other=BIG)
    end = tl.load(offsets_ptr + user + 1, mask=rmask, other=0)
    return rmask, cand, start, end, tl.min(start, axis=0), tl.max(end, axis=0)


def block(n: int, lo: int = MIN_BLOCK, hi: int = 128) -> int:
    """A power-of-two block size covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def pow2(n: int, lo: int = MIN_BLOCK) -> int:
    """The next power of two >= max(n, lo) (a whole dimension held in one block)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


@dataclass(frozen=True)
class CandidateGroups:
    """Candidates sorted by user, so that a block of consecutive sorted candidates covers a
    contiguous range of users and therefore a contiguous range of behavior rows.

    perm         (N,)   int64  sorted position -> original candidate index
    sorted_user  (N,)   int64  user of each sorted candidate (non-decreasing)
    cand_offsets (B+1,) int64  candidates of user b are sorted positions cand_offsets[b]:cand_offsets[b+1]
    row_user     (L,)   int64  user of each behavior row
    """

    perm: torch.Tensor
    sorted_user: torch.Tensor
    cand_offsets: torch.Tensor
    row_user: torch.Tensor


def group_candidates(cand_user: torch.Tensor, offsets: torch.Tensor, num_rows: int) -> CandidateGroups:
    num_users = offsets.numel() - 1
    sorted_user, perm = torch.sort(cand_user, stable=True)
    counts = torch.bincount(cand_user, minlength=num_users)
    cand_offsets = torch.zeros(num_users + 1, dtype=torch.int64, device=cand_user.device)
    cand_offsets[1:] = torch.cumsum(counts, 0)
    row_user = torch.repeat_interleave(
        torch.arange(num_users, device=offsets.device), offsets.diff(), output_size=num_rows
    )
    return CandidateGroups(perm.contiguous(), sorted_user.contiguous(), cand_offsets, row_user.contiguous())
