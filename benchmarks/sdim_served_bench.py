"""SDIM inside the served ranker: forward from the bucket sums kept at ingest vs full attention (CPU).

`kernels_bench.py` times the kernels alone; this times the ranker the server
runs (`ranking.inference`, the ML-1M full model: DARE tables, 4-expert AW-MoE,
short-term attention over 50 behaviors) on one request of L behaviors and C
candidates, the batch built as the server builds it. Rows:

  full        long-term module = full softmax target attention over the last L behaviors
  sdim scan   long-term module = SDIM over the L behaviors (signatures stored at ingest,
              `collision_gather`): what the server ran before it kept the sums
  sdim sums   SDIM from the user's stored bucket sums (`Batch.sdim_sums`): the request path
              gathers the candidates' m buckets and never reads the L behaviors

For each, the whole forward (`logits`) and the long-term module alone inside it
(`LongTermArch` on the embedded batch). Speed-ups are against `full` in the same
run. Medians over repeated calls (`kernels_bench.time_ms`), after waiting for
other processes to leave the cores (`kernels_bench.ForeignLoad`).

    python benchmarks/sdim_served_bench.py                 # L = 10k, C = 1000, 1 and 2 threads (~1-2 min)
    python benchmarks/sdim_served_bench.py --quick         # L = 10k, C = 1000, 1 thread, short timings
Writes benchmarks/results/serving/sdim-served.json (`--out` to change; `--no-write` not to); `--json PATH`
also writes the raw rows there (as `run_all.py` asks every benchmark).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import write_json  # noqa: E402
from kernels_bench import ForeignLoad, quiet_time_ms  # noqa: E402
from results_file import write_results  # noqa: E402

from features.batch import (  # noqa: E402
    HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_SDIM_SIG, HIST_TS, ITEM_CATEGORY, ITEM_ID, build_batch,
)
from features.hardware import native_bf16  # noqa: E402
from features.transforms import DenseLayout, StatsConfig  # noqa: E402
from ranking.inference import make_inference  # noqa: E402
from ranking.model import RankerModel  # noqa: E402

CONFIGS = [REPO / "ranking/configs/ml-1m.yaml", REPO / "ranking/configs/ablations/full.yaml"]
TARGET_SPEEDUP = 25.0  # issue 17: SDIM request path >= 25x faster than full attention at L = 10k


def ranker(long: str, length: int, bf16_mlp: bool, seed: int = 0):
    from jobs.train_ranker import load_ranker_config

    cfg = load_ranker_config(CONFIGS, [f"model.sequence.long={long}", f"model.sequence.long_len={length}",
                                       f"model.bf16_mlp={str(bf16_mlp).lower()}"])
    layout = DenseLayout(StatsConfig(), 0.55, ("year",))
    mc = dataclasses.replace(cfg.model, user_dense_dim=len(layout.user_names()),
                             candidate_dense_dim=len(layout.candidate_names()))
    torch.manual_seed(seed)
    return make_inference(RankerModel(mc, embedding_device="cpu"))


def request(length: int, cands: int, user_dense: int, cand_dense: int, seed: int = 0, sigs=None, sums=None):
    """One user with `length` behaviors over a 3,706-item catalog and `cands` candidates (the server's batch)."""
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 3707, length)
    cand = rng.choice(np.arange(1, 3707), cands, replace=False)
    history = {HIST_ITEM_ID: items, HIST_TS: np.arange(length), HIST_ACTION: rng.choice([5, 8, 9], length),
               HIST_CATEGORY: items % 18}
    if sigs is not None:
        history[HIST_SDIM_SIG] = sigs
    batch = build_batch(
        user={k: ([7], [1]) for k in ("user_id", "user_attr_age", "user_attr_gender", "user_attr_occupation",
                                      "user_attr_zip3")}, history=history, history_lengths=[length],
        candidates={ITEM_ID: (cand, np.ones(cands, np.int64)), ITEM_CATEGORY: (cand % 18, np.ones(cands, np.int64)),
                    "item_attr_year": (cand % 80 + 1920, np.ones(cands, np.int64))},
        num_candidates=[cands], request_ts=[length + 1],
        user_dense=rng.random((1, user_dense), dtype=np.float32), candidate_dense=rng.random((cands, cand_dense),
                                                                                            dtype=np.float32))
    if sums is not None:
        batch = dataclasses.replace(batch, sdim_sums=torch.from_numpy(sums[0])[None],
                                    sdim_lengths=torch.tensor([int(sums[1][0].sum())]))
    return batch


