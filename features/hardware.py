"""What this machine's CPU can do, read once: its model name, its instruction-set flags and whether it computes
bfloat16 natively (AVX-512 BF16 or AMX). A bf16 autocast on a CPU without them is emulated: on an AVX2-only
AMD EPYC the ML-1M ranker's experts took 110 ms per 500 candidates under bf16 against 1.8 ms in fp32, so the
models' bf16 switches mean "where native" (`native_bf16`)."""
from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(CPU model name, instruction-set flags) from /proc/cpuinfo; ("unknown" or platform.processor(), {})
    where it cannot be read."""
    model, flags = platform.processor() or "unknown", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def native_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX-BF16), so a bf16 autocast is faster, not
    emulated and slower."""
    flags = cpu_info()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags
