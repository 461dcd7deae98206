"""Benchmark of the Spark feature jobs (`cascade build-features`) against a single-process baseline.

For each case (ML-1M from ../shared/data, synthetic 1M / 3M / 10M events):

* Spark: `cascade build-features` with every stage, `--master local[2]` by default,
  in a subprocess; wall time (JVM start included), per-stage times from the
  manifest, peak RSS of the whole process tree (Python driver + JVM), sampled
  every 0.2 s with psutil.
* baseline: a single-process pyarrow/numpy implementation of the sequence +
  ranking-sample stage on the same input, in a subprocess (same RSS sampling):
  validation filter, per-user dedup, sort, timelines, capped sequences,
  hist_len, as-of user and item counters over the same windows, exact-quantile
  time split, Parquet out. It does not draw sampled negatives, write the other
  outputs or the report. Its outputs are checked against Spark's (row counts,
  sums of hist_len and counters, timeline lengths).
* ratio = baseline seconds / Spark seconds of the comparable stages
  (events + timelines + sequences + ranking_samples); > 1 means Spark is faster.

    .venv/bin/python benchmarks/features_bench.py                       # ml-1m, synth-1m, synth-3m
    .venv/bin/python benchmarks/features_bench.py --cases synth-10m --json reports/features_10m.json
    .venv/bin/python benchmarks/features_bench.py --baseline DATASET OUT   # the baseline alone (used internally)

Prints a table and writes JSON (--json). Never asserts: misses are reported as measured.
The machine's load average is recorded before and after each run (other work skews timings).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CASES = {"ml-1m": None, "synth-1m": 1_000_000, "synth-3m": 3_000_000, "synth-10m": 10_000_000}


# ---------------------------------------------------------------- baseline (single process)

def _category_ids(dataset: Path):
    import numpy as np
    import pyarrow.parquet as pq

    from features.sequence import category_id

    t = pq.read_table(dataset / "items", columns=["item_id", "categories"])
    ids = t["item_id"].to_numpy()
    cats = np.fromiter((category_id(c) for c in t["categories"].to_pylist()), dtype=np.int64, count=len(ids))
    order = np.argsort(ids)
    return ids[order], cats[order]


def _asof_counts(key_sorted, ts, first_of_run, counted, positive, windows_ms):
    """Counters strictly before each row's ts, rows sorted by (key, ts). Returns {window: (cnt, pos)}."""
    import numpy as np

    n = len(ts)
    cc = np.concatenate([[0], np.cumsum(counted, dtype=np.int64)])  # exclusive prefix sums
    cp = np.concatenate([[0], np.cumsum(positive, dtype=np.int64)])
    new_key = np.r_[True, key_sorted[1:] != key_sorted[:-1]]
    key_start = np.maximum.accumulate(np.where(new_key, np.arange(n), 0))
    rank = np.cumsum(new_key) - 1
    t0 = int(ts.min()) if n else 0
    maxw = max([w for w in windows_ms if w] or [0])
    span = (int(ts.max()) - t0 if n else 0) + maxw + 2  # keys never overlap, even shifted by a window
    composite = rank.astype(np.int64) * span + (ts - t0) + maxw + 1
    out = {}
    for w in windows_ms:
        lo = key_start if w is None else np.searchsorted(composite, composite - w, side="left")
        out[w] = (cc[first_of_run] - cc[lo], cp[first_of_run] - cp[lo])
    return out


