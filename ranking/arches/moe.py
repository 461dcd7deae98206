"""MoE arch: AW-MoE (Gong et al. 2023, "Attention Weighted Mixture of Experts with Contrastive
Learning for Personalized Ranking in E-commerce"), and the plain MLP it reduces to with one expert.

E experts f_e are MLPs over the concatenated features x (N, F). Task t mixes
them with its gate::

    h_t(n)   = sum_e g_t(n)_e f_e(x_n)                                   (N, T, H)
    G(n)     = sum_{l in S(u(n))} a_{n,l} GateUnit(v_l)  +  W_b [c_n, user_u(n)]   (N, T*E) gate logits
    g_t(n)   = softmax_e G(n)[t]

`a_{n,l}` are the candidate's short-term target-attention weights (the gate's
"activation unit"), GateUnit a small MLP mapping a behavior's representation to
per-expert logits (the "gate unit"): users are routed to experts by what they
did that is relevant to the candidate. A user without behaviors is routed by
the candidate/user term alone.

The experts run as batched matmuls (one GEMM for all experts' first layers,
bmm after), under bf16 autocast when enabled; gates are computed in fp32.

User-side columns. Some of x's columns are the same for every candidate of a
user (the user's pooled features, user dense features, history length). The
first layer's product with them is computed once per user and added to the
candidates' rows (`Experts(user_cols=...)`, forward with `user_x`, `rows`):
the same function, with a GEMM over the candidate-side columns only (one user
and 500 candidates: a third less of the largest product of a request). Without
gradients (serving) the fused, split first-layer weights are cached until the
parameters change.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from features.hardware import native_bf16
from ranking.config import MoEArchConfig


class Experts(nn.Module):
    """E MLPs of identical shape, evaluated together: (N, F) -> (E, N, H_last).

    user_cols: the columns of the F inputs that are per user (module docstring); forward then takes the other
    columns as `x` (N, F - |user_cols|, in order) and the user columns as `user_x` (B, |user_cols|) with
    `rows` (N,) each candidate's user row.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num_experts: int, dropout: float,
                 user_cols: Sequence[int] = ()) -> None:
        super().__init__()
        self.num_experts = num_experts
        dims = (in_dim,) + tuple(hidden)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(num_experts, a, b)
            for e in range(num_experts):
                nn.init.kaiming_uniform_(w[e].T, a=math.sqrt(5))  # nn.Linear's default init, per expert
            self.weights.append(nn.Parameter(w))
            bound = 1.0 / math.sqrt(a)
            self.biases.append(nn.Parameter(torch.empty(num_experts, 1, b).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout)
        user = set(user_cols)
        if user and not (0 <= min(user) and max(user) < in_dim):
            raise ValueError(f"user_cols {user_cols} outside the {in_dim} input columns")
        self.user_cols = tuple(sorted(user))
        self.cand_cols = tuple(i for i in range(in_dim) if i not in user)
        self._cache: tuple[tuple, tuple] | None = None  # (parameter versions, first-layer weights) without grad

    def _first_layer(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(W_cand (F_c, E*H1), W_user (F_u, E*H1) or None, bias (1, E*H1)): the first layer, experts side by
        side; cached while gradients are off and the parameters unchanged."""
        w0, b0 = self.weights[0], self.biases[0]
        frozen = not torch.is_grad_enabled()
        key = (w0.data_ptr(), w0._version, b0.data_ptr(), b0._version, w0.dtype)
        cached = self._cache
        if frozen and cached is not None and cached[0] == key:
            return cached[1]
        e, f, h = w0.shape
        flat = w0.permute(1, 0, 2).reshape(f, e * h)

        def rows(cols: tuple[int, ...]) -> torch.Tensor:
            return flat.index_select(0, torch.tensor(cols, device=flat.device))

        out = (rows(self.cand_cols), rows(self.user_cols), b0.reshape(1, e * h)) if self.user_cols else \
            (flat, None, b0.reshape(1, e * h))
        if frozen:
            self._cache = (key, out)
        return out

    def forward(self, x: torch.Tensor, user_x: torch.Tensor | None = None, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        e, n = self.num_experts, x.shape[0]
        w_cand, w_user, bias = self._first_layer()
        if w_user is not None:
            if user_x is None or rows is None:
                raise ValueError(f"Experts: {len(self.user_cols)} user columns need user_x and rows")
            per_user = torch.addmm(bias, user_x, w_user)  # (B, E*H1): once per user, bias included
            h = torch.addmm(per_user.index_select(0, rows), x, w_cand)  # (N, E*H1)
        else:
            h = torch.addmm(bias, x, w_cand)
        h = self.dropout(torch.relu(h)).view(n, e, -1).transpose(0, 1)  # (E, N, H1)
        for w, b in zip(list(self.weights)[1:], list(self.biases)[1:]):
            h = self.dropout(torch.relu(torch.baddbmm(b, h, w)))  # (E, N, H)
        return h


class AWMoEArch(nn.Module):
    """x (N, F) and gate logits (N, T*E) -> per-task mixtures (N, T, H). One expert: a plain MLP, no gate.

    Args:
        cfg: experts and gate sizes.
        in_dim: F, the width of the concatenated features.
        value_dim: D, the behaviors' representation width (the gate unit's input).
        base_dim: width of [candidate, user] features for the gate's base term.
        num_tasks: T.
        bf16: run the experts under bf16 autocast on CPUs that compute bf16 natively (`features.hardware`);
            elsewhere fp32 (emulated bf16 is tens of times slower).
        user_cols: the per-user columns of the F (`Experts`); forward then takes `user_x` and `rows`.
    """

    def __init__(self, cfg: MoEArchConfig, in_dim: int, value_dim: int, base_dim: int, num_tasks: int,
                 bf16: bool, user_cols: Sequence[int] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_tasks = num_tasks
        self.bf16 = bf16
        self.experts = Experts(in_dim, cfg.expert_hidden, cfg.num_experts, cfg.dropout, user_cols)
        self.gated = cfg.num_experts > 1
        if self.gated:
            self.gate_unit = nn.Sequential(nn.Linear(value_dim, cfg.gate_hidden), nn.ReLU(),
                                           nn.Linear(cfg.gate_hidden, num_tasks * cfg.num_experts))
            self.gate_base = nn.Linear(base_dim, num_tasks * cfg.num_experts)

    @property
    def out_dim(self) -> int:
        return self.cfg.expert_hidden[-1]

    @property
    def gate_dim(self) -> int:
        return self.num_tasks * self.cfg.num_experts if self.gated else 0

    def gate_values(self, values: torch.Tensor) -> torch.Tensor:
        """(L, D) behavior representations -> (L, T*E) per-behavior expert logits (the gate unit)."""
        return self.gate_unit(values)

    def forward(self, x: torch.Tensor, gate_logits: torch.Tensor, user_x: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and x.device.type == "cpu" and native_bf16()):
            h = self.experts(x, user_x, rows)  # (E, N, H)
        h = h.float()
        if not self.gated:
            return h[0].unsqueeze(1).expand(-1, self.num_tasks, -1)  # (N, T, H)
        g = torch.softmax(gate_logits.view(-1, self.num_tasks, self.cfg.num_experts), dim=-1)  # (N, T, E)
        # sum_e g[n, t, e] h[e, n]: E broadcast multiply-adds (a bmm of N (T x E) @ (E x H) products is slower)
        out = g[:, :, :1] * h[0].unsqueeze(1)
        for e in range(1, self.cfg.num_experts):
            out = out + g[:, :, e:e + 1] * h[e].unsqueeze(1)
        return out
