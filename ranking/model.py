"""The CTR ranker: embedding arch -> sequence arch -> AW-MoE arch -> task heads.

    emb      = EmbeddingArch(batch)                         behaviors, candidates, pooled user/candidate features
    short    = target attention over the last S behaviors   (DIN; also pools the gate unit's logits)
    long     = full | DARE | SDIM over the last L behaviors
    x        = [user, candidate, candidate attrs, short, short*c, long, long*c, user dense, candidate dense, log1p(len)]
    gate     = attention-pooled gate unit + W_b [c, user]    (AW-MoE; none with one expert)
    logits   = heads(mixture of experts(x))                  (N, T)
    logits[:, 0] += candidate_dense[:, residual_column]     second stage only: the retriever's logit, the
                                                             heads starting at zero (an untrained ranker = the retriever)

Plain TorchRec modules only; `features.train.sharding.shard_model` wraps the
train task (ranking.task) from outside. `forward(batch)` always returns a
`RankerOutput`; `encode` / `score` / `gate_logits` split it so that the train
task can score the gate on masked copies of the sequence without re-embedding.

Example::

    cfg = ModelConfig(user_dense_dim=8, candidate_dense_dim=9)
    model = RankerModel(cfg, embedding_device="cpu")
    out = model(batch)            # out.logits (N, 1)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from features.batch import Batch
from ranking.arches.embedding import EmbeddingArch
from ranking.arches.heads import TaskHeads
from ranking.arches.moe import AWMoEArch
from ranking.arches.sequence import JaggedSequence, LongTermArch, attend, mask_rows, tail
from ranking.config import ModelConfig


class RankerOutput(NamedTuple):
    logits: torch.Tensor  # (N, T)
    gate_logits: torch.Tensor  # (N, T*E) AW-MoE gate logits; (N, 0) without a gate


class RankerFeatures(NamedTuple):
    """What the bottom computes for a batch: the experts' input and the gate's parts."""

    x: torch.Tensor  # (N, F_c) the experts' candidate-side input (the F columns but the user ones)
    gate_base: torch.Tensor  # (N, T*E) the candidate/user term of the gate logits; (N, 0) without a gate
    gate_attended: torch.Tensor  # (N, T*E) the attention-pooled gate unit logits; (N, 0) without a gate
    short: JaggedSequence | None  # the short-term sequence (for masked gate views)
    gate_values: torch.Tensor | None  # (S, T*E) per-behavior gate unit logits of the short-term sequence
    base: torch.Tensor | None = None  # (N,) the first stage's logit (second-stage mode), else None
    x_user: torch.Tensor | None = None  # (B, F_u) the experts' per-user input columns
    rows: torch.Tensor | None = None  # (N,) each candidate's user row


class RankerModel(nn.Module):
    """The model (see the module docstring). B users, N candidates, T tasks, E experts.

    Args:
        cfg: a resolved ModelConfig (dense dims known, see `ranking.train.resolve_model_config`).
        embedding_device: "meta" when DistributedModelParallel shards the tables,
            "cpu" for an unsharded model (tests, export, inference).
    """

    def __init__(self, cfg: ModelConfig, embedding_device: torch.device | str = "meta") -> None:
        super().__init__()
        if not cfg.resolved:
            raise ValueError(f"ModelConfig needs user_dense_dim and candidate_dense_dim (got {cfg.user_dense_dim}, "
                             f"{cfg.candidate_dense_dim}); resolve them from the data first")
        self.cfg = cfg
        e, s = cfg.embedding, cfg.sequence
        self.embedding = EmbeddingArch(e, s, embedding_device)
        self.long = LongTermArch(s) if s.long != "none" else None
        d = e.dim
        in_dim = (self.embedding.user_pooled_dim + self.embedding.cand_pooled_dim + d
                  + (2 * d if s.short_len else 0) + (2 * d if self.long is not None else 0)
                  + cfg.user_dense_dim + cfg.candidate_dense_dim + 1)
        base_dim = d + self.embedding.user_pooled_dim + cfg.user_dense_dim
        # the experts' input columns, in the order of their weights' rows: [user pooled | candidate pooled |
        # candidate | short-term (2D) | long-term (2D) | user dense | candidate dense | log1p(history length)];
        # the per-user ones are multiplied once per user (ranking.arches.moe, "User-side columns")
        pu, du = self.embedding.user_pooled_dim, cfg.user_dense_dim
        user_dense_at = in_dim - 1 - cfg.candidate_dense_dim - du
        user_cols = [*range(pu), *range(user_dense_at, user_dense_at + du), in_dim - 1]
        self.moe = AWMoEArch(cfg.moe, in_dim, d, base_dim, len(cfg.heads.tasks), cfg.bf16_mlp, user_cols)
        self.heads = TaskHeads(cfg.heads, self.moe.out_dim)
        if cfg.residual_column >= 0:
            self.heads.zero_()  # the correction starts at exactly zero

    def encode(self, batch: Batch) -> RankerFeatures:
        s = self.cfg.sequence
        emb = self.embedding(batch)
        cu = emb.cand_user
        c = emb.candidates  # (N, D)
        user_pooled = emb.user_pooled[cu]  # (N, Fu*P)
        user_dense = batch.user_dense[cu]  # (N, Du)
        parts = [emb.cand_pooled, c]
        short = gate_values = None
        n = c.shape[0]
        gate_attended = c.new_zeros(n, self.moe.gate_dim)
        if s.short_len:
            short, _ = tail(emb, s.short_len)
            if self.moe.gated:
                gate_values = self.moe.gate_values(short.values)  # (S, T*E)
                pooled = attend(short, torch.cat([short.values, gate_values], dim=1))  # one pass: (N, D + T*E)
                short_out, gate_attended = pooled[:, : c.shape[1]], pooled[:, c.shape[1]:]
            else:
                short_out = attend(short, short.values)  # (N, D)
            parts += [short_out, short_out * c]
        if self.long is not None:
            long_out = self.long(emb)  # (N, D)
            parts += [long_out, long_out * c]
        seen = emb.offsets.diff() if emb.seen_lengths is None else emb.seen_lengths  # (B,)
        parts.append(batch.candidate_dense)
        x = torch.cat(parts, dim=1)  # (N, F_c)
        x_user = torch.cat([emb.user_pooled, batch.user_dense, torch.log1p(seen.to(c.dtype))[:, None]], dim=1)
        if self.moe.gated:
            gate_base = self.moe.gate_base(torch.cat([c, user_pooled, user_dense], dim=1))
        else:
            gate_base = c.new_zeros(n, 0)
        base = batch.candidate_dense[:, self.cfg.residual_column] if self.cfg.residual_column >= 0 else None
        return RankerFeatures(x, gate_base, gate_attended, short, gate_values, base, x_user, cu)

    def gate_logits(self, f: RankerFeatures, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T*E) gate logits; with `keep` (S,) bool, on the short-term sequence without the dropped behaviors."""
        if keep is None or f.short is None or f.gate_values is None:
            return f.gate_base + f.gate_attended
        seq, values = mask_rows(f.short, keep, f.gate_values)
        return f.gate_base + attend(seq, values)

    def score(self, f: RankerFeatures) -> RankerOutput:
        gate = self.gate_logits(f)
        logits = self.heads(self.moe(f.x, gate, f.x_user, f.rows))  # (N, T)
        if f.base is not None:
            logits = torch.cat([logits[:, :1] + f.base[:, None], logits[:, 1:]], dim=1)
        return RankerOutput(logits, gate)

    def forward(self, batch: Batch) -> RankerOutput:
        return self.score(self.encode(batch))
