"""Cost of the total Kafka decoders: valid events per second, and the worst hostile message's decode time.

    .venv/bin/python benchmarks/decode_bench.py            # writes benchmarks/results/decode.json

Baseline in the same run: ``json.loads`` + building the `Event` without any check (the floor any decoder
pays). Hostile rows are the slowest of several repetitions of one message each: every guard must keep
a message's cost bounded by the size limit (64 KiB), whatever it contains.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import write_results  # noqa: E402
from features.messages import EventBounds, encode_event, parse_announcement, parse_event, parse_item  # noqa: E402
from features.schema import Event  # noqa: E402

NOW = 1_790_000_000_000


def _valid(n: int) -> list[bytes]:
    return [encode_event(Event(f"e{i}", i % 1000, i % 5000, NOW - i, "click", float(i % 2), math_nan(),
                               {"surface": "home"})) for i in range(n)]


def math_nan() -> float:
    return float("nan")


def _rate(fn, msgs: list[bytes], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for m in msgs:
            fn(m)
        best = min(best, time.perf_counter() - t0)
    return len(msgs) / best


def _worst_ms(fn, raw, repeat: int = 5) -> float:
    worst = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(raw)
        worst = max(worst, time.perf_counter() - t0)
    return worst * 1000


def _baseline(raw: bytes) -> Event:
    return Event(**json.loads(raw))


HOSTILE = {
    "deep_nesting_64k": b"[" * 65_000,
    "deep_object_nesting": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "long_int_60k_digits": b'{"label":' + b"9" * 60_000 + b"}",
    "long_float_60k_digits": b'{"label":0.' + b"9" * 60_000 + b"}",
    "many_escapes": b'{"event_id":"' + b"\\ud800" * 10_000 + b'"}',
    "wide_context_map": json.dumps({"event_id": "x", "user_id": 1, "item_id": 2, "ts_ms": NOW, "event_type": "click",
                                    "label": 1, "context": {f"k{i}": "v" for i in range(4000)}}).encode(),
    "many_small_lists": b'{"c":[' + b",".join([b"[[]]"] * 12_000) + b"]}",
    "many_small_lists_with_a_surrogate": b'{"c":[' + b",".join([b"[[]]"] * 12_000) + b'],"d":"\\ud800"}',
    "oversized_4mb": b"x" * (4 << 20),
    "invalid_utf8": b"\xff" * 65_000,
}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    msgs = _valid(50_000)
    bounds = EventBounds()
    results = {
        "valid_events_per_s_baseline_json_only": _rate(_baseline, msgs),
        "valid_events_per_s_parse_event": _rate(parse_event, msgs),
        "valid_events_per_s_parse_event_with_bounds": _rate(lambda m: parse_event(m, bounds, NOW), msgs),
    }
    print(f"{'decoder (valid events)':<46} {'events/s':>12}")
    for k, v in results.items():
        print(f"{k:<46} {v:>12,.0f}")
    print(f"\n{'hostile message (worst of 5, all decoders)':<46} {'ms':>8} {'reason (event decoder)':>26}")
    for name, raw in HOSTILE.items():
        ms = max(_worst_ms(f, raw) for f in (parse_event, parse_item, parse_announcement))
        reason = getattr(parse_event(raw), "reason", "accepted")
        results[f"hostile_worst_ms_{name}"] = ms
        results[f"hostile_reason_{name}"] = reason
        print(f"{name:<46} {ms:>8.2f} {reason:>26}")
    path = write_results("decode", results)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
