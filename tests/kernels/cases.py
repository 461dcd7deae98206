"""Ragged cases shared by the kernel tests (jagged target attention, DARE top-K attention, SDIM collision gather).

Every attention-style kernel takes B users' behavior rows as one jagged layout (rows, offsets (B+1,)) and N
candidates each owned by one user (cand_user (N,)). `ragged` draws that layout once for all of them: lengths
from 0 to the maximum (empty users included), at least one user and one candidate, and a seed for the
tensors; each test file draws its own widths on top. `run_with_grads` and `assert_triton_matches_reference`
are the forward-and-gradient comparison every kernel test makes against its PyTorch reference.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from hypothesis import strategies as st

from features.jagged import offsets_of

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


class Ragged:
    """B users with `lengths` rows each and N candidates; tensors come from one seeded generator, in call order."""

    def __init__(self, lengths: Sequence[int], num_candidates: int, seed: int) -> None:
        self.lengths = tuple(int(n) for n in lengths)
        self.num_candidates = num_candidates
        self.seed = seed
        self.offsets = offsets_of(torch.tensor(self.lengths, dtype=torch.int64))  # (B+1,)
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def num_users(self) -> int:
        return len(self.lengths)

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def rows(self, dim: int) -> torch.Tensor:
        return torch.randn(self.num_rows, dim, generator=self.gen)  # (L, dim)

    def candidates(self, dim: int) -> torch.Tensor:
        return torch.randn(self.num_candidates, dim, generator=self.gen)  # (N, dim)

    def cand_user(self) -> torch.Tensor:
        return torch.randint(0, self.num_users, (self.num_candidates,), generator=self.gen)  # (N,)


@st.composite
def ragged(draw: Any, max_users: int, max_len: int, max_cands: int) -> Ragged:
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_users))
    n = draw(st.integers(1, max_cands))
    return Ragged(lengths, n, draw(st.integers(0, 2**16)))


def run_with_grads(op: Callable[..., torch.Tensor], args: dict[str, Any], leaves: Sequence[str], backend: str,
                   grad_out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                   ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """op(**args) with the float inputs named in `leaves` cast to `dtype`; with `grad_out`, also their gradients
    of sum(out * grad_out). Every call makes fresh leaves: ``.to`` returns the tensor itself when the dtype does
    not change, and reusing it would accumulate both backends' gradients into one tensor (compared with itself)."""
    inputs = {name: args[name].detach().to(dtype).clone().requires_grad_() for name in leaves}
    out = op(**{**args, **inputs}, backend=backend)
    if grad_out is None:
        return out.detach(), None
    (out.float() * grad_out).sum().backward()
    return out.detach(), [inputs[name].grad for name in leaves]


def assert_triton_matches_reference(op: Callable[..., torch.Tensor], args: dict[str, Any], leaves: Sequence[str],
                                    grad_out: torch.Tensor) -> None:
    """The Triton kernel equals the PyTorch reference in float32: the output and the gradient of every leaf."""
    ref_out, ref_grads = run_with_grads(op, args, leaves, "torch", grad_out)
    tri_out, tri_grads = run_with_grads(op, args, leaves, "triton", grad_out)
    torch.testing.assert_close(tri_out, ref_out, **TOL[torch.float32])
    for name, got, want in zip(leaves, tri_grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"grad {name}: {m}")
