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
"""
from __future__ import annotations

import math

import torch
from torch import nn

from features.hardware import native_bf16
from ranking.config import MoEArchConfig


class Experts(nn.Module):
    """E MLPs of identical shape, evaluated together: (N, F) -> (E, N, H_last)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num_experts: int, dropout: float) -> None:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.num_experts
        w0, b0 = self.weights[0], self.biases[0]
        h = (x @ w0.permute(1, 0, 2).reshape(x.shape[1], -1)).view(x.shape[0], e, -1).transpose(0, 1) + b0  # (E, N, H1)
        h = self.dropout(torch.relu(h))
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
    """

    def __init__(self, cfg: MoEArchConfig, in_dim: int, value_dim: int, base_dim: int, num_tasks: int,
                 bf16: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_tasks = num_tasks
        self.bf16 = bf16
        self.experts = Experts(in_dim, cfg.expert_hidden, cfg.num_experts, cfg.dropout)
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

    def forward(self, x: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and x.device.type == "cpu" and native_bf16()):
            h = self.experts(x)  # (E, N, H)
        h = h.float()
        if not self.gated:
            return h[0].unsqueeze(1).expand(-1, self.num_tasks, -1)  # (N, T, H)
        g = torch.softmax(gate_logits.view(-1, self.num_tasks, self.cfg.num_experts), dim=-1)  # (N, T, E)
        return torch.einsum("nte,enh->nth", g, h)