def run_baseline(dataset: Path, out: Path) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from features.schema import EVENT_TYPE_NAMES
    from features.sequence import SequenceConfig
    from features.transforms import StatsConfig, cnt_column, pos_column

    seq, stats = SequenceConfig(), StatsConfig()
    times = {}
    t0 = time.perf_counter()
    t = pq.read_table(dataset / "events", columns=["event_id", "user_id", "item_id", "ts_ms", "event_type", "label"])
    times["read"] = time.perf_counter() - t0
    # validation (the same checks as the Spark job) and per-user dedup keeping the first occurrence
    code = pc.index_in(t["event_type"], pa.array(list(EVENT_TYPE_NAMES)))
    label = t["label"].to_numpy(zero_copy_only=False)
    ok = (
        pc.is_valid(t["event_id"]).to_numpy(zero_copy_only=False)
        & (pc.fill_null(pc.utf8_length(t["event_id"]), 0).to_numpy(zero_copy_only=False) > 0)
        & pc.is_valid(code).to_numpy(zero_copy_only=False)
        & (pc.fill_null(t["ts_ms"], -1).to_numpy(zero_copy_only=False) >= 0)
        & np.isfinite(label)
    )
    t = t.append_column("row", pa.array(np.arange(t.num_rows))).filter(pa.array(ok))
    first = t.group_by(["user_id", "event_id"], use_threads=False).aggregate([("row", "min")])
    t = t.filter(pc.is_in(t["row"], first["row_min"]))
    order = pc.sort_indices(t, sort_keys=[("user_id", "ascending"), ("ts_ms", "ascending"), ("event_id", "ascending")])
    t = t.take(order)
    times["validate_dedup_sort"] = time.perf_counter() - t0 - sum(times.values())

    user = t["user_id"].to_numpy()
    item = t["item_id"].to_numpy()
    ts = t["ts_ms"].to_numpy()
    label = t["label"].to_numpy()
    etype = pc.index_in(t["event_type"], pa.array(list(EVENT_TYPE_NAMES))).to_numpy() + 1  # EventType codes
    beh_codes = np.array([EVENT_TYPE_NAMES.index(x) + 1 for x in seq.behavior_event_types])
    is_beh = np.isin(etype, beh_codes)
    pos = label >= 0.5
    action = 2 * etype + pos
    ids, cats = _category_ids(dataset)
    where = np.searchsorted(ids, item).clip(0, max(len(ids) - 1, 0))
    category = np.where((len(ids) > 0) & (ids[where] == item), cats[where], 0) if len(ids) else np.zeros_like(item)

    # timelines and sequences
    b_user, b_item, b_ts, b_act, b_cat = user[is_beh], item[is_beh], ts[is_beh], action[is_beh], category[is_beh]
    starts = np.flatnonzero(np.r_[True, b_user[1:] != b_user[:-1]]) if len(b_user) else np.empty(0, np.int64)
    offsets = np.r_[starts, len(b_user)].astype(np.int64)
    lengths = np.diff(offsets)
    tl = pa.table({
        "user_id": b_user[starts],
        **{f: pa.ListArray.from_arrays(pa.array(offsets), pa.array(v)) for f, v in
           (("item_id", b_item), ("ts_ms", b_ts), ("action", b_act), ("category", b_cat))},
        "length": lengths,
    })
    (out / "timelines").mkdir(parents=True, exist_ok=True)
    pq.write_table(tl, out / "timelines" / "part-0.parquet", compression="zstd")

    def tail(cap):
        n = np.minimum(lengths, cap)
        idx = np.arange(int(n.sum())) + np.repeat(offsets[1:] - n - (np.cumsum(n) - n), n)
        off = np.r_[0, np.cumsum(n)]
        return off, idx

    seqs = {"user_id": b_user[starts]}
    for prefix, cap in (("long_", seq.long_cap), ("short_", seq.short_cap)):
        off, idx = tail(cap)
        for f, v in (("item_id", b_item), ("ts_ms", b_ts), ("action", b_act), ("category", b_cat)):
            seqs[prefix + f] = pa.ListArray.from_arrays(pa.array(off), pa.array(v[idx]))
    (out / "sequences").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(seqs), out / "sequences" / "part-0.parquet", compression="zstd")
    times["timelines_sequences"] = time.perf_counter() - t0 - sum(times.values())

    # hist_len and as-of counters (user: rows already sorted by user, ts; item: one more sort)
    n = len(ts)
    new_run = np.r_[True, (user[1:] != user[:-1]) | (ts[1:] != ts[:-1])]
    run_first = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
    new_user = np.r_[True, user[1:] != user[:-1]]
    user_first = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    cb = np.concatenate([[0], np.cumsum(is_beh, dtype=np.int64)])
    hist_len = cb[run_first] - cb[user_first]
    counted = np.isin(etype, [EVENT_TYPE_NAMES.index(x) + 1 for x in stats.counted_event_types()])
    wms = stats.window_ms()
    cols = {}
    for w, (c, p) in zip(stats.windows, _asof_counts(user, ts, run_first, counted, counted & pos, wms).values()):
        cols[cnt_column("user", w)], cols[pos_column("user", w)] = c, p
    io = np.lexsort((ts, item))
    i_item, i_ts = item[io], ts[io]
    i_new_run = np.r_[True, (i_item[1:] != i_item[:-1]) | (i_ts[1:] != i_ts[:-1])]
    i_run_first = np.maximum.accumulate(np.where(i_new_run, np.arange(n), 0))
    inv = np.empty_like(io)
    inv[io] = np.arange(n)
    for w, (c, p) in zip(stats.windows, _asof_counts(i_item, i_ts, i_run_first, counted[io], (counted & pos)[io], wms).values()):
        cols[cnt_column("item", w)], cols[pos_column("item", w)] = c[inv], p[inv]
    times["hist_len_counters"] = time.perf_counter() - t0 - sum(times.values())

    # time split (exact quantiles of the sample timestamps) and Parquet out
    cut_v, cut_t = np.quantile(ts, [0.8, 0.9], method="inverted_cdf").astype(np.int64)
    split = np.where(ts < cut_v, 0, np.where(ts < cut_t, 1, 2))
    samples = t.select(["event_id", "user_id", "item_id", "ts_ms", "event_type", "label"]).rename_columns(
        ["sample_id", "user_id", "item_id", "ts_ms", "event_type", "label"])
    samples = samples.append_column("item_category", pa.array(category)).append_column("hist_len", pa.array(hist_len))
    for k, v in cols.items():
        samples = samples.append_column(k, pa.array(v))
    for s, name in enumerate(("train", "valid", "test")):
        d = out / "ranking_samples" / f"split={name}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(samples.filter(pa.array(split == s)), d / "part-0.parquet", compression="zstd")
    times["split_write"] = time.perf_counter() - t0 - sum(times.values())
    return {
        "times_s": {k: round(v, 3) for k, v in times.items()},
        "rows": int(n), "timelines": int(len(starts)),
        "sum_hist_len": int(hist_len.sum()),
        "sum_counters": {k: int(v.sum()) for k, v in cols.items()},
        "sum_timeline_lengths": int(lengths.sum()),
    }


