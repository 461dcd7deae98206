"""Runs every benchmark in turn, each writing its JSON under --out (default reports/), and prints where.

The committed figures are the results files each benchmark writes itself under benchmarks/results/
(results_file.write_results); the --out documents are this run's raw output.

    python benchmarks/run_all.py                 # the full set: hours on a 2-core machine
    python benchmarks/run_all.py --quick         # smoke-sized runs where a benchmark has one (minutes)
    python benchmarks/run_all.py --only kernels serving

Each benchmark prints its own table and measures its baseline in the same run; this
script only sequences them (one at a time: they would distort each other's timings).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (script, extra args for --quick)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "kernels": ("kernels_bench.py", ["--quick"]),
    "sdim_served": ("sdim_served_bench.py", ["--quick"]),
    "features": ("features_bench.py", ["--cases", "ml-1m"]),
    "retrieval": ("retrieval_bench.py", ["--datasets", "ml-1m", "--seeds", "0"]),
    "ranking_ctr": ("ranking_ctr_bench.py", ["--quick", "--seeds", "0"]),
    "ranking_long": ("ranking_long_bench.py", ["--quick"]),
    "two_stage": ("two_stage_bench.py", ["--quick"]),
    "serving": ("serving_bench.py", ["--quick"]),
    "request": ("request_bench.py", ["--quick"]),  # after serving: it reads the bundle serving builds
    "flood": ("flood_bench.py", ["--quick"]),
    "rebuild": ("rebuild_bench.py", ["--dataset", "ml-100k"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only:
        script, quick = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), "--json", str(args.out / f"{name}.json"), *(quick if args.quick else [])]
        print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        results.append((name, rc, time.perf_counter() - t0))
    print(f"\n{'benchmark':<12}{'exit':>6}{'minutes':>10}  json")
    for name, rc, secs in results:
        print(f"{name:<12}{rc:>6}{secs / 60:>10.1f}  {args.out / (name + '.json')}")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
