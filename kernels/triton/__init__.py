"""Triton kernels (imported lazily by `kernels._dispatch`; CPU-only processes never import triton)."""
