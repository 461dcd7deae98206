"""Ranking benchmark: CTR ablations on real data, long sequences on synthetic data, two-stage re-ranking.

Sections (each prints a table; everything goes to --json):

1. CTR on real data (the BARS protocol: same split, same budget, 3 seeds, mean +- std).
   ML-1M: the rating events of users 1-2999 (the shared copy's ratings with
   timestamps), label = rating >= 4, global time split of the samples
   (80/10/10 by time); ML-100K: the same protocol on every rating. Variants
   (ranking/configs/ablations/*.yaml): DIN-only baseline, +DARE, +SDIM (instead
   of DARE), +AW-MoE without and with the contrastive gate loss, and the full
   model (DIN + DARE + AW-MoE + contrastive). Metrics: test AUC, GAUC (per
   user), logloss at the epoch with the best valid AUC; the delta against the
   DIN baseline is paired by seed (same data order) and measured in the same run.
   Data are imported from ../shared/data and built with `cascade build-features`
   on first use (cached under --data-dir).

2. Long sequences (synthetic, `LongSeqWorld`): users whose long-term interests
   appear only beyond their last 50 behaviors (histories of 1k-10k), so the
   short-term attention cannot see them and a long-term module must search for
   them. Full target attention vs DARE vs SDIM (and DIN-only as the floor):
   test AUC; training examples/s with histories of exactly 1,000 (one candidate
   per history, and impressions grouped by request: C candidates share one
   history, the Batch contract's "several candidates per user"); and the
   serving cost of one request (1 user, 1,000 candidates, 10k behaviors; SDIM
   with signatures precomputed at event time).

3. Two-stage (ML-1M leave-one-out): the ranker re-ranks the retriever's top 500;
   HR@10 / NDCG@10 of the pipeline vs the retriever alone. Needs a retriever
   export (retrieval.export); the section says so when it cannot run.

Targets (reported, never asserted): full model AUC >= DIN + 0.005 on ML-1M;
pipeline HR@10 > retriever HR@10; >= 20k training examples/s with 1,000-long
histories on 2 cores; SDIM within 0.002 AUC of full attention at a fraction of the cost.

    python benchmarks/ranking_bench.py --json reports/ranking_bench.json          # everything (hours on 2 cores)
    python benchmarks/ranking_bench.py --sections ctr --datasets ml-100k --seeds 0  # one slice
    python benchmarks/ranking_bench.py --quick --json /tmp/rb.json                # a minutes-long smoke run

The machine may be shared: the script records the 1-minute load average before
and after every run (contention slows throughput figures; quality is unaffected).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features.batch import (  # noqa: E402
    HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_SDIM_SIG, HIST_TS, ITEM_CATEGORY, ITEM_ID, ITEM_TAG, Batch,
    build_batch,
)
from features.config import load_config  # noqa: E402
from features.sequence import action_code  # noqa: E402
from features.train.launch import run_distributed  # noqa: E402
from ranking.config import RankerConfig  # noqa: E402

VARIANTS = ("din", "dare", "sdim", "awmoe", "awmoe_cl", "full")
VARIANT_NAMES = {"din": "DIN (baseline)", "dare": "+DARE", "sdim": "+SDIM (instead of DARE)",
                 "awmoe": "+AW-MoE", "awmoe_cl": "+AW-MoE +contrastive", "full": "full (DIN+DARE+AW-MoE+CL)",
                 "full_attention": "+full target attention"}
DATASETS: dict[str, dict[str, Any]] = {
    "ml-1m": {"source": "ml-1m", "config": "ranking/configs/ml-1m.yaml",
              "build": ["ranking.event_types=[rating]", "ranking.sampled_negative_event_types=[]",
                        "stats.event_types=[rating]", "sequence.behavior_event_types=[rating]"]},
    "ml-100k": {"source": "ml-100k", "config": "ranking/configs/ml-100k.yaml", "build": []},
}
TARGET_AUC_GAIN, TARGET_EXAMPLES_PER_S, TARGET_SDIM_GAP = 0.005, 20_000, 0.002


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
def prepare_features(name: str, shared: Path, data_dir: Path) -> Path:
    """Imports the dataset and builds its features once (cached); returns the features directory."""
    spec = DATASETS[name]
    canon, feats = data_dir / name, data_dir / f"features-{name}{'-ctr' if spec['build'] else ''}"
    cascade = [sys.executable, "-m", "jobs.cli"]
    if not (canon / "manifest.json").exists():
        print(f"importing {shared / spec['source']} -> {canon}", flush=True)
        subprocess.run(cascade + ["data", "import", "--source", str(shared / spec["source"]), "--out", str(canon),
                                  "--overwrite"], check=True, cwd=REPO)
    if not (feats / "manifest.json").exists() or not (feats / "ranking_samples").exists():
        print(f"building features {canon} -> {feats} (Spark, a few minutes)", flush=True)
        subprocess.run(cascade + ["build-features", "--dataset", str(canon), "--out", str(feats), "--master",
                                  "local[2]", "--overwrite", "spark.shuffle_partitions=4", *spec["build"]],
                       check=True, cwd=REPO)
    return feats


# ---------------------------------------------------------------------------------------------- 1. CTR
def _train_ctr(rank: int, world: int, cfg: RankerConfig, out: str) -> dict[str, Any]:
    from ranking.data import open_ranking_data
    from ranking.train import train_ranker

    data = open_ranking_data(cfg.data, cfg.model)
    return asdict(train_ranker(rank, world, cfg, data, out, export=False))


def ctr_config(dataset: str, variant: str, features: Path, seed: int, args: argparse.Namespace) -> RankerConfig:
    cfg = load_config(RankerConfig, REPO / DATASETS[dataset]["config"])
    overrides = [f"data.features_dir={features}", f"train.seed={seed}", f"data.shuffle_seed={seed}",
                 f"train.threads={args.threads}"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_steps:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps}")
    return load_config(RankerConfig, REPO / "ranking/configs/ablations" / f"{variant}.yaml", overrides, base=cfg)


def run_ctr(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = [(d, v, s) for d in args.datasets for v in args.variants for s in args.seeds]
    for i, (dataset, variant, seed) in enumerate(runs):
        features = prepare_features(dataset, args.shared_data, args.data_dir)
        cfg = ctr_config(dataset, variant, features, seed, args)
        print(f"\n[ctr {i + 1}/{len(runs)}] {dataset} {variant} seed {seed}  (load {load1():.1f})", flush=True)
        l0, t0 = load1(), time.perf_counter()
        try:
            res = run_distributed(_train_ctr, 1, cfg, str(work / f"ctr-{dataset}-{variant}-{seed}"))[0]
            rec = {"test": res["test"], "valid": res["best_valid"], "best_epoch": res["best_epoch"],
                   "epochs_run": res["epochs_run"], "examples_per_s": res["examples_per_s"],
                   "train_seconds": res["train_seconds"], "history": res["history"]}
        except Exception as e:  # one failing run must not lose the others; it is reported
            rec = {"error": f"{type(e).__name__}: {e}"}
            print(f"  FAILED: {rec['error']}", flush=True)
        rec.update(wall_seconds=time.perf_counter() - t0, load_before=l0, load_after=load1())
        out.setdefault(dataset, {}).setdefault(variant, {})[str(seed)] = rec
        if args.json:  # partial results survive an interrupted run
            _write_partial(args, {"ctr": out})
    return summarize_ctr(out, args)


def summarize_ctr(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {"runs": raw, "table": {}}
    for dataset, variants in raw.items():
        base = variants.get("din", {})
        rows, table = [], {}
        for variant, seeds in variants.items():
            ok = {s: r for s, r in seeds.items() if "test" in r}
            auc = mean_std([r["test"]["auc"] for r in ok.values()])
            gauc = mean_std([r["test"]["gauc"] for r in ok.values()])
            ll = mean_std([r["test"]["logloss"] for r in ok.values()])
            eps = mean_std([r["examples_per_s"] for r in ok.values()])
            paired = [r["test"]["auc"] - base[s]["test"]["auc"] for s, r in ok.items() if "test" in base.get(s, {})]
            delta = mean_std(paired) if variant != "din" else (0.0, 0.0)
            table[variant] = {"auc": auc, "gauc": gauc, "logloss": ll, "delta_auc_vs_din": delta,
                              "examples_per_s": eps, "seeds": sorted(ok), "failed": sorted(set(seeds) - set(ok))}
            rows.append([VARIANT_NAMES.get(variant, variant), fmt(auc), fmt(gauc), fmt(ll),
                         fmt(delta) if variant != "din" else "(baseline)", f"{eps[0]:,.0f}", str(len(ok))])
        summary["table"][dataset] = table
        print_table(f"CTR {dataset}: test metrics at the best-valid epoch, mean ± std over seeds",
                    ["variant", "AUC", "GAUC", "logloss", "ΔAUC vs DIN (paired)", "train ex/s", "seeds"], rows)
    if "ml-1m" in summary["table"] and "full" in summary["table"]["ml-1m"]:
        gain = summary["table"]["ml-1m"]["full"]["delta_auc_vs_din"][0]
        summary["target_full_vs_din"] = {"target": TARGET_AUC_GAIN, "measured": gain, "met": gain >= TARGET_AUC_GAIN}
    return summary


# ---------------------------------------------------------------------------------------------- 2. long sequences
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
    opt = make_optimizer(dmp, cfg.train.dense_lr)
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
    spec = LongSeqSpec(num_users=300 if q else 2_000, max_len=3_000 if q else 10_000)
    variants = args.long_variants
    # quality: histories of 1k-10k, C candidates per request
    for v in variants:
        for seed in args.long_seeds:
            cfg = long_config(v, spec.max_len, seed, args, epochs=1 if q else args.long_epochs)
            print(f"\n[long quality] {v} seed {seed}  (load {load1():.1f})", flush=True)
            t0, l0 = time.perf_counter(), load1()
            try:
                res = run_distributed(_train_long, 1, cfg, replace(spec, seed=seed), str(work / f"long-{v}-{seed}"))[0]
                rec = {"test": res["test"], "valid": res["best_valid"], "examples_per_s": res["examples_per_s"]}
            except Exception as e:
                rec = {"error": f"{type(e).__name__}: {e}"}
                print(f"  FAILED: {rec['error']}", flush=True)
            rec.update(wall_seconds=time.perf_counter() - t0, load_before=l0, load_after=load1())
            out["quality"].setdefault(v, {})[str(seed)] = rec
            if args.json:
                _write_partial(args, {"long_sequence": out})
    # throughput: histories of exactly 1,000; 2,048 examples per batch
    for v in variants + ("full",):
        for c in (1, 16):
            per_batch = 2048 // c
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
        out["serving"][v] = _serving_latency(cfg, replace(spec, num_users=50), 1_000, 5 if q else 20)
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
    print_table("Long sequences (synthetic, histories 1k-10k): test AUC; training examples/s with 1,000-long "
                "histories (C = candidates per history); serving p50 of 1 request (1,000 candidates)",
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
    return s


# ---------------------------------------------------------------------------------------------- 3. two-stage
class Rerank:
    """ML-1M leave-one-out requests for the re-ranker, built from the shared reader's timelines and the
    retriever's candidates: a request is (user, history = timeline[:t]) with candidates from the
    retriever's top 500 (history items masked). The retriever's score of each candidate (the cosine of
    the user and item vectors) is the ranker's one candidate dense feature, as in a production cascade."""

    def __init__(self, store: Any, retriever: Any, cap: int, top: int) -> None:
        self.store, self.retriever, self.cap, self.top = store, retriever, cap, top
        self.tl = store.timeline_values
        self.off = store.timeline_offsets
        self.users = store.timeline_users.ids
        self.train_len = store.retrieval_train_len
        self.item_row = {int(i): r for r, i in enumerate(retriever.item_ids)}

    def history(self, urows: np.ndarray, t: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        from features.reader import segment_indices

        start = np.maximum(t - self.cap, 0)
        idx = segment_indices(self.off[urows] + start, t - start)
        return {HIST_ITEM_ID: self.tl["item_id"][idx], HIST_TS: self.tl["ts_ms"][idx],
                HIST_ACTION: self.tl["action"][idx], HIST_CATEGORY: self.tl["category"][idx]}, t - start

    def users_kjt(self, user_ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {"user_id": (user_ids, np.ones(len(user_ids), np.int64))}
        rows, found = self.store.users.rows(user_ids)
        for k in self.store.user_attr_keys:
            vals, present = self.store.user_attrs[k]
            ok = found & present[rows]
            out[k] = (vals[rows][ok], ok.astype(np.int64))
        return out

    def candidates_kjt(self, items: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        rows, found = self.store.items.rows(items)
        out = {ITEM_ID: (items, np.ones(len(items), np.int64)),
               ITEM_CATEGORY: self.store.item_categories.gather(rows, found),
               ITEM_TAG: self.store.item_tags.gather(rows, found)}
        for k in self.store.item_attr_keys:
            vals, present = self.store.item_attrs[k]
            ok = found & present[rows]
            out[k] = (vals[rows][ok], ok.astype(np.int64))
        return out

    def batch(self, urows: np.ndarray, t: np.ndarray, cands: np.ndarray, scores: np.ndarray,
              labels: np.ndarray) -> Batch:
        hist, lens = self.history(urows, t)
        n = cands.size
        return build_batch(user=self.users_kjt(self.users[urows]), history=hist, history_lengths=lens,
                           candidates=self.candidates_kjt(cands.ravel()),
                           num_candidates=np.full(len(urows), cands.shape[1], np.int64),
                           request_ts=self.tl["ts_ms"][self.off[urows] + t],
                           candidate_dense=scores.reshape(n, 1).astype(np.float32), labels=labels.reshape(n, 1))

    def scores(self, user_vecs: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(R, D) user vectors, (R, C) item ids -> (R, C) retriever scores (0 for items it does not know)."""
        rows = np.array([self.item_row.get(int(i), -1) for i in items.ravel()]).reshape(items.shape)
        vecs = np.asarray(self.retriever.item_vectors, np.float32)[np.maximum(rows, 0)]  # (R, C, D)
        return np.where(rows >= 0, np.einsum("rd,rcd->rc", user_vecs, vecs), 0.0)

    @torch.no_grad()
    def retrieve(self, urows: np.ndarray, t: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
        """The retriever's best unseen items for history timeline[:t] (exact scores, seen masked):
        ids (R, top), their scores (R, top), and the user vectors (R, D)."""
        r = self.retriever
        vecs = torch.from_numpy(np.asarray(r.item_vectors, np.float32))
        out, out_scores, out_vecs = [], [], []
        for s in range(0, len(urows), chunk):
            u, tt = urows[s:s + chunk], t[s:s + chunk]
            hist, lens = self.history(u, tt)
            hist_r = {k: v for k, v in hist.items() if k in r.history_keys}
            start = np.maximum(tt - r.max_len, 0) - np.maximum(tt - self.cap, 0)  # the retriever reads its own cap
            keep = np.concatenate([np.arange(a, ln) + o for a, ln, o in zip(start, lens, np.cumsum(lens) - lens)])
            b = build_batch(user=self.users_kjt(self.users[u]), history={k: v[keep] for k, v in hist_r.items()},
                            history_lengths=lens - start, candidates={}, num_candidates=np.zeros(len(u), np.int64),
                            request_ts=np.zeros(len(u), np.int64))
            uvec = r.user_embedding(b).float()
            scores = uvec @ vecs.T  # (c, N)
            seen_rows = np.array([self.item_row.get(int(i), -1) for i in hist[HIST_ITEM_ID]])
            owner = np.repeat(np.arange(len(u)), lens)
            ok = seen_rows >= 0
            scores[torch.from_numpy(owner[ok]), torch.from_numpy(seen_rows[ok])] = float("-inf")
            top = scores.topk(self.top, dim=1)
            out.append(r.item_ids[top.indices.numpy()])
            out_scores.append(top.values.numpy())
            out_vecs.append(uvec.numpy())
        return np.concatenate(out), np.concatenate(out_scores), np.concatenate(out_vecs)


def _rerank_requests(rr: Rerank, urows: np.ndarray, t: np.ndarray, negatives: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1 positive (the item at t) + `negatives` sampled from the retriever's top list (minus the positive):
    candidates (R, 1 + n), their retriever scores, labels."""
    top, _, uvec = rr.retrieve(urows, t)
    target = rr.tl["item_id"][rr.off[urows] + t]
    keys = rng.random(top.shape) + (top == target[:, None])  # the positive sorts last, never a negative
    neg = np.take_along_axis(top, np.argsort(keys, axis=1)[:, :negatives], axis=1)
    cands = np.concatenate([target[:, None], neg], axis=1)
    labels = np.zeros(cands.shape, np.float32)
    labels[:, 0] = 1.0
    return cands, rr.scores(uvec, cands), labels


class RerankData:
    """RankingData of the re-ranker: training requests at the last `positions` of every user's training
    prefix; valid/test requests at the leave-one-out valid/test position (CTR-style AUC for selection)."""

    user_dense_dim = 0
    candidate_dense_dim = 1  # the retriever's score

    def __init__(self, rr: Rerank, positions: int, negatives: int, per_batch: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        tl = rr.train_len
        urows = np.concatenate([np.full(min(positions, n - 1), u) for u, n in enumerate(tl) if n >= 2])
        t = np.concatenate([np.arange(max(1, n - positions), n) for n in tl if n >= 2])
        print(f"  re-ranker training requests: {len(urows):,} ({negatives} retrieval negatives each)", flush=True)
        self.rr, self.per_batch = rr, per_batch
        self.splits = {"train": (urows, t, *_rerank_requests(rr, urows, t, negatives, rng))}
        ok = np.flatnonzero(tl >= 1)
        for name, shift in (("valid", 0), ("test", 1)):
            tt = tl[ok] + shift
            self.splits[name] = (ok, tt, *_rerank_requests(rr, ok, tt, negatives, rng))
        self.seed = seed

    def num_train_batches(self, rank: int, world_size: int) -> int:
        return len(self.splits["train"][0]) // self.per_batch // world_size

    def _batches(self, split: str, order: np.ndarray) -> Iterator[Batch]:
        u, t, c, sc, y = self.splits[split]
        for i in range(0, len(order), self.per_batch):
            sel = order[i:i + self.per_batch]
            if split == "train" and len(sel) < self.per_batch:
                return
            yield self.rr.batch(u[sel], t[sel], c[sel], sc[sel], y[sel])

    def train_batches(self, epoch: int, rank: int, world_size: int) -> Iterator[Batch]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.splits["train"][0]))
        return self._batches("train", order[rank::world_size])

    def eval_batches(self, split: str, rank: int, world_size: int) -> Iterator[Batch]:
        for i, b in enumerate(self._batches(split, np.arange(len(self.splits[split][0])))):
            if i % world_size == rank:
                yield b


def _train_rerank(rank: int, world: int, cfg: RankerConfig, data: Any, out: str) -> dict[str, Any]:
    from ranking.train import train_ranker

    return asdict(train_ranker(rank, world, cfg, data, out))


def run_two_stage(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    try:
        from retrieval.export import load_retriever
    except ImportError as e:
        print(f"\n[two-stage] not measured: retrieval.export cannot be imported ({e})")
        return {"measured": False, "reason": f"retrieval.export unavailable: {e}"}
    from features.reader import FeatureStore
    from features.train.metrics import topk_metrics
    from ranking.export import load_ranker

    rdir = args.retriever or args.data_dir / "retriever-ml-1m" / "export"
    if not (Path(rdir) / "manifest.json").exists():
        msg = (f"no retriever export at {rdir}: train one with `cascade train-retriever --features "
               f"{args.data_dir / 'features-ml-1m'} --config retrieval/configs/ml-1m.yaml --out "
               f"{args.data_dir / 'retriever-ml-1m'}` (or pass --retriever)")
        print(f"\n[two-stage] not measured: {msg}")
        return {"measured": False, "reason": msg}
    retriever = load_retriever(rdir)
    store = FeatureStore(args.data_dir / "features-ml-1m")
    cfg = load_config(RankerConfig, REPO / "ranking/configs/ml-1m.yaml")
    cfg = load_config(RankerConfig, REPO / "ranking/configs/ablations/full.yaml",
                      [f"train.threads={args.threads}", "model.sequence.long_len=200",
                       f"train.epochs={args.epochs or 2}", "train.log_every=50"]
                      + ([f"train.max_steps_per_epoch={args.max_steps}"] if args.max_steps else []), base=cfg)
    top = 500
    rr = Rerank(store, retriever, cap=cfg.model.sequence.history_len, top=top)
    print(f"\n[two-stage] building re-ranker requests from {rdir} (load {load1():.1f})", flush=True)
    t0 = time.perf_counter()
    data = RerankData(rr, positions=4 if args.quick else 10, negatives=15, per_batch=128, seed=0)
    build_s = time.perf_counter() - t0
    res = run_distributed(_train_rerank, 1, cfg, data, str(work / "two-stage"))[0]
    ranker = load_ranker(res["export_dir"])
    # test: every user's held-out last item; candidates = the retriever's top 500 unseen
    tl = rr.train_len
    users = np.flatnonzero(tl >= 1)
    if args.quick:
        users = users[:500]
    t = tl[users] + 1
    target = rr.tl["item_id"][rr.off[users] + t]
    top_items, top_scores, _ = rr.retrieve(users, t)  # (U, 500), best first
    ret_rank = np.where((top_items == target[:, None]).any(1), (top_items == target[:, None]).argmax(1), top + 10**6)
    pipe_rank = np.full(len(users), top + 10**6, np.int64)
    for s in range(0, len(users), 32):
        sl = slice(s, s + 32)
        b = rr.batch(users[sl], t[sl], top_items[sl], top_scores[sl], np.zeros(top_items[sl].shape, np.float32))
        p = ranker.forward(b).view(-1, top).numpy()
        order = np.argsort(-p, axis=1, kind="stable")
        hit = np.take_along_axis(top_items[sl], order, 1) == target[sl, None]
        pipe_rank[sl] = np.where(hit.any(1), hit.argmax(1), top + 10**6)
    retr = topk_metrics(ret_rank, ks=(10, 50), recall_ks=(top,))
    pipe = topk_metrics(pipe_rank, ks=(10, 50), recall_ks=(top,))
    out = {"measured": True, "retriever_export": str(rdir), "users": int(len(users)), "top": top,
           "retriever": retr, "pipeline": pipe, "ranker_test_auc_vs_retrieval_negatives": res["test"],
           "build_seconds": build_s, "ranker_train_seconds": res["train_seconds"],
           "target_met": pipe["hr@10"] > retr["hr@10"]}
    print_table(f"Two-stage on ML-1M leave-one-out ({len(users):,} users, test item ranked against the "
                f"retriever's top {top} unseen items)",
                ["system", "HR@10", "NDCG@10", "HR@50", f"recall@{top}"],
                [[name, f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}", f"{m['hr@50']:.4f}", f"{m[f'recall@{top}']:.4f}"]
                 for name, m in (("retriever alone", retr), ("retriever -> ranker", pipe))])
    return out


# ---------------------------------------------------------------------------------------------- main
def _write_partial(args: argparse.Namespace, part: dict[str, Any]) -> None:
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("partial", {}).update(part)
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="ctr,long,two_stage")
    p.add_argument("--datasets", default="ml-1m,ml-100k")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=0, help="0: the dataset config's")
    p.add_argument("--max-steps", type=int, default=0, help="cap on training steps per epoch (0: full epochs)")
    p.add_argument("--long-variants", default=",".join(LONG_VARIANTS))
    p.add_argument("--long-seeds", default="0")
    p.add_argument("--long-epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training runs (1 is far faster than 2 on a contended 2-core machine)")
    p.add_argument("--throughput-threads", default="1,2", help="thread counts of the long-sequence throughput runs")
    p.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench")
    p.add_argument("--work-dir", type=Path, default=REPO / "var" / "ranking_bench")
    p.add_argument("--quick", action="store_true", help="small, minutes-long run (smoke test of the benchmark)")
    p.add_argument("--retriever", type=Path, default=None,
                   help="retriever export for the two-stage section (default: DATA_DIR/retriever-ml-1m/export)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.variants = [v for v in args.variants.split(",") if v]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.long_variants = tuple(v for v in args.long_variants.split(",") if v)
    args.long_seeds = [int(s) for s in args.long_seeds.split(",") if s]
    args.throughput_threads = [int(t) for t in args.throughput_threads.split(",") if t]
    sections = [s for s in args.sections.split(",") if s]
    if args.quick:
        args.max_steps = args.max_steps or 20
        args.epochs = args.epochs or 1
    unknown = [d for d in args.datasets if d not in DATASETS] + [v for v in args.variants if v not in VARIANT_NAMES]
    if unknown:
        p.error(f"unknown dataset/variant {unknown}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "ranking", "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": args.threads, "load_at_start": load1()},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    t0 = time.perf_counter()
    if "ctr" in sections:
        doc["ctr"] = run_ctr(args, args.work_dir)
    if "long" in sections:
        doc["long_sequence"] = run_long(args, args.work_dir)
    if "two_stage" in sections:
        doc["two_stage"] = run_two_stage(args, args.work_dir)
    doc["seconds"] = time.perf_counter() - t0
    doc["machine"]["load_at_end"] = load1()
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=float) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
