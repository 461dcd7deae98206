"""Backend dispatch and argument checks of the public kernel functions: clear errors, no silent fallback."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from features.jagged import offsets_of
from kernels import BackendUnavailableError

REPO = Path(__file__).resolve().parents[2]


def _attention_args(n=3, lengths=(4, 0, 5), d=8):
    offsets = offsets_of(torch.tensor(lengths))
    num_rows = int(offsets[-1])
    return torch.randn(n, d), torch.randn(num_rows, d), torch.randn(num_rows, d), offsets, torch.tensor([0, 2, 2])


def test_unknown_backend_names_the_op_and_the_choices():
    with pytest.raises(ValueError, match=r"hash_ids: unknown backend 'cuda'.*'auto', 'torch', 'triton'"):
        kernels.hash_ids(torch.arange(3), 0, backend="cuda")
    with pytest.raises(ValueError, match=r"jagged_target_attention: unknown backend 'fast'"):
        kernels.jagged_target_attention(*_attention_args(), max_len=5, backend="fast")


def test_auto_runs_the_reference_on_cpu_tensors():
    q, k, v, offsets, users = _attention_args()
    auto = kernels.jagged_target_attention(q, k, v, offsets, users, max_len=5)
    torch_ = kernels.jagged_target_attention(q, k, v, offsets, users, max_len=5, backend="torch")
    assert torch.equal(auto, torch_)


def test_triton_on_cpu_without_the_interpreter_raises_a_clear_error():
    script = textwrap.dedent("""
        import torch, kernels
        try:
            kernels.simhash(torch.randn(4, 8), kernels.make_hyperplanes(8, 2, 3), 3, backend="triton")
        except kernels.BackendUnavailableError as e:
            print("RAISED:", e)
        print("TORCH_OK", kernels.simhash(torch.randn(4, 8), kernels.make_hyperplanes(8, 2, 3), 3).shape[1])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RAISED: simhash: backend='triton' got CPU tensors but the Triton interpreter is off" in proc.stdout
    assert "TRITON_INTERPRET=1" in proc.stdout
    assert "TORCH_OK 2" in proc.stdout  # the torch backend is unaffected


def test_triton_on_an_unsupported_device_raises():
    x = torch.empty(4, 8, device="meta")
    with pytest.raises(BackendUnavailableError,
                       match="simhash: backend='triton' runs on CUDA tensors, got tensors on meta"):
        kernels.simhash(x, torch.empty(8, 6, device="meta"), 3, backend="triton")


def test_device_mismatch_names_both_arguments():
    q, k, v, offsets, users = _attention_args()
    with pytest.raises(ValueError, match="jagged_target_attention: k is on meta but q is on cpu"):
        kernels.jagged_target_attention(q, k.to("meta"), v, offsets, users, max_len=5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: {**a, "k": torch.randn(9, 7)}, r"k.shape\[1\] must equal q.shape\[1\] \(8\), got shape \(9, 7\)"),
        (lambda a: {**a, "v": torch.randn(8, 8)}, r"v.shape\[0\] must equal k.shape\[0\] \(9\), got shape \(8, 8\)"),
        (lambda a: {**a, "q": torch.randn(3, 8, 1)}, r"q must be 2-D, got shape \(3, 8, 1\)"),
        (lambda a: {**a, "offsets": torch.tensor([0, 4, 4, 8])},
         r"offsets\[-1\] \(8\) must equal the number of rows of k \(9\)"),
        (lambda a: {**a, "offsets": torch.tensor([0, 5, 4, 9])},
         r"offsets must be non-decreasing; offsets\[1\]=5 > offsets\[2\]=4"),
        (lambda a: {**a, "cand_user": torch.tensor([0, 3, 1])}, r"cand_user\[1\]=3 is not a user index in \[0, 3\)"),
        (lambda a: {**a, "cand_user": torch.tensor([0, 1])}, r"cand_user must have one entry per candidate \(3\)"),
        (lambda a: {**a, "max_len": 4}, r"user 2 has 5 rows, more than max_len=4"),
        (lambda a: {**a, "offsets": torch.tensor([0.0, 4.0, 4.0, 9.0])}, r"offsets must be an integer tensor"),
        (lambda a: {**a, "v": torch.randn(9, 8, dtype=torch.float64)}, r"q, k, v must share one dtype"),
    ],
)
def test_attention_shape_errors_name_the_argument_and_sizes(mutate, message):
    q, k, v, offsets, users = _attention_args()
    args = mutate(dict(q=q, k=k, v=v, offsets=offsets, cand_user=users, max_len=5))
    with pytest.raises(ValueError, match="jagged_target_attention: " + message):
        kernels.jagged_target_attention(**args)


