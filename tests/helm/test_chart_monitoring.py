"""Alert rules and dashboards query only what the server exports, parse as PromQL, and the alerts fire."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

# Labels the Prometheus Operator puts on every scraped series (and `le` on histogram buckets).
TARGET_LABELS = {"namespace", "service", "pod", "instance", "job", "container", "endpoint"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def _label_names(metrics) -> dict[str, set[str]]:
    """ServingMetrics attribute collectors -> label names (prometheus_client keeps them on the collector)."""
    out = {}
    for collector in vars(metrics).values():
        name = getattr(collector, "_name", None)
        if name is not None:
            out[name] = set(collector._labelnames)
    return out


# kube-state-metrics' series of Jobs that the pipeline Job alert reads (labels per its docs/metrics/workload/job.md).
KUBE_JOB_SERIES = {name: {"namespace", "job_name"} for name in (
    "kube_job_status_failed", "kube_job_status_active", "kube_job_status_succeeded", "kube_job_status_start_time")}


def _pipeline_series() -> dict[str, set[str]]:
    """What `cascade pipeline run` pushes (jobs/pipeline.py) -> its labels; job and namespace are the group's."""
    from jobs.pipeline import PIPELINE_METRIC_NAMES, outcome_registry

    series = {s.name: set(s.labels) for family in outcome_registry("published", 0.0, 1.0).collect()
              for s in family.samples}
    assert set(series) == set(PIPELINE_METRIC_NAMES)
    return series


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every series name the server exposes, the pipeline pushes, or kube-state-metrics gives a Job -> its labels."""
    from serving.metrics import METRIC_NAMES, ServingMetrics

    metrics = ServingMetrics()
    labels = _label_names(metrics)
    series: dict[str, set[str]] = {**_pipeline_series(), **KUBE_JOB_SERIES}
    for family in metrics.registry.collect():
        base = family.name + "_total" if family.type == "counter" else family.name
        assert base in METRIC_NAMES, f"{base} is registered but not in METRIC_NAMES"
        own = labels[family.name]
        if family.type == "histogram":
            series.update({family.name + "_bucket": own | {"le"}, family.name + "_sum": own,
                           family.name + "_count": own})
        else:
            series[base] = own
    assert {n.removesuffix("_bucket") for n in series if n.endswith("_bucket")} <= set(METRIC_NAMES)
    return series


def _selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names in its matchers) for every vector selector of a PromQL expression."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations, e.g. [5m] or [$__rate_interval]
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = m.groups()
        if call or name.lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or an operator keyword
        labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers or ""))
        yield name, labels


def _check_queries(exprs: list[str], exported: dict[str, set[str]]) -> None:
    used = set()
    for expr in exprs:
        for name, labels in _selectors(expr):
            assert name in exported, f"{name} (in {expr!r}) is not a series the server exports"
            unknown = labels - exported[name] - TARGET_LABELS
            assert not unknown, f"{name} has no label(s) {sorted(unknown)} (in {expr!r})"
            used.add(name)
    assert used


def _rule_groups(docs) -> list[dict[str, Any]]:
    return docs.one("PrometheusRule")["spec"]["groups"]


@pytest.fixture(scope="module")
def default_rules(render) -> list[dict[str, Any]]:
    """The rule groups with every threshold at its values.yaml default."""
    return _rule_groups(render({"prometheusRule": {"enabled": True}}))


def _dashboards(chart_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((chart_dir / "dashboards").glob("*.json"))}


def _panel_queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]


def _as_rule_expr(grafana_expr: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts."""
    return (grafana_expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("$namespace", "recsys").replace("$service", "cascade"))


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------------ names
def test_selector_parser_finds_names_and_labels() -> None:
    expr = ('sum by (topic) (max by (topic, partition) (cascade_consumer_lag{namespace="a",topic!~"x|y"}))'
            ' / on (topic) sum(rate(cascade_events_applied_total[$__rate_interval])) > bool 3')
    assert list(_selectors(expr)) == [("cascade_consumer_lag", {"namespace", "topic"}),
                                      ("cascade_events_applied_total", set())]


def test_alert_rules_use_exported_metrics_and_labels(scenarios, exported) -> None:
    exprs = [r["expr"] for g in _rule_groups(scenarios["full"]) for r in g["rules"]]
    _check_queries(exprs, exported)


def test_dashboards_use_exported_metrics_and_labels(chart_dir: Path, exported) -> None:
    for name, dashboard in _dashboards(chart_dir).items():
        _check_queries(_panel_queries(dashboard), exported)
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                _check_queries([var["query"].removeprefix("label_values(").rsplit(",", 1)[0]], exported)