# ---------------------------------------------------------------- measurement harness

def _measure(cmd: list[str], env: dict | None = None) -> dict:
    """Runs cmd; wall time and peak RSS of the process tree (sampled every 0.2 s)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    peak = 0
    ps = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    return {"wall_s": time.perf_counter() - t0, "peak_rss_gib": peak / 2**30, "rc": proc.returncode,
            "stdout": out, "stderr": err}


def _prepare(case: str, work: Path, shared: Path) -> tuple[Path, float]:
    from features.datasets import import_dataset
    from features.datasets.synthetic import SynthConfig, generate

    d = work / case
    if (d / "manifest.json").exists():
        return d, 0.0
    t0 = time.perf_counter()
    if case == "ml-1m":
        import_dataset(shared / "ml-1m", d, overwrite=True)
    else:
        generate(SynthConfig(events=CASES[case], seed=0), d, overwrite=True)
    return d, time.perf_counter() - t0


def _spark_sums(features: Path) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from features.transforms import StatsConfig, counter_columns

    cols = ["hist_len", "is_sampled_negative", *counter_columns("user", StatsConfig()), *counter_columns("item", StatsConfig())]
    t = pq.read_table(features / "ranking_samples", columns=cols)
    t = t.filter(pc.invert(t["is_sampled_negative"]))
    tl = pq.read_table(features / "timelines", columns=["length"])
    return {
        "rows": t.num_rows, "timelines": tl.num_rows, "sum_hist_len": int(pc.sum(t["hist_len"]).as_py() or 0),
        "sum_counters": {c: int(pc.sum(t[c]).as_py() or 0) for c in cols[2:]},
        "sum_timeline_lengths": int(pc.sum(tl["length"]).as_py() or 0),
    }


def _reader_throughput(features: Path) -> dict:
    import torch

    from features.reader import FeatureStore, ReaderConfig

    t0 = time.perf_counter()
    store = FeatureStore(features)
    load = time.perf_counter() - t0
    out = {"load_s": round(load, 2), "torch_threads": torch.get_num_threads()}
    for validate in (True, False):
        t0, n = time.perf_counter(), 0
        for b in store.ranking_batches("train", ReaderConfig(batch_size=1024, validate=validate)):
            n += b.batch_size
            if time.perf_counter() - t0 > 20:
                break
        out[f"ranking_samples_per_s{'_validated' if validate else ''}"] = round(n / (time.perf_counter() - t0))
    return out


def run_case(case: str, args: argparse.Namespace, work: Path) -> dict:
    dataset, prep_s = _prepare(case, work, args.shared_data)
    events = json.loads((dataset / "manifest.json").read_text())["stats"]["events"]
    res: dict = {"case": case, "events": events, "prepare_s": round(prep_s, 1), "master": args.master}
    feats = work / f"{case}-features"
    res["load_before"] = os.getloadavg()
    cascade = [sys.executable, "-m", "jobs.cli", "build-features", "--dataset", str(dataset), "--out", str(feats),
               "--master", args.master, "--overwrite", f"spark.driver_memory={args.driver_memory}",
               f"spark.shuffle_partitions={args.shuffle_partitions}"]
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1")
    m = _measure(cascade, env)
    if m["rc"] != 0:
        res["spark_error"] = (m["stderr"] or m["stdout"])[-3000:]
        print(f"{case}: Spark run failed (rc={m['rc']}):\n{res['spark_error']}", file=sys.stderr)
        return res
    manifest = json.loads((feats / "manifest.json").read_text())
    stages = manifest["timings_s"]
    comparable = sum(stages[s] for s in ("events", "timelines", "sequences", "ranking_samples"))
    res.update({
        "spark_wall_s": round(m["wall_s"], 1), "spark_peak_rss_gib": round(m["peak_rss_gib"], 2),
        "spark_stages_s": stages, "spark_comparable_s": round(comparable, 1),
        "ranking_rows": manifest["outputs"]["ranking_samples"]["rows"],
    })
    if not args.skip_baseline:
        bout = work / f"{case}-baseline"
        b = _measure([sys.executable, str(Path(__file__).resolve()), "--baseline", str(dataset), str(bout)])
        if b["rc"] != 0:
            res["baseline_error"] = b["stderr"][-3000:]
        else:
            info = json.loads(b["stdout"].strip().splitlines()[-1])
            res.update({
                "baseline_wall_s": round(b["wall_s"], 1), "baseline_peak_rss_gib": round(b["peak_rss_gib"], 2),
                "baseline_stages_s": info["times_s"],
                "ratio_baseline_over_spark": round(b["wall_s"] / comparable, 3),
            })
            s = _spark_sums(feats)
            res["outputs_match"] = all(s[k] == info[k] for k in ("rows", "timelines", "sum_hist_len", "sum_counters", "sum_timeline_lengths"))
            if not res["outputs_match"]:
                res["mismatch"] = {k: (s[k], info[k]) for k in s if s[k] != info[k]}
    if args.reader and case == "ml-1m":
        res["reader"] = _reader_throughput(feats)
    res["load_after"] = os.getloadavg()
    if not args.keep:
        import shutil

        shutil.rmtree(feats, ignore_errors=True)
        shutil.rmtree(work / f"{case}-baseline", ignore_errors=True)
    return res


def _table(results: list[dict]) -> str:
    head = ("case", "events", "Spark wall s", "Spark peak GiB", "Spark seq+samples s", "baseline s",
            "baseline peak GiB", "baseline/Spark", "Spark s per 1M ev", "outputs match", "load avg")
    rows = [head]
    for r in results:
        if "spark_wall_s" not in r:
            rows.append((r["case"], f"{r['events']:,}", "FAILED", *[""] * 8))
            continue
        rows.append((
            r["case"], f"{r['events']:,}", f"{r['spark_wall_s']:.1f}", f"{r['spark_peak_rss_gib']:.2f}",
            f"{r['spark_comparable_s']:.1f}", f"{r.get('baseline_wall_s', float('nan')):.1f}",
            f"{r.get('baseline_peak_rss_gib', float('nan')):.2f}", f"{r.get('ratio_baseline_over_spark', float('nan')):.2f}",
            f"{r['spark_wall_s'] / (r['events'] / 1e6):.1f}", str(r.get("outputs_match", "-")),
            f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}",
        ))
    widths = [max(len(str(x[i])) for x in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows)


def _scaling(results: list[dict]) -> dict | None:
    pts = [(r["events"], r["spark_wall_s"]) for r in results if r["case"].startswith("synth") and "spark_wall_s" in r]
    if len(pts) < 2:
        return None
    (e0, t0), (e1, t1) = pts[0], pts[-1]
    return {"exponent": round(math.log(t1 / t0) / math.log(e1 / e0), 3), "from": pts[0], "to": pts[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="ml-1m,synth-1m,synth-3m", help=f"comma-separated, of {list(CASES)}")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--driver-memory", default="6g")
    p.add_argument("--shuffle-partitions", type=int, default=8)
    p.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--workdir", type=Path, default=None, help="datasets and outputs (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the features directories")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--reader", action="store_true", help="also measure reader throughput on ML-1M")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--baseline", nargs=2, metavar=("DATASET", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline:
        print(json.dumps(run_baseline(Path(args.baseline[0]), Path(args.baseline[1]))))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="features_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for case in cases:
        print(f"[{case}] preparing data and running Spark + baseline ...", flush=True)
        results.append(run_case(case, args, work))
        print(_table(results[-1:]), flush=True)
    print()
    print(_table(results))
    sc = _scaling(results)
    if sc:
        print(f"scaling: Spark wall time ~ events^{sc['exponent']} between {sc['from'][0]:,} and {sc['to'][0]:,} events")
    for r in results:
        if "reader" in r:
            print(f"reader ({r['case']}): {r['reader']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "scaling": sc, "cpu_count": os.cpu_count()}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
