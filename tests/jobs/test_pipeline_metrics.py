"""What `run_pipeline` pushes to the Pushgateway when it ends: published, gate refused, failed.

The payload tests use a loopback HTTP server that records each request (a fake only for what is pushed); the
pipeline's stages are replaced by a stub result, except in the failed case, which runs the real stages on a
features directory that does not exist. The last test runs the real `prometheus-pushgateway`.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

import jobs.pipeline as pipeline
from jobs.pipeline import (OUTCOMES, PIPELINE_METRIC_NAMES, FeaturesStage, MetricsConfig, PipelineConfig, PipelineResult,
                           load_pipeline_config, run_pipeline)


@dataclasses.dataclass
class Push:
    method: str
    path: str
    body: str

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self.body) for s in family.samples}


@pytest.fixture
def pushgateway() -> Iterator[tuple[str, list[Push]]]:
    pushes: list[Push] = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            pushes.append(Push(self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST = _record

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", pushes
    finally:
        server.shutdown()
        server.server_close()


def _dead_url() -> str:
    from jobs.services import free_port

    return f"http://127.0.0.1:{free_port()}"  # nobody listens there


def _cfg(tmp_path: Path, url: str, **grouping: str) -> PipelineConfig:
    # a prebuilt features directory that does not exist: the real stages fail at once, in the features stage
    return PipelineConfig(features=FeaturesStage(dir=str(tmp_path / "no-such-features")),
                          artifacts=str(tmp_path / "artifacts"),
                          metrics=MetricsConfig(pushgateway=url, job="cascade-pipeline", grouping=grouping))


def _stub_stages(monkeypatch, published: bool) -> None:
    def stages(cfg, version, say):
        return PipelineResult(version, passed=published, published=published,
                              reasons=[] if published else ["ranker auc 0.70 < published 0.75 - 0.002"])
    monkeypatch.setattr(pipeline, "_run_stages", stages)


def _outcomes(push: Push) -> dict[str, float]:
    return {dict(labels)["outcome"]: v for (name, labels), v in push.samples().items()
            if name == "cascade_pipeline_last_outcome"}


def test_a_published_run_pushes_success(pushgateway, tmp_path: Path, monkeypatch) -> None:
    url, pushes = pushgateway
    _stub_stages(monkeypatch, published=True)
    res = run_pipeline(_cfg(tmp_path, url, namespace="recsys"), "v1", say=lambda _: None)
    assert res.published
    (push,) = pushes
    assert (push.method, push.path) == ("POST", "/metrics/job/cascade-pipeline/namespace/recsys")
    samples = push.samples()
    assert {name for name, _ in samples} == set(PIPELINE_METRIC_NAMES)
    assert _outcomes(push) == {"published": 1, "gate_refused": 0, "failed": 0}
    assert samples[("cascade_pipeline_gate_refused", ())] == 0
    run_ts = samples[("cascade_pipeline_last_run_timestamp_seconds", ())]
    assert samples[("cascade_pipeline_last_success_timestamp_seconds", ())] == run_ts
    assert 0 <= samples[("cascade_pipeline_duration_seconds", ())] < 3600


def test_a_refused_gate_pushes_gate_refused_as_a_success(pushgateway, tmp_path: Path, monkeypatch) -> None:
    url, pushes = pushgateway
    _stub_stages(monkeypatch, published=False)
    assert not run_pipeline(_cfg(tmp_path, url), "v1", say=lambda _: None).published
    (push,) = pushes
    assert push.path == "/metrics/job/cascade-pipeline"
    assert _outcomes(push) == {"published": 0, "gate_refused": 1, "failed": 0}
    samples = push.samples()
    assert samples[("cascade_pipeline_gate_refused", ())] == 1
    assert ("cascade_pipeline_last_success_timestamp_seconds", ()) in samples


def test_a_failed_run_pushes_failed_and_keeps_the_last_success(pushgateway, tmp_path: Path) -> None:
    """The real stages fail (no features directory); the error propagates, and the push leaves the last success's
    timestamp out, so the Pushgateway keeps the previous one (POST replaces only the metrics pushed)."""
    url, pushes = pushgateway
    with pytest.raises(FileNotFoundError):
        run_pipeline(_cfg(tmp_path, url), "v1", say=lambda _: None)
    (push,) = pushes
    assert push.method == "POST"
    assert _outcomes(push) == {"published": 0, "gate_refused": 0, "failed": 1}
    samples = push.samples()
    assert samples[("cascade_pipeline_gate_refused", ())] == 0
    assert {name for name, _ in samples} == set(PIPELINE_METRIC_NAMES) - {
        "cascade_pipeline_last_success_timestamp_seconds"}


def test_a_dead_pushgateway_does_not_fail_a_run(tmp_path: Path, monkeypatch, caplog) -> None:
    _stub_stages(monkeypatch, published=True)
    url = _dead_url()
    with caplog.at_level(logging.WARNING, logger="cascade.pipeline"):
        assert run_pipeline(_cfg(tmp_path, url), "v1", say=lambda _: None).published
    assert f"could not push the pipeline outcome (published) to {url}" in caplog.text


def test_a_dead_pushgateway_does_not_hide_the_runs_own_error(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="cascade.pipeline"), pytest.raises(FileNotFoundError):
        run_pipeline(_cfg(tmp_path, _dead_url()), "v1", say=lambda _: None)
    assert "could not push the pipeline outcome (failed)" in caplog.text


def test_nothing_is_pushed_without_a_pushgateway(pushgateway, tmp_path: Path, monkeypatch) -> None:
    _, pushes = pushgateway
    _stub_stages(monkeypatch, published=True)
    run_pipeline(_cfg(tmp_path, ""), "v1", say=lambda _: None)
    assert pushes == []


def test_metrics_config_loads_from_overrides(tmp_path: Path) -> None:
    cfg = load_pipeline_config(None, ["dataset=/d", "metrics.pushgateway=http://pgw.monitoring:9091",
                                      "metrics.job=cascade-pipeline", "metrics.grouping.namespace=recsys"])
    assert cfg.metrics == MetricsConfig("http://pgw.monitoring:9091", "cascade-pipeline", {"namespace": "recsys"})


@pytest.mark.parametrize(("override", "message"), [
    ("metrics.pushgateway=pgw:9091", "metrics.pushgateway must be an http:// or https:// URL, got 'pgw:9091'"),
    ("metrics.job=", "metrics.job must not be empty"),
    ("metrics.timeout_s=0", "metrics.timeout_s must be > 0, got 0"),
])
def test_bad_metrics_config_is_refused(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_pipeline_config(None, ["dataset=/d", override])


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="pipeline outcome must be one of published, gate_refused, failed"):
        pipeline.outcome_registry("ok", 0.0, 1.0)
    assert OUTCOMES == ("published", "gate_refused", "failed")


@pytest.fixture
def real_pushgateway(tmp_path: Path) -> Iterator[str]:
    from jobs.services import _wait_tcp, free_port, stop_pid

    exe = shutil.which("prometheus-pushgateway")
    if exe is None:
        pytest.skip("prometheus-pushgateway not found: install it with `apt-get install prometheus-pushgateway` "
                    "(make sysdeps does)")
    port = free_port()
    log = tmp_path / "pushgateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_tcp(port, proc, "prometheus-pushgateway", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_pid(proc.pid)


def test_a_failed_run_keeps_the_last_success_on_a_real_pushgateway(real_pushgateway: str, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """published, then failed: the gateway serves outcome failed, and still the published run's success time."""
    cfg = _cfg(tmp_path, real_pushgateway, namespace="recsys")
    with monkeypatch.context() as m:
        _stub_stages(m, published=True)
        run_pipeline(cfg, "v1", say=lambda _: None)
    with pytest.raises(FileNotFoundError):
        run_pipeline(cfg, "v2", say=lambda _: None)
    with urllib.request.urlopen(f"{real_pushgateway}/metrics", timeout=10) as r:
        served = Push("GET", "/metrics", r.read().decode())
    group = {k: v for k, v in served.samples().items()
             if k[0].startswith("cascade_pipeline_") and ("job", "cascade-pipeline") in k[1]}
    labels = (("instance", ""), ("job", "cascade-pipeline"), ("namespace", "recsys"))
    assert {dict(k[1]).get("outcome"): v for k, v in group.items() if k[0] == "cascade_pipeline_last_outcome"} == {
        "published": 0, "gate_refused": 0, "failed": 1}
    success = group[("cascade_pipeline_last_success_timestamp_seconds", labels)]
    last_run = group[("cascade_pipeline_last_run_timestamp_seconds", labels)]
    assert 0 < success <= last_run  # the published run's end, kept across the failed run's push
    assert group[("cascade_pipeline_gate_refused", labels)] == 0
