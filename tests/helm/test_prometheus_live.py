"""The dashboards and alerts on live series: a real `prometheus` scrapes a real running Cascade server.

The scenario drives what the panels show: Rank calls (answered, and one refused as INVALID_ARGUMENT), a
degraded answer (a user with no history), events on Kafka (applied, freshness, one redelivered), a malformed
event (a dead letter), a new item and a rejected one, a rejected model announcement and a model swap.
Prometheus (the Debian package, the same one `make sysdeps` installs for promtool) scrapes the server's
/metrics every second with the labels the chart's ServiceMonitor gives the series (namespace, service,
pod), and loads the chart's rendered alert rules. Then every query of every dashboard
(helm/cascade/dashboards/*.json, Grafana's variables substituted) and every alert expression is evaluated
through the HTTP API: each must be accepted, every rule must evaluate without error, and each dashboard
query whose series the scenario produced must return data. A label broken on purpose in a copy of a
dashboard is caught (an empty panel).
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.helm.test_chart_monitoring import _dashboards, _panel_queries, _selectors

pytestmark = pytest.mark.integration

NAMESPACE, SERVICE = "recsys", "cascade"  # the default alert selector of release "cascade" in "recsys"
RATE_WINDOW = "20s"  # $__rate_interval: scraped every 1 s, so every window holds ~20 samples
# Series the scenario below produces: a dashboard query over only these must return data.
SCENARIO_SERIES = {
    "cascade_rank_requests_total", "cascade_rank_stage_seconds", "cascade_rank_candidates", "cascade_ranking_score",
    "cascade_requests_in_flight", "cascade_requests_shed_total", "cascade_degraded_answers_total", "cascade_redis_up",
    "cascade_consumer_lag", "cascade_consumer_batch_seconds", "cascade_event_freshness_seconds",
    "cascade_events_applied_total", "cascade_events_dead_lettered_total", "cascade_model_info",
    "cascade_model_loaded_timestamp_seconds", "cascade_model_swaps_total", "cascade_index_items",
    "cascade_health_serving", "cascade_events_deduplicated_total", "cascade_items_added_total",
    "cascade_items_rejected_total", "cascade_model_rejections_total",
}


def _base_name(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def as_live_query(grafana_expr: str) -> str:
    """Grafana's variables as the dashboard's drop-downs would set them for this release."""
    return (grafana_expr.replace("$__rate_interval", RATE_WINDOW).replace("$__interval", "5s")
            .replace("$__range", "5m").replace("$namespace", NAMESPACE).replace("$service", SERVICE))


@dataclass
class Prometheus:
    url: str

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 on a query that does not parse: the JSON body says why
            body = e.read()
            try:
                return json.loads(body)
            except ValueError:  # 503 while starting
                return {"status": "error", "errorType": f"http {e.code}", "error": body.decode(errors="replace")}

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)


def check_dashboard_queries(prom: Prometheus, dashboards: dict[str, dict[str, Any]]) -> list[str]:
    """Every panel query evaluated live; returns one problem per query that fails to parse or, when all the
    series it selects are ones the scenario produced, returns no data (a wrong label, metric or matcher)."""
    problems = []
    for name, dashboard in dashboards.items():
        for expr in _panel_queries(dashboard):
            live = as_live_query(expr)
            res = prom.query(live)
            if res.get("status") != "success":
                problems.append(f"{name}: {expr!r} was refused: {res.get('errorType')}: {res.get('error')}")
                continue
            names = {_base_name(n) for n, _ in _selectors(expr)}
            if names <= SCENARIO_SERIES and not res["data"]["result"]:
                problems.append(f"{name}: {expr!r} returned no data, though the scenario produced "
                                f"{sorted(names)}")
    return problems


def _free_port() -> int:
    from jobs.services import free_port

    return free_port()


def _start_server(services, model_bundles, catalog, dataset):
    """As tests/serving/conftest.py's make_server, once for the module (the scenario is shared)."""
    import uuid

    from jobs.services import create_topics
    from serving.app import ServingApp, load_serving_config
    from serving.bootstrap import bootstrap_dataset
    from tests.serving.conftest import Harness, serving_overrides, unique_topics

    topics = unique_topics()
    create_topics(services.kafka.address, {topics.events: 2, topics.items: 1, topics.models: 1, topics.dead_letter: 1})
    prefix = f"t{uuid.uuid4().hex[:10]}"
    cfg = load_serving_config(None, serving_overrides(services, topics, prefix,
                                                      **{"models.initial_bundle": str(model_bundles["v1"][0])}), env={})
    app = ServingApp(cfg, catalog)
    bootstrap_dataset(app.store, dataset, cfg.state, catalog)
    app.start(wait_for_partitions_s=15.0)
    return Harness(app, topics, services.kafka.address)


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus not found: install it with `apt-get install prometheus` (make sysdeps does)")
    return path


