"""Backend selection and argument checks shared by the public kernel functions.

Every public op takes ``backend: Backend``:

* ``"auto"``   Triton for CUDA tensors, the PyTorch reference for CPU tensors;
* ``"torch"``  the PyTorch reference (any device);
* ``"triton"`` the Triton kernel: CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before the kernel modules were imported
  (that is how the tests run the kernels on CPU).

An unavailable backend raises `BackendUnavailableError`; nothing falls back
silently. Bad arguments raise `ValueError` naming the op, the argument and
the sizes.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these tensors here; says why and what to do."""


def triton_module(op: str, name: str) -> ModuleType:
    """Import ``kernels.triton.<name>`` (lazily: CPU-only processes never import triton)."""
    try:
        return importlib.import_module(f"kernels.triton.{name}")
    except ImportError as e:  # triton missing or broken on this platform
        raise BackendUnavailableError(
            f"{op}: backend='triton' needs the `triton` package, which failed to import ({e}); "
            "install the pinned triton==3.9.0 or use backend='torch'"
        ) from e


def resolve_backend(op: str, backend: str, device: torch.device) -> Literal["torch", "triton"]:
    """The backend that will run `op` on tensors on `device`; raises if it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    if device.type == "cuda":
        triton_module(op, "_common")
        return "triton"
    if device.type == "cpu":
        common = triton_module(op, "_common")
        if common.INTERPRETER_ACTIVE:
            return "triton"
        raise BackendUnavailableError(
            f"{op}: backend='triton' got CPU tensors but the Triton interpreter is off; Triton kernels run "
            "on CUDA tensors, or on CPU only when TRITON_INTERPRET=1 is set before `kernels` is imported "
            "(use backend='torch' or 'auto' for CPU tensors)"
        )
    raise BackendUnavailableError(f"{op}: backend='triton' runs on CUDA tensors, got tensors on {device}")


# ---- argument checks ---------------------------------------------------------------------------


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it. The error names the two arguments that differ."""
    items = [(name, check_tensor(op, name, t, None)) for name, t in tensors.items()]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             "move all arguments to one device")
    return first.device


def check_tensor(op: str, name: str, t: object, ndim: int | None, *, floating: bool | None = None) -> torch.Tensor:
    """`t` is a tensor with `ndim` dims (None: any); floating=True/False also checks the dtype kind."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if floating is True and not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    return t


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{op}: {name}.shape[{dim}] must equal {what} ({expected}), got shape {tuple(t.shape)}")


def check_jagged(
    op: str,
    offsets: torch.Tensor,
    num_rows: int,
    rows_name: str,
    max_len: int,
    cand_user: torch.Tensor | None = None,
    num_candidates: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a jagged layout (offsets over `num_rows` rows, optional candidate -> user map).

    Returns offsets and cand_user as int64. Value checks (offsets start at 0, never decrease, end
    at `num_rows`, no length above `max_len`, users in range) are gathered into one host sync.
    """
    check_tensor(op, "offsets", offsets, 1, floating=False)
    if offsets.numel() < 1:
        raise ValueError(f"{op}: offsets must have B+1 >= 1 entries, got shape {tuple(offsets.shape)}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0:
        raise ValueError(f"{op}: max_len must be a non-negative int, got {max_len!r}")
    offsets = offsets.to(torch.int64)
    num_users = offsets.numel() - 1
    lengths = offsets.diff()
    checks = [offsets[0] == 0, offsets[-1] == num_rows, (lengths >= 0).all(), (lengths <= max_len).all()]
    if cand_user is not None:
        check_tensor(op, "cand_user", cand_user, 1, floating=False)
        if num_candidates is not None and cand_user.numel() != num_candidates:
            raise ValueError(f"{op}: cand_user must have one entry per candidate ({num_candidates}), "
                             f"got shape {tuple(cand_user.shape)}")
        cand_user = cand_user.to(torch.int64)
        if cand_user.numel():
            checks.append(((cand_user >= 0) & (cand_user < num_users)).all())
    ok = torch.stack(checks).tolist()  # one host sync for all value checks
    if not ok[0]:
        raise ValueError(f"{op}: offsets[0] must be 0, got {int(offsets[0])}")
    if not ok[1]:
        raise ValueError(f"{op}: offsets[-1] ({int(offsets[-1])}) must equal the number of rows of "
                         f"{rows_name} ({num_rows})")
    if not ok[2]:
        bad = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"{op}: offsets must be non-decreasing; offsets[{bad}]={int(offsets[bad])} > "
                         f"offsets[{bad + 1}]={int(offsets[bad + 1])}")
    if not ok[3]:
        bad = int(torch.argmax(lengths))
        raise ValueError(f"{op}: user {bad} has {int(lengths[bad])} rows, more than max_len={max_len}")
    if cand_user is not None and len(ok) > 4 and not ok[4]:
        bad = int(torch.nonzero((cand_user < 0) | (cand_user >= num_users))[0, 0])
        raise ValueError(f"{op}: cand_user[{bad}]={int(cand_user[bad])} is not a user index in [0, {num_users})")
    return offsets, cand_user


def check_int(op: str, name: str, value: object, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{op}: {name} must be {bound}, got {value}")
    return value


def check_codes(op: str, name: str, codes: torch.Tensor, rows: int | None, num_hashes: int | None) -> torch.Tensor:
    """(rows, m) integer codes -> int64."""
    check_tensor(op, name, codes, 2, floating=False)
    if rows is not None and codes.shape[0] != rows:
        raise ValueError(f"{op}: {name} must have {rows} rows, got shape {tuple(codes.shape)}")
    if num_hashes is not None and codes.shape[1] != num_hashes:
        raise ValueError(f"{op}: {name} must have m={num_hashes} columns, got shape {tuple(codes.shape)}")
    return codes.to(torch.int64)


def default_scale(scale: float | None, dim: int) -> float:
    return float(dim) ** -0.5 if scale is None else float(scale)
