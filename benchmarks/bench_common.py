"""Helpers the benchmarks share: dataset preparation (import + features, cached), tables, mean ± std.

    feats = prepare_features("ml-1m", shared, data_dir)            # leave-one-out features, built once
    feats = prepare_features("ml-1m", shared, data_dir, ctr=True)  # the ML-1M CTR protocol's build
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# name -> shared-data source, ranker config, and the build overrides of the CTR protocol (ML-1M: ratings only)
DATASETS: dict[str, dict[str, Any]] = {
    "ml-1m": {"source": "ml-1m", "config": "ranking/configs/ml-1m.yaml",
              "ctr_build": ["ranking.event_types=[rating]", "ranking.sampled_negative_event_types=[]",
                            "stats.event_types=[rating]", "sequence.behavior_event_types=[rating]"]},
    "ml-100k": {"source": "ml-100k", "config": "ranking/configs/ml-100k.yaml", "ctr_build": []},
    "beauty": {"source": "amazon-beauty/Beauty.txt", "config": None, "ctr_build": []},  # leave-one-out only
}


def load1() -> float:
    return os.getloadavg()[0]


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def fmt(ms: tuple[float, float], digits: int = 4) -> str:
    m, s = ms
    return "-" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------------- data
def prepare_features(name: str, shared: Path, data_dir: Path, ctr: bool = False) -> Path:
    """Imports the dataset and builds its features once (cached); returns the features directory.

    ctr: the CTR protocol's build (`DATASETS[name]["ctr_build"]`), cached apart when it differs."""
    spec = DATASETS[name]
    build = spec["ctr_build"] if ctr else []
    canon, feats = data_dir / name, data_dir / f"features-{name}{'-ctr' if build else ''}"
    cascade = [sys.executable, "-m", "jobs.cli"]
    if not (canon / "manifest.json").exists():
        print(f"importing {shared / spec['source']} -> {canon}", flush=True)
        subprocess.run(cascade + ["data", "import", "--source", str(shared / spec["source"]), "--out", str(canon),
                                  "--overwrite"], check=True, cwd=REPO)
    if not (feats / "manifest.json").exists() or not (feats / "ranking_samples").exists():
        print(f"building features {canon} -> {feats} (Spark, a few minutes)", flush=True)
        subprocess.run(cascade + ["build-features", "--dataset", str(canon), "--out", str(feats), "--master",
                                  "local[2]", "--overwrite", "spark.shuffle_partitions=4", *build],
                       check=True, cwd=REPO)
    return feats


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    """The raw document of a run (`--json`), beside the committed results file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2, default=float) + "\n")


class GcMeter:
    """Python's garbage collections while the block runs: per generation, how many and their seconds (gc
    callbacks; the collector holds the GIL meanwhile, so this is time no thread of the process ran)."""

    def __enter__(self) -> "GcMeter":
        self.collections, self.seconds = [0, 0, 0], [0.0, 0.0, 0.0]
        self._t0 = 0.0

        def cb(phase: str, info: dict) -> None:
            if phase == "start":
                self._t0 = time.perf_counter()
            else:
                g = info["generation"]
                self.collections[g] += 1
                self.seconds[g] += time.perf_counter() - self._t0

        self._cb = cb
        gc.callbacks.append(cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)

    def report(self) -> dict[str, list]:
        return {"collections": list(self.collections), "seconds": [round(s, 3) for s in self.seconds]}
