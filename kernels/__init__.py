"""Cascade's hot-path kernels: each a Triton kernel beside its PyTorch reference, behind one dispatcher.

| op                        | what                                                        | paper           |
|---------------------------|-------------------------------------------------------------|-----------------|
| `hash_ids`, `bucketize`   | XXH64 id hash spec v1 (bit-exact with Spark / features)     | xxHash          |
| `simhash` (+ planes, pack)| SimHash signatures, m hash functions x tau bits             | SDIM, Cao 2022  |
| `collision_gather`        | SDIM aggregation by signature collision (+ BSE precompute)  | SDIM, Cao 2022  |
| `jagged_target_attention` | softmax target attention, online softmax over long L       | flash, Dao 2022 |
| `dare_topk_attention`     | top-K search on attention embs, aggregate representation    | DARE, Feng 2024 |

Layout: ``kernels/reference/<op>.py`` (PyTorch: the semantics and the CPU fast
path), ``kernels/triton/<op>.py`` (kernels, launchers, autograd), and
``kernels/<op>.py`` (the public function: checks, then dispatch). Every public
function takes ``backend="auto" | "torch" | "triton"``: "auto" runs Triton on
CUDA tensors and the reference on CPU tensors; "triton" on CPU tensors runs only
under ``TRITON_INTERPRET=1`` (tests); an unavailable backend raises
`BackendUnavailableError`, never falls back. Sequences are jagged
``(values, offsets, max_len)``, never padded.
"""
from kernels._dispatch import BACKENDS, Backend, BackendUnavailableError
from kernels.collision_gather import collision_gather, gather_buckets, sdim_bucket_sums
from kernels.dare_topk_attention import dare_topk_attention
from kernels.hash_ids import bucketize, hash_ids
from kernels.jagged_target_attention import jagged_target_attention
from kernels.simhash import make_hyperplanes, pack_codes, simhash, unpack_codes

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "bucketize",
    "collision_gather",
    "dare_topk_attention",
    "gather_buckets",
    "hash_ids",
    "jagged_target_attention",
    "make_hyperplanes",
    "pack_codes",
    "sdim_bucket_sums",
    "simhash",
    "unpack_codes",
]
