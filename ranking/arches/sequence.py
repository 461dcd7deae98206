"""Sequence arch: the candidate's interest vectors from the user's behaviors (all ops from `kernels`).

* short-term: DIN-style target attention (Zhou et al. 2018) of the candidate
  over the last ~50 behaviors, as softmax attention with dot-product scores
  (`kernels.jagged_target_attention`)::

      short_n = sum_{l in last S of u(n)} softmax_l(q_n . k_l / sqrt(Dq)) v_l

  The same attention weights also pool the AW-MoE gate unit's per-behavior
  expert logits (one kernel call over [v, gate values]).
* long-term, over the last `long_len` behaviors (up to 10k), one of:
  "full"  softmax target attention over all of them;
  "dare"  `kernels.dare_topk_attention`: top-K search with the attention
          embeddings, softmax over the kept scores, sum of their
          representation embeddings (DARE, Feng et al. 2024);
  "sdim"  `kernels.collision_gather`: behaviors whose SimHash signature equals
          the candidate's, per hash function, summed, L2-normalized, averaged
          over the m functions; no softmax (SDIM, Cao et al. 2022).

SDIM at serving time (the paper's "behavior sequence encoding"): the per-bucket
sums of a user's behaviors do not depend on the candidate, so the server keeps
them at ingest (`window_bucket_sums`, updated incrementally) and the batch
carries them (`Batch.sdim_sums`); `LongTermArch` then only gathers each
candidate's m buckets (`kernels.gather_buckets`) and never reads the L
behaviors. The window is the model's own: the sums cover exactly the last
`long_len` behaviors, the ones `collision_gather` would scan, so the scores do
not depend on which path ran (the server subtracts a behavior when it leaves
the window). Sums over the whole stored history would need the model trained
on that window instead, and would change with the server's history cap.

Everything is jagged (offsets, cand_user): no (N, L, D) padded tensors here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from features.jagged import offsets_of, segment_rows, tail_index
from kernels import collision_gather, dare_topk_attention, gather_buckets, jagged_target_attention, sdim_bucket_sums
from ranking.arches.embedding import EmbeddedBatch
from ranking.config import SequenceArchConfig


class JaggedSequence(NamedTuple):
    """Candidates attending over their users' behaviors: the arguments of the kernels."""

    queries: torch.Tensor  # (N, Dq)
    keys: torch.Tensor  # (L, Dq)
    values: torch.Tensor  # (L, D)
    offsets: torch.Tensor  # (B+1,) int64
    cand_user: torch.Tensor  # (N,) int64
    max_len: int

    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()


def tail(emb: EmbeddedBatch, n: int) -> tuple[JaggedSequence, torch.Tensor | None]:
    """The last `n` behaviors of every user, and the rows they were taken from (None: all rows)."""
    idx, lengths = tail_index(emb.offsets.diff(), n)
    keys, values = (emb.keys, emb.values) if idx is None else (emb.keys[idx], emb.values[idx])
    max_len = min(emb.max_len, n)
    return JaggedSequence(emb.queries, keys, values, offsets_of(lengths), emb.cand_user, max_len), idx


def attend(seq: JaggedSequence, values: torch.Tensor) -> torch.Tensor:
    """Softmax target attention of the candidates over `values` (L, X) -> (N, X); 0 for empty histories."""
    return jagged_target_attention(seq.queries, seq.keys, values, seq.offsets, seq.cand_user, max(seq.max_len, 1))


def mask_rows(seq: JaggedSequence, keep: torch.Tensor, extra: torch.Tensor) -> tuple[JaggedSequence, torch.Tensor]:
    """Drops the behaviors where `keep` (L,) is False; `extra` (L, X) rows are dropped alongside."""
    users = torch.repeat_interleave(torch.arange(seq.offsets.numel() - 1, device=keep.device), seq.lengths(),
                                    output_size=keep.numel())
    lengths = torch.bincount(users[keep], minlength=seq.offsets.numel() - 1)
    masked = JaggedSequence(seq.queries, seq.keys[keep], seq.values[keep], offsets_of(lengths), seq.cand_user,
                            seq.max_len)
    return masked, extra[keep]