def test_dashboards_cover_the_servers_signals(chart_dir: Path) -> None:
    text = " ".join(q for d in _dashboards(chart_dir).values() for q in _panel_queries(d))
    for series in ("cascade_rank_requests_total", "cascade_rank_stage_seconds_bucket", "cascade_consumer_lag",
                   "cascade_event_freshness_seconds_bucket", "cascade_events_applied_total",
                   "cascade_events_dead_lettered_total", "cascade_model_info", "cascade_model_loaded_timestamp_seconds",
                   "cascade_degraded_answers_total", "cascade_ranking_score_bucket", "cascade_requests_shed_total",
                   "cascade_redis_up"):
        assert series in text, series


def test_dashboard_json_is_what_generate_py_writes(chart_dir: Path) -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is a dev dependency")
    run = subprocess.run([sys.executable, str(chart_dir / "dashboards" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_dashboards_are_well_formed(chart_dir: Path) -> None:
    for name, d in _dashboards(chart_dir).items():
        assert d["uid"] == name.removesuffix(".json") and d["title"].startswith("Cascade / ")
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert p["targets"], p["title"]
        heatmaps = [p for p in d["panels"] if p["type"] == "heatmap"]
        for p in heatmaps:
            assert p["targets"][0]["format"] == "heatmap"


# ---------------------------------------------------------------------------------------------- promtool
@pytest.mark.parametrize(("which", "count"), [("defaults", 11), ("full", 13)])  # full: with a Pushgateway
def test_promtool_accepts_the_rules(scenarios, default_rules, which: str, count: int, promtool: str,
                                    tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    groups = default_rules if which == "defaults" else _rule_groups(scenarios["full"])
    path.write_text(yaml.safe_dump({"groups": groups}))
    run = _promtool(promtool, "check", "rules", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {count} rules found" in run.stdout


def test_promtool_parses_every_dashboard_query(chart_dir: Path, promtool: str, tmp_path: Path) -> None:
    rules = [{"record": f"cascade:dashboard_query:{i}", "expr": _as_rule_expr(expr)}
             for i, expr in enumerate(q for d in _dashboards(chart_dir).values() for q in _panel_queries(d))]
    path = tmp_path / "dashboard_queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    run = _promtool(promtool, "check", "rules", str(path))
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_check_catches_a_broken_query(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "x:y", "expr": "sum(rate(cascade_rank_requests_total[5m])"}]}]}))
    assert _promtool(promtool, "check", "rules", str(path)).returncode != 0


SERIES = 'namespace="recsys",service="cascade-metrics",pod="cascade-0"'  # scraped through the metrics Service


