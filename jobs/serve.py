"""`cascade serve | query | events replay | serving ...`: the ranking server, its client, load and demo tools.

    cascade services up                                   # local Kafka + Redis (prints their addresses)
    cascade pipeline run dataset=data/ml-100k artifacts=artifacts/models   # -> artifacts/models/versions/<date>/bundle
    cascade serve --set redis.url=redis://127.0.0.1:6390/0 --set kafka.bootstrap=127.0.0.1:9093 \\
        --set 'models.allowed_roots=[artifacts/models]' --model-bundle artifacts/models/v1 \\
        --catalog data/ml-100k --bootstrap data/ml-100k        # or --dev: bundles from any directory
    cascade query --user 1 --k 10 --debug
    cascade events replay --dataset data/ml-100k --rate 2000 --users 1,2,3 --fresh-ts
    cascade serving announce --bundle artifacts/models/v2        # hot swap through the models topic

`cascade serve --config serving.yaml` reads a YAML `serving.config.ServingConfig`;
``--set key.sub=value`` and the environment (CASCADE_REDIS_URL,
CASCADE_KAFKA_BOOTSTRAP, CASCADE_GRPC_ADDRESS, CASCADE_METRICS_ADDRESS,
CASCADE_MODEL_BUNDLE; secrets: CASCADE_REDIS_PASSWORD, CASCADE_REDIS_USERNAME,
CASCADE_KAFKA_SASL_USERNAME, CASCADE_KAFKA_SASL_PASSWORD) override it. SIGTERM drains in-flight requests and stops
the consumers after their last commit.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC ranking server (Kafka -> Redis online state, hot-swapped models)")
    p.add_argument("--config", type=Path, default=None, help="serving YAML (serving.config.ServingConfig)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set grpc.address=127.0.0.1:50051 (repeatable)")
    p.add_argument("--model-bundle", type=Path, default=None, help="bundle directory to serve at start")
    p.add_argument("--catalog", type=Path, default=None, help="canonical dataset directory whose items/ to serve")
    p.add_argument("--bootstrap", type=Path, default=None,
                   help="load the online state (sequences, counters, popularity) from this canonical dataset first, "
                        "unless Redis already holds one (a restart; --fresh reloads)")
    p.add_argument("--as-of", type=int, default=None, help="bootstrap: only events before this Unix ms")
    p.add_argument("--fresh", action="store_true", help="bootstrap: delete the key prefix's existing state first")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (secrets masked) and exit")
    p.add_argument("--dev", action="store_true",
                   help="local development: accept model bundles from any directory (models.allow_any_root=true) "
                        "instead of only under models.allowed_roots")
    p.set_defaults(func=run_serve)

    q = sub.add_parser("query", help="ask a running server for a user's top-k (prints a table)")
    q.add_argument("--user", type=int, required=True)
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--num-candidates", type=int, default=0, help="0: the server default")
    q.add_argument("--exclude-seen", action="store_true")
    q.add_argument("--debug", action="store_true", help="show per-stage timings")
    q.add_argument("--as-of", type=int, default=0, help="answer as of this Unix ms (0 = now)")
    q.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--address", default="127.0.0.1:50051")
    q.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    q.add_argument("--catalog", type=Path, default=None, help="dataset directory, to print item titles")
    q.add_argument("--json", action="store_true", help="print the response as JSON")
    q.set_defaults(func=run_query)

    e = sub.add_parser("events", help="produce events to Kafka")
    esub = e.add_subparsers(dest="events_command", metavar="SUBCOMMAND", required=True)
    r = esub.add_parser("replay", help="replay a canonical events dataset into the events topic at a rate")
    r.add_argument("--dataset", type=Path, required=True, help="canonical dataset directory (events/)")
    r.add_argument("--rate", type=float, default=1000.0, help="events per second (0 = as fast as possible)")
    r.add_argument("--users", default=None, help="comma-separated user ids to replay (default: all)")
    r.add_argument("--limit", type=int, default=0, help="stop after this many events (0 = all)")
    r.add_argument("--fresh-ts", action="store_true", help="stamp events with the current time (order kept)")
    r.add_argument("--id-prefix", default="", help="prefix for event ids (a replay with a new prefix is new events)")
    r.add_argument("--kafka", default="127.0.0.1:9092", help="bootstrap servers (or CASCADE_KAFKA_BOOTSTRAP)")
    r.add_argument("--topic", default=None, help="default: cascade.events")
    r.set_defaults(func=run_replay)

    s = sub.add_parser("serving", help="serving utilities: model announcements")
    ssub = s.add_subparsers(dest="serving_command", metavar="SUBCOMMAND", required=True)
    an = ssub.add_parser("announce", help="announce a model bundle on the models topic (servers validate and swap)")
    an.add_argument("--bundle", type=Path, required=True)
    an.add_argument("--kafka", default="127.0.0.1:9092")
    an.add_argument("--topic", default=None, help="default: cascade.models")
    an.set_defaults(func=run_announce)


def _kafka(arg: str) -> str:
    import os

    return os.environ.get("CASCADE_KAFKA_BOOTSTRAP") if arg == "127.0.0.1:9092" and os.environ.get("CASCADE_KAFKA_BOOTSTRAP") else arg


def run_serve(args: argparse.Namespace) -> int:
    from features.config import dump_config
    from serving.app import ServingApp, load_serving_config

    overrides = list(args.overrides)
    if args.model_bundle:
        overrides.append(f"models.initial_bundle={args.model_bundle}")
    if args.catalog:
        overrides.append(f"catalog={args.catalog}")
    if args.dev:
        overrides.append("models.allow_any_root=true")
    cfg = load_serving_config(args.config, overrides)
    if args.print_config:
        from serving.security import redacted

        print(dump_config(redacted(cfg)), end="")
        return 0
    app = ServingApp(cfg)
    if args.bootstrap:
        from serving.bootstrap import bootstrap_dataset

        if args.fresh:
            print(f"deleted {app.store.flush_prefix():,} keys under {cfg.redis.key_prefix}:*")
        epoch = app.store.get_epoch()
        if epoch is not None:  # a restart: reloading would overwrite what the stream applied since (events lost)
            print(f"bootstrap    skipped: the online state under {cfg.redis.key_prefix} exists (epoch {epoch}); "
                  "--fresh deletes and reloads it")
        else:
            s = bootstrap_dataset(app.store, args.bootstrap, cfg.state, app.catalog.current, args.as_of,
                                  progress=print)
            print(f"bootstrap    {s.users:,} users, {s.items_with_counters:,} items, {s.events:,} events "
                  f"({s.duplicates:,} duplicate ids skipped), as of {s.as_of_ms}, {s.seconds:.1f}s")
    from serving.app import serve

    def started(app: ServingApp) -> None:
        a = app.addresses
        extra = f"   ({cfg.grpc.processes} processes share the port)" if cfg.grpc.processes > 1 else ""
        print(f"serving      cascade.v1.Ranking on {a.grpc}   metrics http://{a.metrics}/metrics   "
              f"model {app.models.current.version if app.models.current else 'none (waiting for the models topic)'}"
              + extra, flush=True)

    return serve(cfg, app, started)


def run_query(args: argparse.Namespace) -> int:
    import grpc

    from serving.proto import ranking_pb2, ranking_pb2_grpc

    ctx = {}
    for kv in args.context:
        if "=" not in kv:
            raise ValueError(f"--context {kv!r} must look like key=value")
        k, v = kv.split("=", 1)
        ctx[k] = v
    req = ranking_pb2.RankRequest(user_id=args.user, k=args.k, num_candidates=args.num_candidates, context=ctx,
                                  exclude_seen=args.exclude_seen, debug=args.debug, as_of_ms=args.as_of)
    with grpc.insecure_channel(args.address) as ch:
        try:
            t0 = time.perf_counter()
            resp = ranking_pb2_grpc.RankingStub(ch).Rank(req, timeout=args.timeout)
            rtt = time.perf_counter() - t0
        except grpc.RpcError as e:
            print(f"cascade query: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(resp), indent=2))
        return 0
    titles = {}
    if args.catalog:
        from serving.catalog import load_catalog

        cat = load_catalog(args.catalog)
        titles = dict(zip(cat.item_ids.tolist(), cat.titles))
    print(f"user {args.user}   model {resp.model_version}   history {resp.history_length}   "
          f"candidates {resp.candidates_considered}   {rtt * 1000:.1f} ms"
          + (f"   FALLBACK: {resp.fallback_reason}" if resp.fallback_reason else ""))
    print(f"{'rank':>4}  {'item_id':>10}  {'score':>7}  {'retrieval':>9}  title")
    for i, it in enumerate(resp.items, 1):
        print(f"{i:>4}  {it.item_id:>10}  {it.score:>7.4f}  {it.retrieval_score:>9.4f}  {titles.get(it.item_id, '')[:60]}")
    if args.debug:
        print("stage timings: " + "  ".join(f"{t.stage} {t.seconds * 1000:.2f}ms" for t in resp.timings))
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from features.messages import KafkaTopics
    from serving.replay import ReplayConfig, replay_events

    users = tuple(int(u) for u in args.users.split(",")) if args.users else ()
    cfg = ReplayConfig(rate=args.rate, users=users, limit=args.limit, fresh_ts=args.fresh_ts, id_prefix=args.id_prefix,
                       topic=args.topic or KafkaTopics().events)
    bar = tqdm(unit="ev", unit_scale=True, desc="replay")
    res = replay_events(args.dataset, _kafka(args.kafka), cfg, progress=lambda n, total: (
        setattr(bar, "total", total), bar.update(n - bar.n)))
    bar.close()
    print(f"replayed     {res.sent:,} events for {res.users:,} users to {cfg.topic} in {res.seconds:.1f}s "
          f"({res.sent / max(res.seconds, 1e-9):,.0f} events/s, target {args.rate:g}/s)")
    return 0


def run_announce(args: argparse.Namespace) -> int:
    from features.messages import KafkaTopics
    from serving.models import announce_bundle

    topic = args.topic or KafkaTopics().models
    ann = announce_bundle(args.bundle, _kafka(args.kafka), topic)
    print(f"announced    {ann.version} ({ann.uri}, sha256 {ann.checksum}) on {topic}")
    return 0
