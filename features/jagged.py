"""Index arithmetic on jagged layouts, once: every module that gathers rows of a jagged array uses these.

A jagged array is ``values`` (sum L,) with per-row ``lengths`` (B,); row b owns
``values[offsets[b]:offsets[b + 1]]`` with ``offsets = offsets_of(lengths)``.
The torch functions serve the models (they stay on the input's device); the
numpy one serves the reader and the server's catalog. All are vectorized: no
loop over rows.

    rows = segment_rows(starts, lengths)      # the rows of segments [starts[i], starts[i] + lengths[i])
    idx, new_len = tail_index(lengths, n)     # the rows of the last n elements of every row (None: all)
    v, l = jagged_tail(values, lengths, n)    # the same, gathered
"""
from __future__ import annotations

import numpy as np
import torch


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) lengths -> (B+1,) int64 offsets (0, l0, l0+l1, ...)."""
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def segment_rows(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row indices of the segments [starts[i], starts[i] + lengths[i]), concatenated in order. (sum lengths,)"""
    lengths = lengths.to(torch.int64)
    total = int(lengths.sum())
    out_start = torch.cumsum(lengths, 0) - lengths  # (B,) where each segment lands in the output
    return torch.arange(total, device=starts.device) + torch.repeat_interleave(starts.to(torch.int64) - out_start,
                                                                               lengths, output_size=total)


def segment_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`segment_rows` for numpy arrays: flat indices of the segments [starts[i], starts[i] + lengths[i])."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    out_start = np.cumsum(lengths) - lengths  # (B,) where each segment lands in the output
    return np.arange(total, dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64) - out_start, lengths)


def tail_index(lengths: torch.Tensor, n: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Rows of the last `n` elements of every jagged row (None when nothing is cut) and the new lengths
    ``min(L, n)``."""
    lengths = lengths.to(torch.int64)
    new_len = lengths.clamp(max=n)
    if lengths.numel() == 0 or bool(torch.equal(new_len, lengths)):
        return None, lengths
    ends = torch.cumsum(lengths, 0)
    return segment_rows(ends - new_len, new_len), new_len


def jagged_tail(values: torch.Tensor, lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `n` elements of every row of a jagged tensor (e.g. the short-term history).

    values: (sum L,), lengths: (B,) -> (values', lengths') with lengths' = min(L, n).
    """
    idx, new_len = tail_index(lengths, n)
    return (values if idx is None else values[idx]), new_len