@pytest.fixture(scope="module")
def rule_groups(render) -> list[dict[str, Any]]:
    # with a Pushgateway, so the pipeline's outcome alerts are evaluated too (they find no series here)
    return render({"prometheusRule": {"enabled": True}, "pipeline": {"run": {"pushgateway": "http://127.0.0.1:9091"}}}
                  ).one("PrometheusRule")["spec"]["groups"]


@pytest.fixture(scope="module")
def live(prometheus_binary, rule_groups, services, model_bundles, catalog, ml100k_dataset,
         tmp_path_factory) -> Iterator[Prometheus]:
    """A server after the scenario, scraped by a running Prometheus that has seen it all."""
    import grpc

    from features.messages import ModelAnnouncement
    from features.messages import encode_item
    from features.schema import Event, Item
    from tests.serving.conftest import _wait_until

    h = _start_server(services, model_bundles, catalog, ml100k_dataset)
    tmp = tmp_path_factory.mktemp("prometheus")
    metrics_addr = h.app.addresses.metrics
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
    (tmp / "prometheus.yaml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yaml")],
        "scrape_configs": [{"job_name": "cascade", "static_configs": [{
            "targets": [metrics_addr],
            # what the ServiceMonitor's target labels give the series in a cluster
            "labels": {"namespace": NAMESPACE, "service": SERVICE, "pod": "cascade-0", "container": "server"}}]}],
    }))
    port = _free_port()
    proc = subprocess.Popen(
        [prometheus_binary, f"--config.file={tmp / 'prometheus.yaml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"))
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        def scraped() -> bool:
            try:
                res = prom.query('up{job="cascade"} == 1')
            except OSError:
                return False
            return bool(res.get("data", {}).get("result"))

        _wait_until(scraped, timeout_s=30, what="Prometheus scraping the server")
        # the scenario
        for uid in (1, 2, 3, 4, 5) * 4:
            h.rank(uid, k=10)
        h.rank(999_999_999, k=10)  # no history: a degraded (cold start) answer
        with pytest.raises(grpc.RpcError):
            h.rank(1, k=50, num_candidates=10)  # INVALID_ARGUMENT
        now = 893_286_700_000
        events = [Event(f"live-{i}", 1, 50 + i, now + i, "click", 1.0) for i in range(5)]
        h.send_events(events)
        h.send_events(events[:1])  # a redelivery: deduplicated
        h.send_raw(h.topics.events, b"{not json", key=b"1")  # a dead letter
        h.send_raw(h.topics.items, encode_item(Item(5000, "A New Movie (2026)", ("Drama",), (), {}, {"year": 2026.0})))
        h.send_raw(h.topics.items, b'{"title": "no id"}')  # a rejected item
        path, checksum = model_bundles["v2"]
        h.send_raw(h.topics.models, ModelAnnouncement("v2", str(path), "0" * 64).encode())  # a rejected model
        h.send_raw(h.topics.models, ModelAnnouncement("v2", str(path), checksum).encode())  # a swap
        _wait_until(lambda: h.metric("cascade_events_applied_total") == 5
                    and h.metric("cascade_events_deduplicated_total") == 1
                    and h.metric("cascade_events_dead_lettered_total",
                                 {"topic": h.topics.events, "reason": "not_json"}) == 1
                    and h.metric("cascade_items_added_total") == 1
                    and h.metric("cascade_items_rejected_total", {"reason": "missing_field"}) == 1
                    and h.metric("cascade_model_rejections_total", {"reason": "checksum_mismatch"}) == 1
                    and h.rank(1, k=5).model_version == "v2", timeout_s=60, what="the scenario's effects")
        for uid in (1, 2, 3):
            h.rank(uid, k=10)
        done = time.time()

        def seen_after_scenario() -> bool:  # a scrape after it, and the rules evaluated since
            res = prom.query('timestamp(cascade_model_swaps_total{job="cascade"})')
            result = res.get("data", {}).get("result", [])
            rules = prom.api("rules").get("data", {}).get("groups", [])
            evaluated = all(r.get("lastEvaluation", "0001") > time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(done))
                            for g in rules for r in g["rules"])
            return bool(result) and float(result[0]["value"][1]) > done + 1 and bool(rules) and evaluated

        _wait_until(seen_after_scenario, timeout_s=30, what="Prometheus scraping after the scenario")
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        h.close()