def length_buckets(lengths: torch.Tensor, min_users: int = 64) -> list[torch.Tensor]:
    """Users grouped by history length into power-of-two ranges (1, 2, 3-4, 5-8, ...), each group holding at
    least `min_users` users (small groups merge upwards). Empty histories form their own group.

    The kernels' CPU paths pad a call's users to its longest history; on real data (lengths from a few to
    thousands, median far below the max) one call per group pads at most 2x instead of max/median.
    """
    lengths = lengths.to(torch.int64)
    key = torch.where(lengths > 0, torch.ceil(torch.log2(lengths.clamp_min(1).double())).long() + 1, 0)  # 0, 1, 2, ..
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=1).tolist()
    groups, start, pending = [], 0, 0
    for b, c in enumerate(counts):
        if c == 0:
            continue
        pending += c
        if b == 0 or pending >= min_users:
            groups.append(order[start:start + pending])
            start, pending = start + pending, 0
    if pending:
        if groups and groups[-1].numel() and int(key[groups[-1][0]]) > 0:
            groups[-1] = torch.cat([groups[-1], order[start:]])
        else:
            groups.append(order[start:])
    return groups


class LongTermArch(nn.Module):
    """The long-term interest vector (N, D) from one of full / dare / sdim (see the module docstring).

    Full attention processes users in groups of similar history length (`length_buckets`), one kernel
    call per group, so short histories are not padded to the batch's longest one (2.5x faster on ML-1M
    length distributions); DARE and SDIM cost the same either way on CPU and run in one call.
    """

    def __init__(self, cfg: SequenceArchConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def _call(self, seq: JaggedSequence, codes: torch.Tensor | None, cand_codes: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        max_len = max(seq.max_len, 1)
        if cfg.long == "full":
            return attend(seq, seq.values)
        if cfg.long == "dare":
            return dare_topk_attention(seq.queries, seq.keys, seq.values, seq.offsets, seq.cand_user, max_len,
                                       cfg.top_k)
        if cfg.long == "sdim":
            assert codes is not None and cand_codes is not None
            return collision_gather(seq.values, codes, seq.offsets, cand_codes, seq.cand_user, max_len)
        raise ValueError(f"no long-term module {cfg.long!r}")

    def window_bucket_sums(self, values: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """SDIM bucket sums over the window this module attends: each user's last `long_len` behaviors.

        Args:
            values: (L, D) behavior representations (`EmbeddingArch.behavior_values`); codes: (L, m) int64
                SimHash codes; offsets: (B+1,) int64 jagged users.

        Returns:
            (B, m, 2**tau, D) float32, so that ``gather_buckets(sums, cand_codes, cand_user)`` equals
            `forward`'s SDIM output on the same behaviors.
        """
        idx, lengths = tail_index(offsets.diff(), self.cfg.long_len)
        if idx is not None:
            values, codes = values[idx], codes[idx]
        return sdim_bucket_sums(values, codes, offsets_of(lengths), self.cfg.sdim_bits)

    def forward(self, emb: EmbeddedBatch) -> torch.Tensor:
        if emb.long_sums is not None:  # SDIM from the sums kept at ingest: no scan of the behaviors
            assert emb.cand_codes is not None  # EmbeddingArch passes sums on only with an SDIM module
            return gather_buckets(emb.long_sums, emb.cand_codes, emb.cand_user)
        seq, idx = tail(emb, self.cfg.long_len)
        codes = None if emb.hist_codes is None else (emb.hist_codes if idx is None else emb.hist_codes[idx])
        lengths = seq.lengths()
        groups = length_buckets(lengths) if self.cfg.long == "full" else []
        if len(groups) <= 1:
            return self._call(seq, codes, emb.cand_codes)
        num_users = lengths.numel()
        out = seq.values.new_zeros(seq.queries.shape[0], seq.values.shape[1])
        group_of = torch.empty(num_users, dtype=torch.int64, device=lengths.device)
        local = torch.empty(num_users, dtype=torch.int64, device=lengths.device)
        for g, users in enumerate(groups):
            group_of[users] = g
            local[users] = torch.arange(users.numel(), device=lengths.device)
        cand_group = group_of[seq.cand_user]
        for g, users in enumerate(groups):
            cands = torch.nonzero(cand_group == g).squeeze(1)
            if cands.numel() == 0:
                continue
            glen = lengths[users]
            if int(glen.max()) == 0:
                continue  # users without behaviors: a long-term interest of 0
            rows = segment_rows(seq.offsets[users], glen)
            sub = JaggedSequence(seq.queries[cands], seq.keys[rows], seq.values[rows], offsets_of(glen),
                                 local[seq.cand_user[cands]], int(glen.max()) if glen.numel() else 0)
            res = self._call(sub, None if codes is None else codes[rows],
                             None if emb.cand_codes is None else emb.cand_codes[cands])
            out = out.index_copy(0, cands, res)
        return out
