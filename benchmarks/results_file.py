"""The one writer of committed benchmark results: ``benchmarks/results/<name>.json``.

Every figure the README or a closing note quotes comes from such a file. The top level is fixed:
``benchmark``, ``command`` (argv as run), ``commit`` (git HEAD, ``+dirty`` when the tree has local
changes), ``machine`` (CPU model, cores, flags that change speed), ``created_at`` (UTC ISO-8601) and
``results`` (metric keys exactly as the script prints them). Dataset and split belong in the name,
e.g. ``retrieval/ml-1m/loo-seed0.json``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

RESULTS_DIR = Path(__file__).resolve().parent / "results"
if str(RESULTS_DIR.parents[1]) not in sys.path:
    sys.path.insert(0, str(RESULTS_DIR.parents[1]))

from features.hardware import cpu_info  # noqa: E402


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    head = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """CPU model, cores and the instruction-set flags that decide the speed of fp32/bf16 kernels."""
    model, flags = cpu_info()
    info: dict[str, Any] = {
        "cpu_model": model, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(),
        "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def write_results(name: str, results: Mapping[str, Any], *, benchmark: str | None = None,
                  command: list[str] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Writes ``benchmarks/results/<name>.json`` (``name`` may contain ``/``) and returns its path."""
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": benchmark or name.split("/", 1)[0],
        "command": " ".join(command if command is not None else [Path(sys.argv[0]).name and
                                                                 f"python {os.path.relpath(sys.argv[0])}", *sys.argv[1:]]),
        "commit": commit(),
        "machine": machine(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": dict(results),
        **dict(extra or {}),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=float) + "\n")
    os.replace(tmp, path)
    return path
