"""Ranking long-sequence benchmark (synthetic data): what a long-term module buys, and what it costs.

Protocol (`LongSeqWorld`): users whose long-term interests appear only beyond
their last 50 behaviors (histories of 1k-10k), so the short-term attention
cannot see them and a long-term module must search for them. Compared: full
target attention vs DARE vs SDIM (and DIN-only as the floor), each as its
ablation file (ranking/configs/ablations/*.yaml) over one synthetic base config.

* Quality: test AUC at the epoch with the best valid AUC (8 candidates per
  request, 10/2/2 train/valid/test requests per user).
* Training throughput: examples/s of the sharded train task with histories of
  exactly 1,000, 2,048 examples per batch, one candidate per history (C=1) and
  impressions grouped by request (C=16 candidates share one history, the Batch
  contract's "several candidates per user"); the full model is measured too.
* Serving cost of one request: 1 user, 1,000 candidates, the longest history
  (up to 10k), through the inference module (SDIM with signatures precomputed
  at event time); p50/p90 latency.

Results: `benchmarks/results/ranking/long/full.json` (the full protocol: 2,000
users, histories 1k-10k, 2 epochs) or `.../long/quick.json` (--quick, or any of
the size flags --users/--max-len/--batch-examples: a smoke run, not committed).
`--json PATH` also writes the raw document.

Targets (reported, never asserted): >= 20k training examples/s with 1,000-long
histories on 2 cores; SDIM within 0.002 AUC of full attention at a fraction of the cost.

    python benchmarks/ranking_long_bench.py                 # the full protocol (hours on 2 cores)
    python benchmarks/ranking_long_bench.py --quick         # 300 users, histories 1k-3k, 1 epoch (tens of minutes)
    python benchmarks/ranking_long_bench.py --quick --variants din --throughput-threads 1 \\
        --users 40 --max-len 1000 --batch-examples 128      # a smoke run of every stage (minutes)

The machine may be shared: every run records the 1-minute load average before
and after (contention slows throughput figures; quality is unaffected).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_common import REPO, fmt, load1, mean_std, print_table, write_json  # noqa: E402
from results_file import write_results  # noqa: E402

from features.batch import (  # noqa: E402
    HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_SDIM_SIG, HIST_TS, ITEM_CATEGORY, ITEM_ID, ITEM_TAG, Batch,
    build_batch,
)
from features.config import load_config  # noqa: E402
from features.sequence import action_code  # noqa: E402
from features.train.launch import run_distributed  # noqa: E402
from ranking.config import RankerConfig  # noqa: E402

VARIANT_NAMES = {"din": "DIN (baseline)", "full_attention": "+full target attention", "dare": "+DARE",
                 "sdim": "+SDIM (instead of DARE)", "full": "full (DIN+DARE+AW-MoE+CL)"}
TARGET_EXAMPLES_PER_S, TARGET_SDIM_GAP = 20_000, 0.002


@dataclass(frozen=True)
class LongSeqSpec:
    """The synthetic world. A user's history: long-term interest clusters at rate `p_interest` before its
    last `session_len` behaviors, which are a session on one cluster; candidates: from the interests, the
    session or anywhere; clicks: logistic in (interest match, session match, item bias)."""

    num_items: int = 20_000
    num_clusters: int = 200
    num_users: int = 2_000
    interests: int = 3
    p_interest: float = 0.15
    session_len: int = 50
    min_len: int = 1_000
    max_len: int = 10_000
    requests_per_user: tuple[int, int, int] = (10, 2, 2)  # train, valid, test requests per user
    candidates: int = 8  # impressions per request
    requests_per_batch: int = 64
    seed: int = 0


class LongSeqWorld:
    """Users, histories and requests of a `LongSeqSpec` (numpy, deterministic by seed)."""

    def __init__(self, spec: LongSeqSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        s = spec
        self.item_cluster = rng.integers(0, s.num_clusters, s.num_items)
        self.cluster_items = [np.flatnonzero(self.item_cluster == c) for c in range(s.num_clusters)]
        self.item_bias = rng.normal(0, 0.5, s.num_items)
        self.interests = np.stack([rng.choice(s.num_clusters, s.interests, replace=False) for _ in range(s.num_users)])
        self.session = rng.integers(0, s.num_clusters, s.num_users)
        if s.min_len == s.max_len:
            lengths = np.full(s.num_users, s.min_len)
        else:
            lengths = np.exp(rng.uniform(np.log(s.min_len), np.log(s.max_len), s.num_users)).astype(np.int64)
        self.offsets = np.zeros(s.num_users + 1, np.int64)
        self.offsets[1:] = np.cumsum(lengths)
        total = int(self.offsets[-1])
        user = np.repeat(np.arange(s.num_users), lengths)
        pos = np.arange(total) - self.offsets[:-1][user]
        in_session = pos >= lengths[user] - s.session_len
        interest = (~in_session) & (rng.random(total) < s.p_interest)
        cluster = rng.integers(0, s.num_clusters, total)
        cluster = np.where(interest, self.interests[user, rng.integers(0, s.interests, total)], cluster)
        cluster = np.where(in_session & (rng.random(total) < 0.7), self.session[user], cluster)
        self.items = self._item_in(cluster, rng) + 1  # ids start at 1
        liked = rng.random(total) < np.where(interest, 0.8, np.where(in_session, 0.6, 0.3))
        self.actions = np.where(liked, action_code("click", 1.0), action_code("click", 0.0)).astype(np.int64)
        self.categories = cluster.astype(np.int64) + 1
        self.ts = pos.astype(np.int64) * 1000
        self.request_ts = lengths.astype(np.int64) * 1000 + 1

    def _item_in(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sizes = np.array([len(x) for x in self.cluster_items])
        flat = np.concatenate(self.cluster_items)
        start = np.cumsum(sizes) - sizes
        return flat[start[clusters] + (rng.random(len(clusters)) * sizes[clusters]).astype(np.int64)]

    def requests(self, split: int, rng: np.random.Generator, candidates: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users (R,), candidate items (R, C), labels (R, C)) of a split (0 train, 1 valid, 2 test)."""
        s = self.spec
        users = np.repeat(np.arange(s.num_users), s.requests_per_user[split])
        r, c = len(users), candidates
        kind = rng.random((r, c))
        cl = rng.integers(0, s.num_clusters, (r, c))
        cl = np.where(kind < 0.3, self.interests[users[:, None], rng.integers(0, s.interests, (r, c))], cl)
        cl = np.where((kind >= 0.3) & (kind < 0.5), self.session[users][:, None], cl)
        items = self._item_in(cl.ravel(), rng).reshape(r, c)
        match = (self.item_cluster[items] [..., None] == self.interests[users][:, None, :]).any(-1)
        sess = self.item_cluster[items] == self.session[users][:, None]
        logit = -1.2 + 2.0 * match + 1.0 * sess + self.item_bias[items]
        labels = (rng.random((r, c)) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        return users, items + 1, labels

    def batch(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray) -> Batch:
        lengths = self.offsets[users + 1] - self.offsets[users]
        idx = np.concatenate([np.arange(self.offsets[u], self.offsets[u + 1]) for u in users])
        n, c = items.shape
        flat = items.ravel()
        return build_batch(
            user={"user_id": (users.astype(np.int64) + 1, np.ones(n, np.int64))},
            history={HIST_ITEM_ID: self.items[idx], HIST_TS: self.ts[idx], HIST_ACTION: self.actions[idx],
                     HIST_CATEGORY: self.categories[idx]},
            history_lengths=lengths,
            candidates={ITEM_ID: (flat, np.ones(n * c, np.int64)),
                        ITEM_CATEGORY: (self.item_cluster[flat - 1] + 1, np.ones(n * c, np.int64)),
                        ITEM_TAG: (np.zeros(0, np.int64), np.zeros(n * c, np.int64))},
            num_candidates=np.full(n, c, np.int64),
            request_ts=self.request_ts[users],
            labels=labels.reshape(-1, 1),
        )


class LongSeqData:
    """`ranking.train.RankingData` over a LongSeqWorld: batches built lazily (histories are large)."""

    user_dense_dim = 0
    candidate_dense_dim = 0

    def __init__(self, world: LongSeqWorld, candidates: int, requests_per_batch: int) -> None:
        self.world, self.c, self.b = world, candidates, requests_per_batch
        rng = np.random.default_rng(world.spec.seed + 17)
        self.splits = {name: world.requests(i, rng, candidates) for i, name in enumerate(("train", "valid", "test"))}

    def num_train_batches(self, rank: int, world_size: int) -> int:
        return len(self.splits["train"][0]) // self.b // world_size

    def _batches(self, split: str, order: np.ndarray) -> Iterator[Batch]:
        users, items, labels = self.splits[split]
        for i in range(0, len(order) - self.b + 1 if split == "train" else len(order), self.b):
            sel = order[i:i + self.b]
            yield self.world.batch(users[sel], items[sel], labels[sel])

    def train_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        order = np.random.default_rng([self.world.spec.seed, epoch]).permutation(len(self.splits["train"][0]))
        return self._batches("train", order[rank::world_size])

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[Batch]:
        order = np.arange(len(self.splits[split][0]))
        for i, b in enumerate(self._batches(split, order)):
            if i % world_size == rank:
                yield b


LONG_VARIANTS = ("din", "full_attention", "dare", "sdim")


def long_config(variant: str, long_len: int, seed: int, args: argparse.Namespace, epochs: int) -> RankerConfig:
    base = {"model": {"embedding": {"dim": 32, "attention_dim": 16, "item_buckets": 1 << 16, "category_buckets": 1024,
                                    "user_features": ["user_id"], "user_buckets": 1 << 13, "candidate_features": []},
                      "sequence": {"short_len": 50, "long_len": long_len, "top_k": 32, "sdim_hashes": 8,
                                   "sdim_bits": 3},
                      "moe": {"expert_hidden": [128, 64]}},
            "train": {"epochs": epochs, "seed": seed, "threads": args.threads, "dense_lr": 0.002, "log_every": 20}}
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(base, f)
        path = f.name
    try:
        cfg = load_config(RankerConfig, path)
    finally:
        os.unlink(path)
    return load_config(RankerConfig, REPO / "ranking/configs/ablations" / f"{variant}.yaml", base=cfg)


def _train_long(rank: int, world: int, cfg: RankerConfig, spec: LongSeqSpec, out: str) -> dict[str, Any]:
    from ranking.train import train_ranker

    data = LongSeqData(LongSeqWorld(spec), spec.candidates, spec.requests_per_batch)
    return asdict(train_ranker(rank, world, cfg, data, out, export=False))


def _throughput(rank: int, world: int, cfg: RankerConfig, spec: LongSeqSpec, steps: int) -> dict[str, Any]:
    """Training examples/s of the sharded train task on histories of exactly spec.min_len behaviors."""
    from features.train.sharding import make_optimizer, shard_model
    from ranking.model import RankerModel
    from ranking.task import RankerTrainTask
    from ranking.train import resolve_model_config

    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    data = LongSeqData(LongSeqWorld(spec), spec.candidates, spec.requests_per_batch)
    mc = resolve_model_config(cfg.model, data)
    dmp = shard_model(RankerTrainTask(RankerModel(mc, "meta"), cfg.loss), cfg.train.sharding, torch.device("cpu"))
    opt = make_optimizer(dmp, cfg.train.dense_lr, sharding=cfg.train.sharding)
    it = data.train_batches(0, 0, 1)
    batches = [next(it) for _ in range(min(steps, 4))]  # built up front: the loop times the model only
    for b in batches[:2]:  # warm-up
        loss, _ = dmp(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    times = []
    for i in range(steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss, _ = dmp(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    n = batches[0].total_candidates
    med = statistics.median(times)
    return {"examples_per_batch": n, "histories_per_batch": batches[0].batch_size, "step_ms_median": med * 1000,
            "examples_per_s": n / med, "history_rows_per_batch": int(batches[0].history_lengths().sum())}


def _serving_latency(cfg: RankerConfig, spec: LongSeqSpec, candidates: int, reps: int) -> dict[str, Any]:
    """One request (1 user, `candidates` candidates, its whole history) through the inference module."""
    from ranking.inference import make_inference
    from ranking.model import RankerModel
    from ranking.train import resolve_model_config

    torch.manual_seed(0)
    world = LongSeqWorld(spec)
    data = LongSeqData(world, candidates, 1)
    model = RankerModel(resolve_model_config(cfg.model, data), embedding_device="cpu")
    ranker = make_inference(model)
    users, items, labels = data.splits["test"]
    longest = int(np.argmax(world.offsets[users + 1] - world.offsets[users]))
    batch = world.batch(users[longest:longest + 1], items[longest:longest + 1], labels[longest:longest + 1])
    if hasattr(ranker, "behavior_signatures"):  # computed when the events arrived: not part of the request
        sigs = ranker.behavior_signatures(batch.history_values(HIST_ITEM_ID))
        batch = build_batch(
            user={k: (batch.user[k].values(), batch.user[k].lengths()) for k in batch.user.keys()},
            history={**{k: batch.history_values(k) for k in batch.history.keys()}, HIST_SDIM_SIG: sigs},
            history_lengths=batch.history_lengths(),
            candidates={k: (batch.candidates[k].values(), batch.candidates[k].lengths())
                        for k in batch.candidates.keys()},
            num_candidates=batch.num_candidates, request_ts=batch.request_ts)
    for _ in range(3):
        ranker.forward(batch)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        ranker.forward(batch)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"history": int(batch.history_lengths()[0]), "candidates": candidates,
            "p50_ms": 1000 * times[len(times) // 2], "p90_ms": 1000 * times[int(len(times) * 0.9)]}



def replace_threads(args: argparse.Namespace, threads: int) -> argparse.Namespace:
    out = argparse.Namespace(**vars(args))
    out.threads = threads
    return out


def run_long(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"quality": {}, "throughput": {}, "serving": {}}
    q = args.quick
    spec = LongSeqSpec(num_users=args.users, max_len=args.max_len)
    variants = args.variants
    # quality: histories of min_len-max_len, C candidates per request
    for v in variants:
        for seed in args.seeds:
            cfg = long_config(v, spec.max_len, seed, args, epochs=args.epochs)
            print(f"\n[long quality] {v} seed {seed}  (load {load1():.1f})", flush=True)
            t0, l0 = time.perf_counter(), load1()
            try:
                res = run_distributed(_train_long, 1, cfg, replace(spec, seed=seed), str(work / f"long-{v}-{seed}"))[0]
                rec = {"test": res["test"], "valid": res["best_valid"], "best_epoch": res["best_epoch"],
                       "epochs_run": res["epochs_run"], "examples_per_s": res["examples_per_s"],
                       "train_seconds": res["train_seconds"]}
            except Exception as e:  # one failing run must not lose the others; it is reported
                rec = {"error": f"{type(e).__name__}: {e}"}
                print(f"  FAILED: {rec['error']}", flush=True)
            rec.update(wall_seconds=time.perf_counter() - t0, load_before=l0, load_after=load1())
            out["quality"].setdefault(v, {})[str(seed)] = rec
            if args.json:
                write_json(args.json, {"partial": out})
    # throughput: histories of exactly 1,000; `batch_examples` examples per batch
    for v in tuple(dict.fromkeys(variants + ("full",))):
        for c in (1, 16):
            per_batch = max(args.batch_examples // c, 1)
            tspec = replace(spec, num_users=max(4 * per_batch, 64), min_len=1_000, max_len=1_000, candidates=c,
                            requests_per_batch=per_batch, requests_per_user=(1, 1, 1))
            for th in args.throughput_threads:
                cfg = long_config(v, 1_000, 0, replace_threads(args, th), epochs=1)
                l0 = load1()
                try:
                    rec = run_distributed(_throughput, 1, cfg, tspec, 3 if q else 8)[0]
                except Exception as e:
                    rec = {"error": f"{type(e).__name__}: {e}"}
                rec.update(load_before=l0, load_after=load1(), threads=th)
                out["throughput"].setdefault(v, {})[f"C={c},threads={th}"] = rec
                print(f"[long throughput] {v:15s} C={c:<3d} threads={th} " + (
                    f"{rec['examples_per_s']:>10,.0f} ex/s  ({rec['step_ms_median']:.0f} ms/step, load "
                    f"{l0:.1f})" if "examples_per_s" in rec else rec["error"]), flush=True)
    # serving: one request, 1,000 candidates, the longest history
    for v in variants:
        cfg = long_config(v, spec.max_len, 0, args, epochs=1)
        out["serving"][v] = _serving_latency(cfg, replace(spec, num_users=min(50, spec.num_users)), 1_000,
                                             5 if q else 20)
        print(f"[long serving] {v:15s} p50 {out['serving'][v]['p50_ms']:.1f} ms  "
              f"(history {out['serving'][v]['history']}, 1,000 candidates)", flush=True)
    return summarize_long(out)


def summarize_long(raw: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {"runs": raw, "table": {}}
    rows = []
    for v, seeds in raw["quality"].items():
        ok = [r for r in seeds.values() if "test" in r]
        auc = mean_std([r["test"]["auc"] for r in ok])
        tp = raw["throughput"].get(v, {})
        best = {c: max((r.get("examples_per_s", float("nan")) for k, r in tp.items() if k.startswith(f"C={c},")),
                       default=float("nan")) for c in (1, 16)}
        c1, c16 = best[1], best[16]
        serve = raw["serving"].get(v, {}).get("p50_ms", float("nan"))
        s["table"][v] = {"auc": auc, "examples_per_s_c1": c1, "examples_per_s_c16": c16, "serving_p50_ms": serve}
        rows.append([VARIANT_NAMES.get(v, v), fmt(auc), f"{c1:,.0f}", f"{c16:,.0f}", f"{serve:.1f}"])
    print_table("Long sequences (synthetic): test AUC; training examples/s with 1,000-long histories "
                "(C = candidates per history); serving p50 of 1 request (1,000 candidates)",
                ["variant", "AUC", "ex/s C=1", "ex/s C=16", "serve p50 ms"], rows)
    t = s["table"]
    if "sdim" in t and "full_attention" in t:
        gap = t["full_attention"]["auc"][0] - t["sdim"]["auc"][0]
        s["target_sdim_vs_full"] = {"target_gap": TARGET_SDIM_GAP, "measured_gap": gap, "met_quality": gap <= TARGET_SDIM_GAP,
                                    "serving_cost_ratio": t["sdim"]["serving_p50_ms"] / t["full_attention"]["serving_p50_ms"],
                                    "training_cost_ratio_c1": t["full_attention"]["examples_per_s_c1"] / t["sdim"]["examples_per_s_c1"]}
    tp_full = raw["throughput"].get("full", {})
    best_full = {c: max((r.get("examples_per_s", 0.0) for k, r in tp_full.items() if k.startswith(f"C={c},")),
                        default=0.0) for c in (1, 16)}
    s["target_throughput"] = {"target": TARGET_EXAMPLES_PER_S, "full_model_c1": best_full[1],
                              "full_model_c16": best_full[16],
                              "by_variant_c1": {v: t["examples_per_s_c1"] for v, t in s["table"].items()}}
    print(f"  target >= {TARGET_EXAMPLES_PER_S:,} ex/s at L=1,000 (full model): C=1 {best_full[1]:,.0f}, "
          f"C=16 {best_full[16]:,.0f}")
    return s


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(LONG_VARIANTS), help=f"of {', '.join(VARIANT_NAMES)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=0, help="0: 2 (1 with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the quality runs (1 is far faster than 2 on a contended 2-core machine)")
    p.add_argument("--throughput-threads", default="1,2", help="thread counts of the throughput runs")
    p.add_argument("--users", type=int, default=0, help="users of the quality world (0: 2,000; 300 with --quick)")
    p.add_argument("--max-len", type=int, default=0,
                   help="longest history, >= 1,000 (0: 10,000; 3,000 with --quick)")
    p.add_argument("--batch-examples", type=int, default=0, help="examples per throughput batch (0: 2,048)")
    p.add_argument("--work-dir", type=Path, default=REPO / "var" / "ranking_long_bench")
    p.add_argument("--quick", action="store_true",
                   help="small run (smoke test; writes benchmarks/results/ranking/long/quick.json)")
    p.add_argument("--json", default=None, help="also write the raw document here")
    args = p.parse_args(argv)
    args.variants = tuple(v for v in args.variants.split(",") if v)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.throughput_threads = [int(t) for t in args.throughput_threads.split(",") if t]
    unknown = [v for v in args.variants if v not in VARIANT_NAMES]
    if unknown:
        p.error(f"unknown variant(s) {unknown} (known: {list(VARIANT_NAMES)})")
    shrunk = bool(args.users or args.max_len or args.batch_examples)
    args.users = args.users or (300 if args.quick else 2_000)
    args.max_len = args.max_len or (3_000 if args.quick else 10_000)
    args.batch_examples = args.batch_examples or 2_048
    args.epochs = args.epochs or (1 if args.quick else 2)
    if args.max_len < LongSeqSpec.min_len:
        p.error(f"--max-len {args.max_len} is below the shortest history ({LongSeqSpec.min_len})")
    if args.users < 1 or args.batch_examples < 1:
        p.error(f"--users ({args.users}) and --batch-examples ({args.batch_examples}) must be positive")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    t0, l0 = time.perf_counter(), load1()
    doc = run_long(args, args.work_dir)
    doc["settings"] = {"users": args.users, "min_len": LongSeqSpec.min_len, "max_len": args.max_len,
                       "epochs": args.epochs, "seeds": args.seeds, "threads": args.threads,
                       "throughput_threads": args.throughput_threads, "batch_examples": args.batch_examples,
                       "quick": args.quick}
    doc.update(seconds=time.perf_counter() - t0, load_at_start=l0, load_at_end=load1())
    name = "quick" if args.quick or shrunk else "full"
    print(f"\n-> {write_results(f'ranking/long/{name}', doc, benchmark='ranking_long_bench').relative_to(REPO)}")
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    failed = [r for v in doc["runs"]["quality"].values() for r in v.values() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
