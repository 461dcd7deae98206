"""PyTorch references of the kernels: the semantics, and the fast path on CPU."""