def _alert_tests() -> list[dict[str, Any]]:
    """promtool unit tests against the default values' thresholds (one sample a minute from t=0)."""
    def alert(name: str, at: str, labels: dict[str, str] | None, annotations: dict[str, str] | None = None):
        expected = {"exp_labels": labels} | ({"exp_annotations": annotations} if annotations else {})
        return {"eval_time": at, "alertname": name, "exp_alerts": [expected] if labels is not None else []}

    release = {"namespace": "recsys", "service": "cascade-metrics"}
    return [
        {"interval": "1m", "input_series": [
            # events: 150k behind on one partition, 10 on the other, for 30 minutes (threshold 100k for 10m)
            {"series": f'cascade_consumer_lag{{{SERIES},topic="cascade.events",partition="0"}}',
             "values": "150000x30"},
            {"series": f'cascade_consumer_lag{{{SERIES},topic="cascade.events",partition="1"}}', "values": "10x30"},
            {"series": f'cascade_consumer_lag{{{SERIES},topic="cascade.items",partition="0"}}', "values": "0x30"},
        ], "alert_rule_test": [
            alert("CascadeConsumerLagHigh", "5m", None),  # not yet: `for: 10m`
            alert("CascadeConsumerLagHigh", "15m", release | {"severity": "warning", "topic": "cascade.events"}, {
                "summary": "Cascade consumers are falling behind on cascade.events",
                "description": "The servers of recsys/cascade-metrics are 150k messages behind on cascade.events."}),
        ]},
        {"interval": "1m", "input_series": [
            # 100 Rank calls a minute; 90% take 50-100 ms: p99 ~ 99 ms > the 50 ms budget
            {"series": f'cascade_rank_stage_seconds_bucket{{{SERIES},stage="total",le="0.05"}}',
             "values": "0+10x30"},
            {"series": f'cascade_rank_stage_seconds_bucket{{{SERIES},stage="total",le="0.1"}}',
             "values": "0+100x30"},
            {"series": f'cascade_rank_stage_seconds_bucket{{{SERIES},stage="total",le="+Inf"}}',
             "values": "0+100x30"},
            {"series": f'cascade_rank_stage_seconds_bucket{{{SERIES},stage="ann",le="+Inf"}}',
             "values": "0+100x30"},
        ], "alert_rule_test": [
            alert("CascadeRankLatencyHigh", "20m", release | {"severity": "warning"}),
        ]},
        {"interval": "1m", "input_series": [
            # 5% INTERNAL (threshold 1%), and 10% RESOURCE_EXHAUSTED, which is shedding, not an error
            {"series": f'cascade_rank_requests_total{{{SERIES},method="Rank",status="OK"}}', "values": "0+85x30"},
            {"series": f'cascade_rank_requests_total{{{SERIES},method="Rank",status="INTERNAL"}}',
             "values": "0+5x30"},
            {"series": f'cascade_rank_requests_total{{{SERIES},method="Rank",status="RESOURCE_EXHAUSTED"}}',
             "values": "0+10x30"},
            {"series": f"cascade_requests_shed_total{{{SERIES}}}", "values": "0+10x30"},
            # fallbacks: only cold starts, which the degraded-answers alert ignores
            {"series": f'cascade_degraded_answers_total{{{SERIES},reason="cold_start"}}', "values": "0+40x30"},
        ], "alert_rule_test": [
            alert("CascadeRankErrorRateHigh", "20m", release | {"severity": "critical"}),
            alert("CascadeRequestsShed", "20m", release | {"severity": "warning"}),
            alert("CascadeDegradedAnswers", "20m", None),
        ]},
        {"interval": "1m", "input_series": [
            # the events consumer fails 3 times a minute for 30 minutes; one record of the items topic is skipped
            {"series": f'cascade_consumer_restarts_total{{{SERIES},consumer="events"}}', "values": "0+3x30"},
            {"series": f'cascade_consumer_restarts_total{{{SERIES},consumer="items"}}', "values": "0x30"},
            {"series": f'cascade_consumer_skipped_records_total{{{SERIES},topic="cascade.items"}}',
             "values": "0 0 0 0 0 1 1 1 1 1"},
        ], "alert_rule_test": [
            alert("CascadeConsumerRestarting", "5m", None),  # not yet: `for: 10m`
            alert("CascadeConsumerRestarting", "20m", release | {"severity": "warning", "consumer": "events"}),
            alert("CascadeRecordsSkipped", "3m", None),
            alert("CascadeRecordsSkipped", "7m", release | {"severity": "warning", "topic": "cascade.items"}),
        ]},
        {"interval": "1m", "input_series": [
            {"series": f"cascade_redis_up{{{SERIES}}}", "values": "1 1 1 0 0 0 0 0 0 0"},
        ], "alert_rule_test": [
            alert("CascadeRedisDown", "4m", None),
            alert("CascadeRedisDown", "6m", release | {"severity": "critical", "pod": "cascade-0"}),
        ]},
    ]


