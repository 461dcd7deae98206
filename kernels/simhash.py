"""SimHash signatures for SDIM: hyperplanes, signatures, and their packing into one int64.

Cao et al. 2022, "Sampling Is All You Need on Modeling Long-Term User Behaviors
for CTR Prediction" (SDIM). With m hash functions of tau bits each and fixed
random hyperplanes ``planes`` (D, m*tau)::

    code[n, j] = sum_{b < tau} [ x[n] . planes[:, j*tau + b] > 0 ] << b        in [0, 2**tau)

Tie rule: a projection of exactly 0 gives bit 0 (so x = 0 has code 0).
The projection is computed in fp32 (bf16/fp16 inputs are upcast first) by every
backend, so backends agree exactly except when a projection lies within fp32
rounding error of 0 (summation order differs); such inputs have probability ~0
for real embeddings, and inputs whose products and sums are exact in fp32
(e.g. small dyadic values) agree always.

A behavior's m codes fit in one int64 when m*tau <= 63 (`pack_codes`); that
value is stored per event (Redis, the batch key ``hist_sdim_sig``).
"""
from __future__ import annotations

import torch

from kernels import _dispatch as d
from kernels.reference import simhash as ref

MAX_BITS = 62  # a code must be a non-negative int64
PACK_BITS = 63  # m * tau of a packed signature

__all__ = ["make_hyperplanes", "pack_codes", "simhash", "unpack_codes"]


def make_hyperplanes(dim: int, num_hashes: int, num_bits: int, seed: int = 0) -> torch.Tensor:
    """The fixed random hyperplanes: (dim, num_hashes * num_bits) float32 standard normals.

    Deterministic for a seed (a CPU ``torch.Generator``), independent of the device
    the result is later moved to. The same seed must be used when behaviors are
    hashed at event time and candidates at request time.
    """
    op = "make_hyperplanes"
    d.check_int(op, "dim", dim, 1)
    d.check_int(op, "num_hashes", num_hashes, 1)
    d.check_int(op, "num_bits", num_bits, 1, MAX_BITS)
    d.check_int(op, "seed", seed, -(1 << 63), (1 << 64) - 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, num_hashes * num_bits, generator=gen, dtype=torch.float32)


def simhash(x: torch.Tensor, planes: torch.Tensor, num_bits: int, *, backend: d.Backend = "auto") -> torch.Tensor:
    """SimHash codes of the rows of x (see the module docstring for the formula and tie rule).

    Args:
        x: (N, D) float (fp32, bf16, fp16).
        planes: (D, m * num_bits) float, from `make_hyperplanes`.
        num_bits: tau, bits per hash function (1..62).
        backend: "auto" | "torch" | "triton".

    Returns:
        (N, m) int64 codes in [0, 2**num_bits).

    Example:
        >>> planes = make_hyperplanes(64, num_hashes=16, num_bits=3)
        >>> simhash(torch.randn(5, 64), planes, 3).shape
        torch.Size([5, 16])
    """
    op = "simhash"
    d.check_tensor(op, "x", x, 2, floating=True)
    d.check_tensor(op, "planes", planes, 2, floating=True)
    d.check_int(op, "num_bits", num_bits, 1, MAX_BITS)
    d.check_dim(op, "planes", planes, 0, x.shape[1], "x.shape[1]")
    if planes.shape[1] == 0 or planes.shape[1] % num_bits:
        raise ValueError(f"{op}: planes.shape[1] must be a positive multiple of num_bits={num_bits} "
                         f"(m hash functions x tau bits), got shape {tuple(planes.shape)}")
    device = d.check_same_device(op, x=x, planes=planes)
    if d.resolve_backend(op, backend, device) == "triton":
        return d.triton_module(op, "simhash").simhash(x, planes, num_bits)
    return ref.simhash(x, planes, num_bits)


def pack_codes(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(N, m) codes in [0, 2**num_bits) -> (N,) int64, code j in bits [j*tau, (j+1)*tau).

    Needs m * num_bits <= 63, so the packed value is a non-negative int64.
    """
    op = "pack_codes"
    d.check_tensor(op, "codes", codes, 2, floating=False)
    d.check_int(op, "num_bits", num_bits, 1, MAX_BITS)
    if codes.shape[1] * num_bits > PACK_BITS:
        raise ValueError(f"{op}: m * num_bits = {codes.shape[1]} * {num_bits} = {codes.shape[1] * num_bits} "
                         f"bits do not fit in one int64 (at most {PACK_BITS})")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 1 << num_bits:
            raise ValueError(f"{op}: codes must be in [0, 2**{num_bits}), got values in [{lo}, {hi}]")
    return ref.pack_codes(codes, num_bits)


def unpack_codes(packed: torch.Tensor, num_hashes: int, num_bits: int) -> torch.Tensor:
    """(N,) int64 packed signatures -> (N, num_hashes) codes; the inverse of `pack_codes`."""
    op = "unpack_codes"
    d.check_tensor(op, "packed", packed, 1, floating=False)
    d.check_int(op, "num_hashes", num_hashes, 1)
    d.check_int(op, "num_bits", num_bits, 1, MAX_BITS)
    if num_hashes * num_bits > PACK_BITS:
        raise ValueError(f"{op}: num_hashes * num_bits = {num_hashes * num_bits} bits do not fit in one int64 "
                         f"(at most {PACK_BITS})")
    return ref.unpack_codes(packed, num_hashes, num_bits)