def cases(length: int, cands: int, bf16_mlp: bool) -> dict[str, tuple[object, object]]:
    """{row: (ranker, batch)} for the three rows of the module docstring."""
    full, sdim = ranker("full", length, bf16_mlp), ranker("sdim", length, bf16_mlp)
    ud, cd = full.cfg.user_dense_dim, full.cfg.candidate_dense_dim
    plain = request(length, cands, ud, cd)
    items = plain.history_values(HIST_ITEM_ID).numpy()
    sigs = sdim.behavior_signatures(items).numpy()  # computed at ingest
    sums = sdim.bucket_sums(items, plain.history_values(HIST_CATEGORY).numpy(),
                            plain.history_values(HIST_ACTION).numpy(), sigs)  # kept at ingest
    with_sums = request(length, cands, ud, cd, sigs=sigs, sums=sums)
    got = sdim.logits(with_sums)
    scan = request(length, cands, ud, cd, sigs=sigs)
    want = sdim.logits(scan)
    err = float((got - want).abs().max())
    assert err < 1e-3, f"the sums path disagrees with the scan by {err}"  # a sanity check, not a test
    return {"full": (full, plain), "sdim_scan": (sdim, scan), "sdim_sums": (sdim, with_sums)}


def measure(length: int, cands: int, threads: list[int], min_time: float, max_wait: float,
            bf16_mlp: bool) -> list[dict]:
    rows = []
    load = ForeignLoad()
    grid = cases(length, cands, bf16_mlp)
    for t in threads:
        torch.set_num_threads(t)
        row: dict = {"threads": t, "L": length, "C": cands, "bf16_mlp": bf16_mlp}
        others = 0.0
        with torch.inference_mode():
            for name, (rk, batch) in grid.items():
                emb = rk.model.embedding(batch)
                ms, busy = quiet_time_ms(lambda rk=rk, b=batch: rk.logits(b), min_time, load, max_wait)
                lms, busy2 = quiet_time_ms(lambda rk=rk, e=emb: rk.model.long(e), min_time, load, max_wait)
                row[f"{name}_forward_ms"], row[f"{name}_long_ms"] = round(ms, 3), round(lms, 4)
                others = max(others, busy, busy2)
        for name in ("sdim_scan", "sdim_sums"):
            row[f"{name}_forward_speedup"] = round(row["full_forward_ms"] / row[f"{name}_forward_ms"], 2)
            row[f"{name}_long_speedup"] = round(row["full_long_ms"] / row[f"{name}_long_ms"], 2)
        row["others_cores"] = round(others, 2)
        row["target_met"] = bool(row["sdim_sums_long_speedup"] >= TARGET_SPEEDUP)
        rows.append(row)
    return rows


def print_report(rows: list[dict]) -> None:
    print(f"\nSDIM inside the served ranker (ML-1M full model, bf16 experts: {rows[0]['bf16_mlp']}), one request; "
          f"speed-ups vs full attention (target >= {TARGET_SPEEDUP:g}x for the SDIM request path)\n")
    print("| threads | L | C | row | forward ms | long-term module ms | forward speed-up | long-term speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, label in (("full", "full attention"), ("sdim_scan", "SDIM scan (signatures)"),
                            ("sdim_sums", "SDIM from stored sums")):
            fs = "1x" if name == "full" else f"{r[f'{name}_forward_speedup']:.1f}x"
            ls = "1x" if name == "full" else f"{r[f'{name}_long_speedup']:.1f}x"
            print(f"| {r['threads']} | {r['L']} | {r['C']} | {label} | {r[f'{name}_forward_ms']:.2f} | "
                  f"{r[f'{name}_long_ms']:.3f} | {fs} | {ls} |")
    print("\nother processes used up to", max(r["others_cores"] for r in rows), "cores during the kept measurements")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=10_000)
    p.add_argument("--cands", type=int, default=1_000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of repeated calls per measurement")
    p.add_argument("--max-wait", type=float, default=20.0, help="seconds to wait for quiet cores per measurement")
    p.add_argument("--quick", action="store_true", help="1 thread, 0.3 s per measurement, 5 s waits")
    p.add_argument("--bf16-mlp", choices=("auto", "on", "off"), default="auto",
                   help="experts under bf16 autocast; auto: only on CPUs with native bf16 (AVX-512 BF16 / AMX), "
                        "elsewhere it is emulated and costs more than the rest of the forward")
    p.add_argument("--out", default="serving/sdim-served", help="results name under benchmarks/results/")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", type=Path, help="also write this run's raw rows here (benchmarks/run_all.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.threads, args.min_time, args.max_wait = [1], 0.3, 5.0
    bf16 = {"on": True, "off": False}.get(args.bf16_mlp, native_bf16())
    rows = measure(args.length, args.cands, args.threads, args.min_time, args.max_wait, bf16)
    print_report(rows)
    if args.json:
        write_json(args.json, {"rows": rows, "target_speedup": TARGET_SPEEDUP, "quick": args.quick})
    if not args.no_write:
        path = write_results(args.out, {"rows": rows, "target_speedup": TARGET_SPEEDUP, "quick": args.quick},
                             benchmark="sdim_served")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
