"""`cascade demo` (what `make demo` runs): the whole system, end to end, on one machine in a few minutes.

    cascade demo                                 # ML-100K from ../shared/data if present, else synthetic
    cascade demo --source ../shared/data/ml-1m   # a bigger real dataset (longer)
    cascade demo --synthetic 300000              # a synthetic log of that many events

Steps: import the dataset -> start local Kafka (tansu) + Redis on loopback ports
-> `cascade pipeline run` v1 (Spark features, both models trained sharded: the
retriever and the full ranker, `RANKER_FULL`; gate, publish) -> a gRPC ranking server on v1 with the online state bootstrapped as of
a cutoff -> a few users' recommendations -> their later events replayed live on
Kafka -> their recommendations again -> pipeline v2 (the retriever trained longer), gated,
announced, hot-swapped by the running server -> latency sample over gRPC -> an
HTML report (training curves, evaluation tables, recommendation changes, latency
histograms) -> services stopped. Everything lives under ``--workdir`` (var/demo).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from features.datasets.common import DATASET_MANIFEST
from serving.artifacts import VERSION_MANIFEST, VERSIONS

REPO = Path(__file__).resolve().parent.parent
# The full ranker as the second stage, small (two epochs on the dataset's sizes) but complete: DARE's decoupled
# attention and representation tables, SDIM long-term interest (signatures and bucket sums kept at ingest by the
# server), a 4-expert AW-MoE with the contrastive gate loss, scoring the retriever's logit plus a learned
# correction, trained listwise on a held-out retriever's lists with the point-in-time context features and the
# item-item model's where validation keeps them (jobs/second_stage.py). Layered on the dataset's ranking config.
RANKER_FULL = ("ranking/configs/two-stage.yaml",)
RANKER_FULL_OVERRIDES = ("model.sequence.long=sdim",)


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("var/demo")
    source: Path | None = None  # a dataset in ../shared/data (None: ML-100K if present, else synthetic)
    synthetic: bool = False  # generate a synthetic log even when a real dataset is present
    synthetic_events: int = 300_000
    users_shown: int = 3
    top_k: int = 5
    latency_requests: int = 400
    keep_services: bool = False


def _say(msg: str) -> None:
    print(msg, flush=True)


def _banner(step: int, total: int, title: str) -> None:
    print(f"\n=== [{step}/{total}] {title} " + "=" * max(0, 60 - len(title)), flush=True)


def _default_source() -> Path | None:
    for base in (REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if (base / "ml-100k").is_dir():
            return base / "ml-100k"
    return None


def _dataset(cfg: DemoConfig) -> tuple[Path, str]:
    from features.datasets import import_dataset

    src = None if cfg.synthetic else (cfg.source if cfg.source is not None else _default_source())
    if src is not None:
        out = cfg.workdir / "data" / src.name
        if not (out / DATASET_MANIFEST).is_file():
            import_dataset(src, out, overwrite=True)
        return out, f"{src.name} (real, from {src})"
    from tqdm import tqdm

    from features.datasets.synthetic import SynthConfig, generate

    out = cfg.workdir / "data" / f"synth-{cfg.synthetic_events}"
    if not (out / DATASET_MANIFEST).is_file():
        with tqdm(total=cfg.synthetic_events, unit="ev", unit_scale=True, desc="synth") as bar:
            generate(SynthConfig(events=cfg.synthetic_events, seed=0), out, overwrite=True,
                     progress=lambda done, total: bar.update(done - bar.n))
    why = "--synthetic" if cfg.synthetic else "no ../shared/data/ml-100k found"
    return out, f"synthetic, {cfg.synthetic_events:,} events ({why})"


def _configs(dataset: Path) -> tuple[str, str]:
    name = json.loads((dataset / DATASET_MANIFEST).read_text()).get("dataset", "")
    if name in ("ml-1m",):
        return "retrieval/configs/ml-1m.yaml", "ranking/configs/ml-1m.yaml"
    return "retrieval/configs/ml-100k.yaml", "ranking/configs/ml-100k.yaml"


def _cutoff_and_users(dataset: Path, n_users: int) -> tuple[int, list[int], dict[int, int], list[int]]:
    """A cutoff near the end of the log, and the users with the most events after it (to replay live)."""
    import numpy as np

    from features.datasets.common import read_table

    t = read_table(dataset, "events", ["user_id", "ts_ms"])
    ts = t.column("ts_ms").to_numpy()
    users = t.column("user_id").to_numpy()
    cutoff = int(np.quantile(ts, 0.98))
    after = users[ts >= cutoff]
    before = set(users[ts < cutoff].tolist())
    ids, counts = np.unique(after, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    chosen = [int(u) for u in ids[order] if int(u) in before][:n_users]
    sample = sorted(before)[:500]  # users with state, for the latency sample
    return cutoff, chosen, {int(u): int(c) for u, c in zip(ids, counts) if int(u) in chosen}, sample


def _recs(stub: Any, user: int, k: int, titles: dict[int, str]) -> dict[str, Any]:
    from serving.proto import ranking_pb2

    r = stub.Rank(ranking_pb2.RankRequest(user_id=user, k=k, exclude_seen=True), timeout=10)
    return {"model": r.model_version, "history": r.history_length,
            "items": [(it.item_id, round(it.score, 4), titles.get(it.item_id, "")[:48]) for it in r.items]}


def _print_recs(user: int, rec: dict[str, Any], label: str) -> None:
    print(f"  user {user:<6} {label:<7} model {rec['model']:<4} history {rec['history']:>4}   "
          + " | ".join(f"{t or i}" for i, _, t in rec["items"]))


def _latency(stub: Any, users: list[int], n: int) -> dict[str, list[float]]:
    import numpy as np
    from tqdm import tqdm

    from serving.proto import ranking_pb2

    rng = np.random.default_rng(0)
    out: dict[str, list[float]] = {"client round trip": []}
    for u in tqdm(rng.choice(users, size=n), desc="latency", unit="req", leave=False):
        t0 = time.perf_counter()
        r = stub.Rank(ranking_pb2.RankRequest(user_id=int(u), k=10, debug=True), timeout=10)
        out["client round trip"].append((time.perf_counter() - t0) * 1000)
        for t in r.timings:  # every server stage (state_read, user_tower, ann, ..., total)
            out.setdefault({"total": "server total"}.get(t.stage, t.stage), []).append(t.seconds * 1000)
    return out


def run_demo(cfg: DemoConfig) -> int:
    import grpc
    import numpy as np

    from jobs.html_report import HtmlReport, latency_histogram_png
    from jobs.pipeline import FeaturesStage, PipelineConfig, PublishConfig, TrainStage, read_published, run_pipeline
    from jobs.services import LocalServices, create_topics
    from serving.app import ServingApp, load_serving_config
    from serving.bootstrap import bootstrap_dataset
    from serving.catalog import load_catalog
    from serving.proto import ranking_pb2_grpc
    from serving.replay import ReplayConfig, replay_events

    t_start = time.perf_counter()
    total = 8
    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    art = work / "artifacts"
    if art.exists():  # every demo run starts from nothing published (the data import is kept)
        shutil.rmtree(art)
    report = HtmlReport("Cascade demo")

    _banner(1, total, "dataset")
    dataset, what = _dataset(cfg)
    man = json.loads((dataset / DATASET_MANIFEST).read_text())
    rows = {k: v.get("rows") for k, v in man.get("tables", {}).items()}
    _say(f"dataset      {dataset}: {what}; rows {rows}")
    report.section("Dataset", text=f"{dataset} — {what}", table=[{"table": k, "rows": v} for k, v in rows.items()])

    _banner(2, total, "local Kafka (tansu) + Redis on loopback")
    with LocalServices(work / "services") as svc:
        _say(f"kafka        {svc.kafka.address}\nredis        {svc.redis.address}")
        models_topic = "cascade.models"
        create_topics(svc.kafka.address, {"cascade.events": 2, "cascade.items": 1, models_topic: 1,
                                          "cascade.dead-letter": 1})
        rconf, kconf = _configs(dataset)
        base = PipelineConfig(
            dataset=str(dataset), artifacts=str(art),
            features=FeaturesStage(spark_master="local[2]", overrides=("spark.shuffle_partitions=4",)),
            retriever=TrainStage(configs=(rconf,), overrides=("train.epochs=3",)),
            ranker=TrainStage(configs=(kconf, *RANKER_FULL), overrides=(*RANKER_FULL_OVERRIDES, "train.epochs=2")),
            publish=PublishConfig(kafka_bootstrap=svc.kafka.address, models_topic=models_topic))

        _banner(3, total, "pipeline v1: Spark features -> retriever -> ranker -> gate -> publish")
        v1 = run_pipeline(base, "v1", _say)
        if not v1.published:
            raise RuntimeError(f"v1 was not published: {v1.reasons}")
        fdir = json.loads((art / VERSIONS / "v1" / VERSION_MANIFEST).read_text())["stages"]["features"]["dir"]

        logging.getLogger().setLevel(logging.WARNING)  # the training ranks set INFO: the demo's own lines say it
        _banner(4, total, "gRPC ranking server on v1")
        cutoff, users, live, sample = _cutoff_and_users(dataset, cfg.users_shown)
        catalog = load_catalog(dataset)
        titles = dict(zip(catalog.item_ids.tolist(), catalog.titles))
        scfg = load_serving_config(None, [
            f"redis.url={svc.redis.address}", f"kafka.bootstrap={svc.kafka.address}",
            "grpc.address=127.0.0.1:0", "metrics.address=127.0.0.1:0",
            f"models.initial_bundle={read_published(art)['bundle']}",
            f"models.allowed_roots={json.dumps([str(art)])}"], env={})  # bundles only from what the pipeline published
        app = ServingApp(scfg, catalog)
        s = bootstrap_dataset(app.store, dataset, scfg.state, catalog, as_of_ms=cutoff, progress=lambda m: None)
        _say(f"bootstrap    {s.users:,} users' sequences and counters as of {time.strftime('%Y-%m-%d', time.gmtime(cutoff / 1000))} "
             f"({s.events:,} events, {s.seconds:.1f}s)")
        app.start(wait_for_partitions_s=15.0)
        a = app.addresses
        _say(f"serving      cascade.v1.Ranking on {a.grpc}   metrics http://{a.metrics}/metrics")
        ranker_line = _ranker_summary(Path(read_published(art)["bundle"]))
        _say(f"ranker       {ranker_line}")
        report.section("Served ranker (v1)", text=ranker_line)
        channel = grpc.insecure_channel(a.grpc)
        stub = ranking_pb2_grpc.RankingStub(channel)
        try:
            _banner(5, total, f"recommendations, then {sum(live.values())} live events on Kafka")
            before = {u: _recs(stub, u, cfg.top_k, titles) for u in users}
            for u in users:
                _print_recs(u, before[u], "before")
            res = replay_events(dataset, svc.kafka.address,
                                ReplayConfig(rate=200, users=tuple(users), since_ms=cutoff, fresh_ts=True,
                                             id_prefix="demo-"))
            _say(f"replayed     {res.sent} events of users {users} in {res.seconds:.1f}s")
            deadline = time.monotonic() + 30
            after = {}
            while time.monotonic() < deadline:
                after = {u: _recs(stub, u, cfg.top_k, titles) for u in users}
                if all(after[u]["history"] >= before[u]["history"] + live[u] for u in users):
                    break
                time.sleep(0.2)
            changed = 0
            for u in users:
                _print_recs(u, after[u], "after")
                changed += [i for i, _, _ in after[u]["items"]] != [i for i, _, _ in before[u]["items"]]
            _say(f"changed      {changed} of {len(users)} users' top-{cfg.top_k} after their live events")
            report.section(
                "Recommendations before and after live events",
                text=f"Online state bootstrapped as of the 98th percentile of event time; the users' later events "
                     f"were then replayed on Kafka (the server consumed them into Redis). {changed} of {len(users)} "
                     f"top-{cfg.top_k} lists changed.",
                table=[{"user": u, "when": w, "model": r["model"], "history": r["history"],
                        "top items": " | ".join(t or str(i) for i, _, t in r["items"])}
                       for u in users for w, r in (("before", before[u]), ("after", after[u]))])

            _banner(6, total, "pipeline v2 (retriever trained longer) -> gate -> hot swap")
            v2cfg = dataclasses.replace(base, features=FeaturesStage(dir=fdir),
                                        retriever=TrainStage(configs=(rconf,), overrides=("train.epochs=8",)))
            v2 = run_pipeline(v2cfg, "v2", _say)
            if v2.published:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and _recs(stub, users[0], 1, titles)["model"] != "v2":
                    time.sleep(0.2)
            now = _recs(stub, users[0], cfg.top_k, titles)
            _say(f"server       now serves {now['model']} "
                 f"({'hot-swapped without a restart' if now['model'] == 'v2' else 'kept v1: the gate refused v2'})")
            _say("\n--- v3: a deliberately worse ranker (2 training steps); the gate must refuse it")
            v3cfg = dataclasses.replace(v2cfg, ranker=TrainStage(configs=(kconf, *RANKER_FULL), overrides=(
                *RANKER_FULL_OVERRIDES, "train.epochs=1", "train.max_steps_per_epoch=2")))
            v3 = run_pipeline(v3cfg, "v3", _say)
            _say(f"server       still serves {_recs(stub, users[0], 1, titles)['model']} "
                 f"(v3 {'published?!' if v3.published else 'refused, never announced'})")

            _banner(7, total, f"latency: {cfg.latency_requests} gRPC requests")
            lat = _latency(stub, sample, cfg.latency_requests)
            for k, v in lat.items():
                if v:
                    _say(f"  {k:<18} p50 {np.percentile(v, 50):6.2f} ms   p99 {np.percentile(v, 99):6.2f} ms")
            main = ("client round trip", "server total", "user_tower", "ranker", "ann")
            png = latency_histogram_png({k: lat[k] for k in main if k in lat}, work / "report" / "latency.png",
                                        "Rank latency (this machine)")
            stage_rows = [{"stage": k, "p50 ms": float(np.percentile(v, 50)), "p99 ms": float(np.percentile(v, 99))}
                          for k, v in lat.items() if v]
            metrics_text = _scrape(a.metrics)
        finally:
            channel.close()
            app.stop(grace_s=1.0)

    _banner(8, total, "report")
    for v in ("v1", "v2", "v3"):
        vdir = art / "versions" / v
        ev = json.loads((vdir / "evaluation.json").read_text())
        # the retriever alone (test split; valid lists) beside the cascade on the same valid lists
        rows_ev = [{"model": m, "which": w, **{k: x for k, x in ev[w][m].items() if k != "positive_rate"}}
                   for m in ("retriever", "ranker", "retriever_valid", "two_stage") for w in ("candidate", "published")
                   if ev.get(w) and m in ev[w]]
        report.section(f"Pipeline {v}: evaluation gate ({'passed' if ev['passed'] else 'REFUSED'})",
                       text="; ".join(ev["reasons"]), table=rows_ev)
        report.section(f"Pipeline {v}: training curves",
                       images=[p for p in (vdir / "retriever" / "curves.png", vdir / "ranker" / "curves.png")
                               if p.exists()])
    from features import layout

    freport = Path(fdir) / layout.REPORT / "validation.png"
    if freport.exists():
        report.section("Features: validation report", images=[freport])
    report.section("Latency over gRPC (loopback, this machine)", table=stage_rows, images=[png])
    if metrics_text:
        report.section("Prometheus metrics at the end (excerpt)", pre=metrics_text)
    out = report.write(work / "report" / "index.html")
    secs = time.perf_counter() - t_start
    print()
    print(f"demo done in {secs / 60:.1f} min")
    print(f"report       {out}")
    print(f"artifacts    {art}   (published: {read_published(art)['version']}; `cascade pipeline status --artifacts {art}`)")
    print(f"features     {fdir}   (validation report in {layout.REPORT}/)")
    print("metrics      the server exported Prometheus metrics while it ran (excerpt in the report); "
          "`cascade serve` exposes them on metrics.address")
    print("services     stopped (Kafka, Redis); `cascade services up` starts long-lived ones")
    return 0


def _ranker_summary(bundle: Path) -> str:
    """What the served ranker is made of, from its export's config.json."""
    config = json.loads((bundle / "ranker" / "config.json").read_text())
    m = config["model"]
    e, s, moe = m["embedding"], m["sequence"], m["moe"]
    reads = " and ".join(name for name, part in (("point-in-time context", "context"), ("item-item", "item_item"))
                         if config.get(part))
    stage = ("second stage: the retriever's logit + a learned correction over its list"
             f"{f', with {reads} features' if reads else ''}; " if m.get("residual_column", -1) >= 0 else "")
    return (f"{stage}{'DARE decoupled attention/representation tables' if e['decoupled'] else 'coupled tables'}; "
            f"short-term target attention over {s['short_len']}; long-term {s['long']} over {s['long_len']}; "
            f"AW-MoE with {moe['num_experts']} expert(s) {list(moe['expert_hidden'])}")


def _scrape(address: str) -> str:
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    except OSError as e:
        return f"(could not scrape http://{address}/metrics: {e})"
    keep = [ln for ln in text.splitlines() if ln.startswith("cascade_") and "_bucket" not in ln]
    return "\n".join(keep[:60])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the end-to-end demo (what `make demo` runs)")
    p.add_argument("--workdir", type=Path, default=Path("var/demo"), help="data, artifacts, report, service state")
    p.add_argument("--source", type=Path, default=None,
                   help="dataset to import (default: ../shared/data/ml-100k if present, else synthetic)")
    p.add_argument("--synthetic", type=int, default=0, metavar="EVENTS",
                   help="use a synthetic log of this many events instead of a real dataset")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    return run_demo(DemoConfig(workdir=args.workdir, source=args.source, synthetic=bool(args.synthetic),
                               synthetic_events=args.synthetic or DemoConfig.synthetic_events))
