"""A pipeline run's outcome as Prometheus metrics, pushed to a Pushgateway when the run ends (`jobs.pipeline`).

The chart's CascadePipelineFailed and CascadeGateRefused alerts read them; `PIPELINE_METRIC_NAMES` is what a
run pushes (one group per ``metrics.job`` + ``metrics.grouping``, `jobs.pipeline.MetricsConfig`).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("cascade.pipeline")

OUTCOMES = ("published", "gate_refused", "failed")
# What a run pushes (one group per metrics.job + metrics.grouping; the chart's alerts read these).
PIPELINE_METRIC_NAMES = (
    "cascade_pipeline_last_run_timestamp_seconds",
    "cascade_pipeline_last_success_timestamp_seconds",
    "cascade_pipeline_last_outcome",
    "cascade_pipeline_gate_refused",
    "cascade_pipeline_duration_seconds",
)


def outcome_registry(outcome: str, started: float, finished: float) -> CollectorRegistry:
    """The metrics of one finished run, in a registry of their own (never the process' default one).

    A run that did not fail (published, or completed with its gate refusing) is a success and sets
    cascade_pipeline_last_success_timestamp_seconds; a failed run leaves that metric out, so the push (which
    replaces only the metrics it carries) keeps the previous success's timestamp on the Pushgateway.
    """
    from prometheus_client import CollectorRegistry, Gauge

    if outcome not in OUTCOMES:
        raise ValueError(f"pipeline outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    registry = CollectorRegistry(auto_describe=True)
    Gauge("cascade_pipeline_last_run_timestamp_seconds", "When the last pipeline run ended (Unix time).",
          registry=registry).set(finished)
    if outcome != "failed":
        Gauge("cascade_pipeline_last_success_timestamp_seconds",
              "When the last pipeline run that did not fail ended (published or gate refused; Unix time).",
              registry=registry).set(finished)
    last = Gauge("cascade_pipeline_last_outcome", "1 for the outcome of the last pipeline run, 0 for the others.",
                 ["outcome"], registry=registry)
    for o in OUTCOMES:
        last.labels(outcome=o).set(1 if o == outcome else 0)
    Gauge("cascade_pipeline_gate_refused", "1 when the last run's evaluation gate refused to publish its model.",
          registry=registry).set(1 if outcome == "gate_refused" else 0)
    Gauge("cascade_pipeline_duration_seconds", "Wall time of the last pipeline run.",
          registry=registry).set(max(finished - started, 0.0))
    return registry


def push_outcome(mc: Any, outcome: str, started: float, finished: float) -> bool:
    """Pushes a run's outcome to ``mc.pushgateway`` (POST: replaces the metrics it carries, keeps the last
    success's timestamp after a failure). True when pushed; a push that fails logs a warning and never fails
    the run (the chart also alerts on the CronJob's failed Jobs, which covers a run that could not push)."""
    if not mc.pushgateway:
        return False
    from prometheus_client import pushadd_to_gateway

    registry = outcome_registry(outcome, started, finished)
    try:
        pushadd_to_gateway(mc.pushgateway, job=mc.job, registry=registry, grouping_key=dict(mc.grouping),
                           timeout=mc.timeout_s)
    except Exception as e:  # noqa: BLE001 — any push error (refused, timeout, HTTP 5xx, bad reply) is only reported
        log.warning("could not push the pipeline outcome (%s) to %s: %s: %s", outcome, mc.pushgateway,
                    type(e).__name__, e)
        return False
    log.info("pushed the pipeline outcome (%s) to %s (job %s)", outcome, mc.pushgateway, mc.job)
    return True


