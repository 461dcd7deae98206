"""Writes the chart's Grafana dashboards (dashboards/*.json) with grafana-foundation-sdk.

    .venv/bin/python helm/cascade/dashboards/generate.py          # rewrite the JSON files
    .venv/bin/python helm/cascade/dashboards/generate.py --check  # exit 1 if they are out of date

The JSON is committed (the chart loads it with .Files.Get); tests/helm checks that it matches this
script, that every metric it queries is in serving.metrics.METRIC_NAMES and that every query parses.
Queries select one release with the $namespace and $service variables (the labels the ServiceMonitor
gives the server's series).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'namespace="$namespace",service="$service"'
RATE = "$__rate_interval"


def q(expr: str, legend: str = "", fmt: PromQueryFormat | None = None) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).legend_format(legend or "__auto")
    return query.format(fmt) if fmt is not None else query


def series(title: str, unit: str, *queries: prometheus.Dataquery, description: str = "", width: int = 12,
           stack: bool = False) -> timeseries.Panel:
    p = timeseries.Panel().title(title).description(description).unit(unit).datasource(DS).span(width).height(8)
    if stack:
        p = p.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(30)
    for query in queries:
        p = p.with_target(query)
    return p


def single(title: str, unit: str, expr: str, legend: str = "", description: str = "", width: int = 6) -> stat.Panel:
    return (stat.Panel().title(title).description(description).unit(unit).datasource(DS).span(width).height(5)
            .graph_mode(common.BigValueGraphMode.AREA)
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .with_target(q(expr, legend)))


def quantile(phi: float, metric: str, by: str, extra: str = "") -> str:
    matchers = f"{SEL},{extra}" if extra else SEL
    return f"histogram_quantile({phi}, sum by ({by}, le) (rate({metric}_bucket{{{matchers}}}[{RATE}])))"


def base(title: str, uid: str, description: str) -> dash.Dashboard:
    return (dash.Dashboard(title).uid(uid).description(description).tags(["cascade"]).refresh("30s")
            .time("now-3h", "now").timezone("browser").editable()
            .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
            .with_variable(dash.QueryVariable("namespace").label("Namespace").datasource(DS)
                           .query("label_values(cascade_rank_requests_total, namespace)")
                           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))
            .with_variable(dash.QueryVariable("service").label("Release").datasource(DS)
                           .query('label_values(cascade_rank_requests_total{namespace="$namespace"}, service)')
                           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)))


def serving_dashboard() -> dash.Dashboard:
    d = base("Cascade / Serving", "cascade-serving",
             "The gRPC ranking server: traffic, errors, per-stage latency, fallbacks, scores, models and Redis.")
    d = (d.with_row(dash.Row("Traffic"))
         .with_panel(series("Requests by method and status", "reqps",
                            q(f"sum by (method, status) (rate(cascade_rank_requests_total{{{SEL}}}[{RATE}]))",
                              "{{method}} {{status}}"), stack=True))
         .with_panel(series("Errors by status code", "reqps",
                            q(f'sum by (status) (rate(cascade_rank_requests_total{{{SEL},status!="OK"}}[{RATE}]))',
                              "{{status}}"),
                            description="Non-OK answers by gRPC status (RESOURCE_EXHAUSTED = shed, "
                                        "INVALID_ARGUMENT = bad requests, UNAVAILABLE = no model or Redis)."))
         .with_panel(series("Shed requests", "reqps",
                            q(f"sum(rate(cascade_requests_shed_total{{{SEL}}}[{RATE}]))", "shed"),
                            description="Rejected at once because grpc.max_in_flight calls were already accepted (running or queued).",
                            width=8))
         .with_panel(series("Requests in flight", "short",
                            q(f"sum by (pod) (cascade_requests_in_flight{{{SEL}}})", "{{pod}}"), width=8))
         .with_panel(series("Candidates ranked per request", "short",
                            q(quantile(0.5, "cascade_rank_candidates", "service"), "p50"),
                            q(quantile(0.99, "cascade_rank_candidates", "service"), "p99"), width=8)))
    d = (d.with_row(dash.Row("Latency"))
         .with_panel(series("p50 per stage", "s",
                            q(quantile(0.5, "cascade_rank_stage_seconds", "stage"), "{{stage}}")))
         .with_panel(series("p99 per stage", "s",
                            q(quantile(0.99, "cascade_rank_stage_seconds", "stage"), "{{stage}}"),
                            description='stage="total" is the whole Rank handler (the latency alert\'s series).')))
    d = (d.with_row(dash.Row("Answers"))
         .with_panel(series("Degraded answers by reason", "reqps",
                            q(f"sum by (reason) (rate(cascade_degraded_answers_total{{{SEL}}}[{RATE}]))", "{{reason}}"),
                            description="Answers not from the full pipeline: cold_start (no history), "
                                        "redis_unavailable, index_unavailable.", stack=True))
         .with_panel(heatmap.Panel().title("Ranking score distribution").datasource(DS).span(12).height(8)
                     .description("Scores of the returned items (cascade_ranking_score buckets).")
                     .calculate(False)
                     .with_target(q(f"sum by (le) (increase(cascade_ranking_score_bucket{{{SEL}}}[{RATE}]))",
                                    "{{le}}", PromQueryFormat.HEATMAP))))
    d = (d.with_row(dash.Row("Models and state"))
         .with_panel(table.Panel().title("Model version per pod").datasource(DS).span(8).height(8)
                     .with_target(q(f"max by (pod, version) (cascade_model_info{{{SEL}}})", "{{pod}} {{version}}",
                                    PromQueryFormat.TABLE).instant()))
         .with_panel(series("Model age", "s",
                            q(f"time() - cascade_model_loaded_timestamp_seconds{{{SEL}}}", "{{pod}}"),
                            description="Since the served model was swapped in (the epoch when a pod has none).",
                            width=8))
         .with_panel(single("Redis up (pods)", "short", f"sum(cascade_redis_up{{{SEL}}})", "up",
                            description="Pods whose last Redis health probe succeeded.", width=4))
         .with_panel(single("Items in the ANN index", "short", f"max(cascade_index_items{{{SEL}}})", "items",
                            width=4))
         .with_panel(series("Redis up per pod", "short", q(f"cascade_redis_up{{{SEL}}}", "{{pod}}"), width=8))
         .with_panel(series("Model swaps and rejections", "ops",
                            q(f"sum(rate(cascade_model_swaps_total{{{SEL}}}[{RATE}]))", "swapped in"),
                            q(f"sum by (reason) (rate(cascade_model_rejections_total{{{SEL}}}[{RATE}]))",
                              "rejected: {{reason}}"), width=8))
         .with_panel(series("SDIM signature recomputes", "reqps",
                            q(f"sum(rate(cascade_sdim_signature_recomputes_total{{{SEL}}}[{RATE}]))", "recomputed"),
                            description="Requests whose stored signatures came from another model.", width=8)))
    return d


def streaming_dashboard() -> dash.Dashboard:
    d = base("Cascade / Streaming", "cascade-streaming",
             "Kafka -> Redis online state: consumer lag, event freshness, applied and dead-lettered events, items.")
    d = (d.with_row(dash.Row("Consumers"))
         .with_panel(series("Consumer lag by topic", "short",
                            q(f"sum by (topic) (max by (topic, partition) (cascade_consumer_lag{{{SEL}}}))",
                              "{{topic}}"),
                            description="Messages behind the high watermark, summed over partitions."))
         .with_panel(series("Event freshness", "s",
                            q(quantile(0.5, "cascade_event_freshness_seconds", "service"), "p50"),
                            q(quantile(0.99, "cascade_event_freshness_seconds", "service"), "p99"),
                            description="Event produced (Kafka timestamp) to visible in Redis."))
         .with_panel(series("Consumer lag by partition", "short",
                            q(f"max by (topic, partition) (cascade_consumer_lag{{{SEL}}})", "{{topic}}/{{partition}}")))
         .with_panel(series("Batch apply time p99 by topic", "s",
                            q(quantile(0.99, "cascade_consumer_batch_seconds", "topic"), "{{topic}}"))))
    d = (d.with_row(dash.Row("Events"))
         .with_panel(series("Events applied, deduplicated, conflicts", "ops",
                            q(f"sum(rate(cascade_events_applied_total{{{SEL}}}[{RATE}]))", "applied"),
                            q(f"sum(rate(cascade_events_deduplicated_total{{{SEL}}}[{RATE}]))", "deduplicated"),
                            q(f"sum(rate(cascade_ingest_conflicts_total{{{SEL}}}[{RATE}]))", "conflict retries")))
         .with_panel(series("Ingest users by source", "ops",
                            q(f"sum by (source) (rate(cascade_ingest_users_total{{{SEL}}}[{RATE}]))", "{{source}}"),
                            description="Users of applied batches: read from Redis, or folded from the consumer's "
                                        "cache of its own writes (stale: changed by another writer, read again)."))
         .with_panel(series("Dead-lettered messages", "ops",
                            q(f"sum by (topic, reason) (rate(cascade_events_dead_lettered_total{{{SEL}}}[{RATE}]))",
                              "{{topic}}: {{reason}}"),
                            description="Malformed messages sent to the dead-letter topic."))
         .with_panel(series("Consumer errors, skipped records, refused commits", "ops",
                            q(f"sum by (consumer) (rate(cascade_consumer_restarts_total{{{SEL}}}[{RATE}]))",
                              "errors: {{consumer}}"),
                            q(f"sum by (topic) (rate(cascade_consumer_skipped_records_total{{{SEL}}}[{RATE}]))",
                              "skipped: {{topic}}"),
                            q(f"sum by (consumer) (rate(cascade_consumer_commit_failures_total{{{SEL}}}[{RATE}]))",
                              "refused commits: {{consumer}}"),
                            description="Unexpected consumer errors (each retried with backoff), records skipped "
                                        "after failing repeatedly at one offset (dead-lettered as consumer_error), "
                                        "and offset commits refused by a rebalance (re-read, deduplicated).")))
    d = (d.with_row(dash.Row("Items"))
         .with_panel(series("Items added and rejected", "ops",
                            q(f"sum(rate(cascade_items_added_total{{{SEL}}}[{RATE}]))", "added"),
                            q(f"sum by (reason) (rate(cascade_items_rejected_total{{{SEL}}}[{RATE}]))",
                              "rejected: {{reason}}")))
         .with_panel(series("Items in the ANN index", "short",
                            q(f"cascade_index_items{{{SEL}}}", "{{pod}}"))))
    return d


DASHBOARDS = {"cascade-serving.json": serving_dashboard, "cascade-streaming.json": streaming_dashboard}


def render(build) -> str:
    model = build().build()
    for i, panel in enumerate(model.panels, start=1):  # stable ids: links to a panel (viewPanel=N) keep working
        panel.id_val = i
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a JSON file differs from what would be written")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = HERE / name, render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
