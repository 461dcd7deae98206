"""The Triton kernels on a CUDA device: parity with their PyTorch references, then their timings.

The test suite runs every kernel on CPU under TRITON_INTERPRET=1; this is the check of the compiled CUDA
path, for a machine with a GPU (the development machine and CI have none). Two parts:

1. Parity. Random jagged layouts (empty users, one long user, many short ones) on the GPU, each kernel with
   backend="triton" against backend="torch" on the same CUDA tensors: the outputs and the gradients of
   every float input in float32 (the test suite's tolerances), the forward in bfloat16 (its bf16
   tolerance), SimHash codes and XXH64 hashes exactly (the hashes against `features.hashing` on CPU, the
   spec Spark implements).
2. Timings: `benchmarks/kernels_bench.run_gpu` (Triton vs PyTorch eager / SDPA, TFLOP/s or GB/s).

    python benchmarks/kernels_cuda_check.py --out reports/kernels-cuda.json
    python benchmarks/kernels_cuda_check.py --no-timings     # parity only

Exit status 1 when a parity check fails. Without CUDA it says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def layouts(small: bool) -> list[tuple[str, list[int], int]]:
    """(name, lengths per user, candidates)."""
    rng = np.random.default_rng(0)
    if small:  # a dry run of this script on CPU under TRITON_INTERPRET=1
        return [("3 users L<=40 (one empty) C=30", [0, 40, 7], 30)]
    return [
        ("one user L=1000 C=500", [1000], 500),
        ("one user L=10000 C=100", [10_000], 100),
        ("64 users L<=300 (some empty) C=2000", [0, 0, *rng.integers(0, 300, 62).tolist()], 2000),
        ("8 users one long L=5000", [5000, 3, 0, 17, 250, 1, 64, 999], 700),
    ]


def jagged(lengths: Sequence[int], n: int, dev: torch.device, seed: int) -> dict[str, Any]:
    g = torch.Generator(device=dev).manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(dev)
    users = torch.randint(0, len(lengths), (n,), generator=g, device=dev)
    return dict(offsets=offsets, cand_user=users, max_len=max(max(lengths), 1), gen=g, rows=int(offsets[-1]))


def run(op: Callable[..., torch.Tensor], args: dict[str, Any], leaves: Sequence[str], backend: str,
        grad_out: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = {k: args[k].detach().to(dtype).clone().requires_grad_(grad_out is not None) for k in leaves}
    out = op(**{**args, **inputs}, backend=backend)
    grads: list[torch.Tensor] = []
    if grad_out is not None:
        (out.float() * grad_out).sum().backward()
        grads = [inputs[k].grad for k in leaves]
    if out.is_cuda:
        torch.cuda.synchronize()
    return out.detach(), grads


def compare(name: str, op: Callable[..., torch.Tensor], args: dict[str, Any], leaves: Sequence[str],
            out_dim: int, n: int, dev: torch.device, g: torch.Generator) -> list[dict]:
    rows = []
    grad_out = torch.randn(n, out_dim, generator=g, device=dev)
    for dtype, with_grads in ((torch.float32, True), (torch.bfloat16, False)):
        ref, ref_g = run(op, args, leaves, "torch", grad_out if with_grads else None, dtype)
        tri, tri_g = run(op, args, leaves, "triton", grad_out if with_grads else None, dtype)
        errs = {"out": (tri.float() - ref.float()).abs().max().item() if ref.numel() else 0.0}
        ok = torch.allclose(tri.float(), ref.float(), **TOL[dtype])
        for k, a, b in zip(leaves, tri_g, ref_g):
            errs[f"grad {k}"] = (a - b).abs().max().item() if a.numel() else 0.0
            ok = ok and torch.allclose(a, b, **TOL[dtype])
        rows.append(dict(op=name, dtype=str(dtype).removeprefix("torch."), grads=with_grads, ok=bool(ok),
                         max_abs_err={k: float(f"{v:.3g}") for k, v in errs.items()}))
    return rows


def parity(dev: torch.device, small: bool = False) -> list[dict]:
    rows: list[dict] = []
    for seed, (case, lengths, n) in enumerate(layouts(small)):
        for d in (32, 64):
            j = jagged(lengths, n, dev, seed * 100 + d)
            g, lay = j["gen"], {k: j[k] for k in ("offsets", "cand_user", "max_len")}
            q = torch.randn(n, d, generator=g, device=dev)
            k = torch.randn(j["rows"], d, generator=g, device=dev)
            v = torch.randn(j["rows"], d, generator=g, device=dev)
            tag = f"{case}, d={d}"
            for r in compare("jagged_target_attention", kernels.jagged_target_attention, dict(q=q, k=k, v=v, **lay),
                             ("q", "k", "v"), d, n, dev, g):
                rows.append(dict(case=tag, **r))
            dare = lambda **kw: kernels.dare_topk_attention(top_k=100, **kw)  # noqa: E731
            for r in compare("dare_topk_attention (top 100, d/2 search)", dare,
                             dict(q_att=q[:, : d // 2].contiguous(), k_att=k[:, : d // 2].contiguous(), v_rep=v,
                                  **lay), ("q_att", "k_att", "v_rep"), d, n, dev, g):
                rows.append(dict(case=tag, **r))
            planes = kernels.make_hyperplanes(d, 16, 3).to(dev)
            codes = {b: kernels.simhash(v, planes, 3, backend=b) for b in ("torch", "triton")}
            cand = {b: kernels.simhash(q, planes, 3, backend=b) for b in ("torch", "triton")}
            same = float((codes["torch"] == codes["triton"]).float().mean()) if v.shape[0] else 1.0
            same_c = float((cand["torch"] == cand["triton"]).float().mean())
            rows.append(dict(case=tag, op="simhash", dtype="float32", grads=False, ok=same == 1.0 and same_c == 1.0,
                             agreement={"behaviors": same, "candidates": same_c}))
            for r in compare("collision_gather (SDIM)", lambda **kw: kernels.collision_gather(
                    codes=codes["torch"], cand_codes=cand["torch"], **kw), dict(values=v, **lay), ("values",),
                    d, n, dev, g):
                rows.append(dict(case=tag, **r))
    from features.hashing import hash_int64

    ids = torch.randint(-(2**62), 2**62, (1 << (10 if small else 20),), device=dev)
    ids[:4] = torch.tensor([0, -1, 2**63 - 1, -(2**63)], device=dev)
    want = torch.from_numpy(hash_int64(ids.cpu().numpy(), 42))
    for b in ("torch", "triton"):
        got = kernels.hash_ids(ids, 42, backend=b).cpu()
        rows.append(dict(case="1M ids incl. 0, -1, int64 min/max", op=f"hash_ids ({b} on CUDA vs features.hashing)",
                         dtype="int64", grads=False, ok=bool(torch.equal(got, want)),
                         agreement=float((got == want).float().mean())))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the report (JSON) here")
    p.add_argument("--no-timings", action="store_true")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="tiny layouts on CPU tensors (needs TRITON_INTERPRET=1): checks this script, not the GPU")
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() or args.dry_run_cpu):
        print("no CUDA device: nothing to check here (the test suite checks the kernels on CPU)")
        return 2
    import triton

    dev = torch.device("cpu" if args.dry_run_cpu else "cuda")
    t0 = time.monotonic()
    report: dict[str, Any] = {"device": "cpu (TRITON_INTERPRET=1)" if args.dry_run_cpu else torch.cuda.get_device_name(),
                              "torch": torch.__version__,
                              "triton": triton.__version__, "python": platform.python_version()}
    rows = parity(dev, small=args.dry_run_cpu)
    report["parity"] = rows
    report["parity_ok"] = all(r["ok"] for r in rows)
    report["parity_seconds"] = round(time.monotonic() - t0, 1)
    print(f"== parity on {report['device']} (torch {report['torch']}, triton {report['triton']}) ==")
    for r in rows:
        detail = r.get("max_abs_err") or r.get("agreement")
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['op']:<44} {r['dtype']:<8} {r['case']:<44} {detail}")
    if not (args.no_timings or args.dry_run_cpu):
        from benchmarks.kernels_bench import run_gpu

        report["timings"] = run_gpu()
        print("\n== timings (triton.testing.do_bench, ms) ==")
        for r in report["timings"]["rows"]:
            unit = "TFLOP/s" if "TFLOP/s" in r else "GB/s"
            print(f"{r['op']:<28} {r['shape']:<36} {r['impl']:<12} {r['ms']:>9.4f} ms {r[unit]:>9.2f} {unit}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    print(f"parity: {'all ok' if report['parity_ok'] else 'FAILURES'} ({len(rows)} checks)")
    return 0 if report["parity_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
