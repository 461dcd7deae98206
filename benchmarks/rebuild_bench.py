"""How long rebuilding an emptied Redis takes (serving/rebuild.py), and what the dedupe marks cost.

    python benchmarks/rebuild_bench.py --dataset ml-100k
    python benchmarks/rebuild_bench.py --dataset ml-1m

Against a real redis-server on loopback: the rebuild the server runs when Redis came back empty
(flush the prefix, bootstrap the snapshot dataset, write the new epoch), once without and once with
a dedupe mark per loaded event (`rebuild.dedupe_marks`). Prints a table and writes
``benchmarks/results/rebuild/<dataset>.json``. Size `rebuild.lock_ttl_s` from these numbers; the
events consumers apply nothing while the rebuild runs (their lag grows meanwhile).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import write_results  # noqa: E402


def _used_memory(store) -> int:
    return int(store._slow.info("memory")["used_memory"])


def run(dataset: str, shared: Path, work: Path) -> dict[str, float]:
    from features.datasets import import_dataset
    from jobs.services import LocalServices
    from serving.catalog import load_catalog
    from serving.config import RebuildConfig, RedisConfig, StateConfig
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.rebuild import StateRebuilder
    from serving.runtime import CatalogRef
    from serving.state.redis_store import RedisOnlineStore

    data = work / dataset
    if not (data / "events").is_dir():
        import_dataset(shared / dataset, data, overwrite=True)
    catalog = CatalogRef(load_catalog(data))
    out: dict[str, float] = {}
    with LocalServices(work / "svc", kafka=False) as svc:
        for marks in (False, True):
            store = RedisOnlineStore(dataclasses.replace(RedisConfig(), url=svc.redis.address,
                                                         key_prefix=f"bench{int(marks)}"))
            base = _used_memory(store)
            rb = StateRebuilder(RebuildConfig(snapshot=data, dedupe_marks=marks), store, StateConfig(), catalog,
                                ModelHolder(), ServingMetrics())
            t0 = time.perf_counter()
            rb.check()  # Redis is empty: this is the rebuild
            secs = time.perf_counter() - t0
            assert store.get_epoch() is not None
            tag = "with_marks" if marks else "no_marks"
            meta = store.get_meta()
            out["events"] = float(meta["events"])
            out["users"] = float(meta["users"])
            out[f"rebuild_seconds_{tag}"] = round(secs, 2)
            out[f"redis_mb_{tag}"] = round((_used_memory(store) - base) / 2**20, 1)
            store.flush_prefix()
            store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-1m", choices=("ml-100k", "ml-1m"))
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=REPO / "var" / "bench")
    p.add_argument("--json", type=Path, default=None, help="also write the results here (benchmarks/run_all.py)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    res = run(args.dataset, args.shared, args.work)
    print(f"{'dataset':<10}{'events':>10}{'users':>8}{'rebuild s':>12}{'+ marks s':>12}{'Redis MB':>10}{'+ marks MB':>12}")
    print(f"{args.dataset:<10}{res['events']:>10,.0f}{res['users']:>8,.0f}{res['rebuild_seconds_no_marks']:>12.2f}"
          f"{res['rebuild_seconds_with_marks']:>12.2f}{res['redis_mb_no_marks']:>10.1f}{res['redis_mb_with_marks']:>12.1f}")
    path = write_results(f"rebuild/{args.dataset}", res)
    print(f"results   {path.relative_to(REPO)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
