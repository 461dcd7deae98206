"""SimHash signatures for SDIM in plain PyTorch.

Cao et al. 2022, "Sampling Is All You Need on Modeling Long-Term User Behaviors
for CTR Prediction" (SDIM): a vector x gets m hash signatures of tau
bits each from m*tau fixed random hyperplanes w:

    code[n, j] = sum_{b < tau} [ x[n] . w[:, j*tau + b] > 0 ] << b        in [0, 2**tau)

A projection of exactly 0 gives bit 0. Behaviors and a candidate "collide" in
hash function j when their codes are equal; the probability grows with their
cosine similarity, which is what SDIM's sampling relies on.
"""
from __future__ import annotations

import torch


def simhash(x: torch.Tensor, planes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(N, D) float, (D, m*tau) -> (N, m) int64 codes; the projection is computed in fp32."""
    n = x.shape[0]
    proj = x.float() @ planes.float()  # (N, m*tau)
    bits = (proj > 0).view(n, planes.shape[1] // num_bits, num_bits).to(torch.int64)  # (N, m, tau)
    weights = torch.ones(num_bits, dtype=torch.int64, device=x.device) << torch.arange(num_bits, device=x.device)
    return (bits * weights).sum(-1)  # (N, m)


def pack_codes(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(N, m) codes -> (N,) int64 with code j in bits [j*tau, (j+1)*tau); needs m*tau <= 63."""
    m = codes.shape[1]
    shifts = torch.arange(m, device=codes.device) * num_bits
    return (codes.to(torch.int64) << shifts).sum(-1)


def unpack_codes(packed: torch.Tensor, num_hashes: int, num_bits: int) -> torch.Tensor:
    """(N,) int64 -> (N, m) codes; inverse of `pack_codes`."""
    shifts = torch.arange(num_hashes, device=packed.device) * num_bits
    return (packed.to(torch.int64)[:, None] >> shifts) & ((1 << num_bits) - 1)
