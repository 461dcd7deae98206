"""Task heads: one logit per task from that task's mixture of the shared bottom."""
from __future__ import annotations

import math

import torch
from torch import nn

from ranking.config import HeadsConfig


class TaskHeads(nn.Module):
    """(N, T, H) per-task features -> (N, T) logits; task t has its own linear layer."""

    def __init__(self, cfg: HeadsConfig, in_dim: int) -> None:
        super().__init__()
        self.tasks = cfg.tasks
        t = len(cfg.tasks)
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(t, in_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(t))

    @torch.no_grad()
    def zero_(self) -> None:
        """Zero weights and biases: the heads output 0 until trained (a residual on a first-stage logit)."""
        self.weight.zero_()
        self.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h * self.weight).sum(-1) + self.bias  # (N, T)