def test_dare_rejects_a_non_positive_top_k():
    q, k, v, offsets, users = _attention_args()
    with pytest.raises(ValueError, match=r"dare_topk_attention: top_k must be >= 1, got 0"):
        kernels.dare_topk_attention(q, k, v, offsets, users, 5, 0)


def test_dare_triton_rejects_a_top_k_beyond_its_buffer():
    q, k, v, offsets, users = _attention_args()
    with pytest.raises(ValueError, match=r"keeps at most 1024 behaviors, got top_k=2000"):
        kernels.dare_topk_attention(q, k, v, offsets, users, 5, 2000, backend="triton")


def test_triton_rejects_float64_inputs():
    q, k, v, offsets, users = (t.double() if t.is_floating_point() else t for t in _attention_args())
    with pytest.raises(ValueError, match="the Triton kernel takes fp32/bf16/fp16 inputs, got torch.float64"):
        kernels.jagged_target_attention(q, k, v, offsets, users, 5, backend="triton")


def test_collision_gather_rejects_negative_codes_and_mismatched_hash_counts():
    values, offsets = torch.randn(5, 4), torch.tensor([0, 5])
    codes = torch.zeros(5, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"collision_gather: cand_codes must have m=3 columns, got shape \(2, 2\)"):
        kernels.collision_gather(values, codes, offsets, torch.zeros(2, 2, dtype=torch.int64), torch.tensor([0, 0]), 5)
    negative = "collision_gather: codes must be non-negative SimHash codes, got a minimum of -1"
    with pytest.raises(ValueError, match=negative):
        kernels.collision_gather(values, codes - 1, offsets, torch.zeros(2, 3, dtype=torch.int64),
                                 torch.tensor([0, 0]), 5)


def test_simhash_and_packing_errors():
    with pytest.raises(ValueError, match=r"simhash: planes.shape\[0\] must equal x.shape\[1\] \(8\)"):
        kernels.simhash(torch.randn(2, 8), torch.randn(7, 6), 3)
    with pytest.raises(ValueError, match=r"simhash: planes.shape\[1\] must be a positive multiple of num_bits=4"):
        kernels.simhash(torch.randn(2, 8), torch.randn(8, 6), 4)
    with pytest.raises(ValueError, match="simhash: x must be a floating-point tensor, got torch.int64"):
        kernels.simhash(torch.ones(2, 8, dtype=torch.int64), torch.randn(8, 6), 3)
    with pytest.raises(ValueError, match=r"pack_codes: m \* num_bits = 16 \* 4 = 64 bits do not fit in one int64"):
        kernels.pack_codes(torch.zeros(1, 16, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=r"pack_codes: codes must be in \[0, 2\*\*3\), got values in \[0, 8\]"):
        kernels.pack_codes(torch.tensor([[0, 8]]), 3)


def test_hash_errors():
    with pytest.raises(ValueError, match="hash_ids: ids must be an integer tensor, got torch.float32"):
        kernels.hash_ids(torch.ones(3), 0)
    with pytest.raises(ValueError, match=r"hash_ids: seed must be in \[-9223372036854775808, 9223372036854775807\]"):
        kernels.hash_ids(torch.ones(3, dtype=torch.int64), 2**63)
    with pytest.raises(ValueError, match="bucketize: num_buckets must be a positive int, got 0"):
        kernels.bucketize(torch.ones(3, dtype=torch.int64), "item_id", 0)


def test_bucket_errors_name_the_bound():
    values, offsets = torch.randn(4, 2), torch.tensor([0, 4])
    with pytest.raises(ValueError, match=r"sdim_bucket_sums: codes must be < 2\*\*num_bits = 4, got a maximum of 5"):
        kernels.sdim_bucket_sums(values, torch.tensor([[0], [5], [1], [2]]), offsets, 2)
    sums = torch.zeros(1, 2, 4, 3)
    with pytest.raises(ValueError, match=r"gather_buckets: cand_codes must be in \[0, 4\) \(bucket_sums.shape\[2\]\)"):
        kernels.gather_buckets(sums, torch.tensor([[0, 4]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"gather_buckets: cand_user must be in \[0, 1\)"):
        kernels.gather_buckets(sums, torch.tensor([[0, 3]]), torch.tensor([1]))


def test_non_tensor_arguments_are_named():
    q, k, v, _, users = _attention_args()
    with pytest.raises(ValueError, match="jagged_target_attention: offsets must be a torch.Tensor, got list"):
        kernels.jagged_target_attention(q, k, v, [0, 4, 4, 9], users, 5)