def test_every_dashboard_query_parses_and_shows_the_scenario(live, chart_dir: Path) -> None:
    dashboards = _dashboards(chart_dir)
    queries = [e for d in dashboards.values() for e in _panel_queries(d)]
    needing_data = [e for e in queries if {_base_name(n) for n, _ in _selectors(e)} <= SCENARIO_SERIES]
    assert len(queries) >= 30 and len(needing_data) >= 28  # nearly every panel is checked for data
    assert check_dashboard_queries(live, dashboards) == []


def test_a_broken_label_in_a_dashboard_query_is_reported(live, chart_dir: Path) -> None:
    dashboards = copy.deepcopy(_dashboards(chart_dir))
    name = "cascade-serving.json"
    target = next(t for p in dashboards[name]["panels"] for t in p.get("targets", [])
                  if "cascade_rank_requests_total" in t.get("expr", ""))
    original = target["expr"]
    target["expr"] = original.replace('service="$service"', 'servce="$service"', 1)  # a typo in one label
    assert target["expr"] != original
    problems = check_dashboard_queries(live, dashboards)
    assert problems == [f"{name}: {target['expr']!r} returned no data, though the scenario produced "
                        f"{sorted({_base_name(n) for n, _ in _selectors(original)})}"]


def test_a_query_prometheus_refuses_is_reported(live) -> None:
    problems = check_dashboard_queries(live, {"x.json": {"panels": [{"targets": [
        {"expr": 'sum by (status) (rate(cascade_rank_requests_total{service="$service"}[$__rate_interval])'}]}]}})
    assert len(problems) == 1 and "was refused: bad_data" in problems[0]


def test_every_alert_expression_evaluates_live(live, rule_groups) -> None:
    exprs = [r["expr"] for g in rule_groups for r in g["rules"]]
    assert len(exprs) >= 10
    for expr in exprs:
        res = live.query(expr)
        assert res["status"] == "success", f"{expr!r}: {res.get('error')}"
    rules = [r for g in live.api("rules")["data"]["groups"] for r in g["rules"]]
    assert len(rules) == len(exprs)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_alert_selectors_match_the_live_series(live, rule_groups) -> None:
    """Each alert's metric selectors, on their own, find the scenario's series (the comparison may not fire)."""
    missing = []
    for g in rule_groups:
        for r in g["rules"]:
            for name, _labels in _selectors(r["expr"]):
                if _base_name(name) in SCENARIO_SERIES and not live.query(
                        f'count({name}{{namespace="{NAMESPACE}",service="{SERVICE}"}})')["data"]["result"]:
                    missing.append((r.get("alert"), name))
    assert missing == []


# the serving fixtures (real tansu + redis-server, real bundles)
from tests.serving.conftest import catalog, model_bundles, services  # noqa: E402,F401