def test_alerts_fire_in_promtool_unit_tests(default_rules, promtool: str, tmp_path: Path) -> None:
    """Which alerts fire, with which labels. promtool compares annotations exactly, so they are dropped except on
    CascadeConsumerLagHigh, which checks that the templates render ($labels, $value | humanize)."""
    groups = [{**g, "rules": [r if r["alert"] == "CascadeConsumerLagHigh" else {**r, "annotations": {}}
                              for r in g["rules"]]} for g in default_rules]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": _alert_tests()}))
    run = subprocess.run([promtool, "test", "rules", "rules_test.yaml"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------------------------------------ pipeline alerts
PUSHED = 'job="cascade-pipeline",namespace="recsys",instance=""'  # the Pushgateway scraped with honor_labels
KSM = 'job="kube-state-metrics",namespace="recsys"'


def _outcome_series(outcome: str, samples: int) -> list[dict[str, str]]:
    """The pushed gauges of one last run with `outcome`, ended (and succeeded, unless failed) at t=0."""
    series = [{"series": f'cascade_pipeline_last_outcome{{{PUSHED},outcome="{o}"}}',
               "values": f"{int(o == outcome)}x{samples}"} for o in ("published", "gate_refused", "failed")]
    series.append({"series": f"cascade_pipeline_gate_refused{{{PUSHED}}}",
                   "values": f"{int(outcome == 'gate_refused')}x{samples}"})
    series.append({"series": f"cascade_pipeline_last_success_timestamp_seconds{{{PUSHED}}}", "values": f"0x{samples}"})
    return series


def _job_series(job: str, failed: int, active: int, succeeded: int, samples: int) -> list[dict[str, str]]:
    """kube-state-metrics' series of one Job that started at t=0."""
    labels = f'{KSM},job_name="{job}"'
    return [{"series": f"kube_job_status_{name}{{{labels}}}", "values": f"{value}x{samples}"}
            for name, value in (("failed", failed), ("active", active), ("succeeded", succeeded), ("start_time", 0))]


def _pipeline_alert_tests() -> list[dict[str, Any]]:
    """promtool unit tests of the pipeline group at the default thresholds (maxSuccessAgeHours 48, windowHours 24)."""
    def alert(name: str, at: str, labels: dict[str, str] | None):
        return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels}] if labels else []}

    group = {"namespace": "recsys", "job": "cascade-pipeline"}
    return [
        {"interval": "1m", "input_series": _outcome_series("failed", 30), "alert_rule_test": [
            alert("CascadePipelineFailed", "3m", None),  # not yet: `for: 5m`
            alert("CascadePipelineFailed", "10m", group | {"severity": "critical"}),
            alert("CascadeGateRefused", "10m", None),
        ]},
        # published, then nothing for two days: the last success (t=0) grows older than 48 hours
        {"interval": "1m", "input_series": _outcome_series("published", 50 * 60), "alert_rule_test": [
            alert("CascadePipelineFailed", "47h", None),
            alert("CascadePipelineFailed", "49h", group | {"severity": "critical"}),
        ]},
        # the gate refused: a warning, and the Job that exited 3 is not reported as a failed Job
        {"interval": "1m", "input_series": [*_outcome_series("gate_refused", 30),
                                            *_job_series("cascade-pipeline-29410560", 2, 0, 0, 30)],
         "alert_rule_test": [
            alert("CascadeGateRefused", "10m", group | {"severity": "warning"}),
            alert("CascadePipelineFailed", "10m", None),
            alert("CascadePipelineJobFailed", "10m", None),
        ]},
        # a run killed before it could push (the last push was a success); a Job whose retry succeeded, one
        # still retrying, and another release's failed Job are not reported; a day later the alert ends
        {"interval": "1m", "input_series": [*_outcome_series("published", 25 * 60),
                                            *_job_series("cascade-pipeline-29410560", 2, 0, 0, 25 * 60),
                                            *_job_series("cascade-pipeline-29409120", 1, 0, 1, 25 * 60),
                                            *_job_series("cascade-pipeline-manual", 1, 1, 0, 25 * 60),
                                            *_job_series("other-pipeline-29410560", 2, 0, 0, 25 * 60)],
         "alert_rule_test": [
            alert("CascadePipelineJobFailed", "3m", None),
            alert("CascadePipelineJobFailed", "10m", {"namespace": "recsys", "job_name": "cascade-pipeline-29410560",
                                                      "severity": "critical"}),
            alert("CascadePipelineJobFailed", "25h", None),
        ]},
    ]


def test_pipeline_alerts_fire_in_promtool_unit_tests(render, promtool: str, tmp_path: Path) -> None:
    """The pipeline group with a Pushgateway: a failed run, an old last success, a refused gate, a failed Job.
    Annotations are checked on CascadePipelineJobFailed only ($labels in its templates)."""
    docs = render({"prometheusRule": {"enabled": True}, "pipeline": {"run": {"pushgateway": "http://pgw:9091"}}})
    (group,) = [g for g in _rule_groups(docs) if g["name"] == "cascade-pipeline"]
    assert [r["alert"] for r in group["rules"]] == ["CascadePipelineFailed", "CascadeGateRefused",
                                                   "CascadePipelineJobFailed"]
    rules = [r if r["alert"] == "CascadePipelineJobFailed" else {**r, "annotations": {}} for r in group["rules"]]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{**group, "rules": rules}]}))
    tests = _pipeline_alert_tests()
    tests[-1]["alert_rule_test"][1]["exp_alerts"][0]["exp_annotations"] = {
        "summary": "The Cascade pipeline Job cascade-pipeline-29410560 failed",
        "description": "Every pod of the Job recsys/cascade-pipeline-29410560 failed (crashed, killed, out of memory "
                       "or past its deadline): see kubectl -n recsys describe job cascade-pipeline-29410560 and "
                       "its pods' logs."}
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    run = subprocess.run([promtool, "test", "rules", "rules_test.yaml"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


def test_pipeline_job_alert_without_a_pushgateway_names_a_refused_gate(render) -> None:
    """Without pushed outcomes a refused gate (exit 3) fails the Job too; the description says so."""
    (rule,) = [r for g in _rule_groups(render({"prometheusRule": {"enabled": True}})) for r in g["rules"]
               if r["alert"] == "CascadePipelineJobFailed"]
    assert "or its gate refused the model: exit code 3" in rule["annotations"]["description"]
    assert "cascade_pipeline_gate_refused" not in rule["expr"]
