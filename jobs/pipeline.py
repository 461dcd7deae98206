"""`cascade pipeline`: the scheduled unit — features -> retriever -> ranker -> evaluation gate -> publish.

    cascade pipeline run --config jobs/configs/pipeline.ml-100k.yaml --date 2026-11-22
    cascade pipeline run --config pipeline.yaml --version 2026-11-22.hotfix ranker.overrides='[train.epochs=5]'
    cascade pipeline status --artifacts var/artifacts
    cascade pipeline backfill --dataset data/ml-1m --start 2026-11-01 --end 2026-11-22    # jobs/backfill.py

(the Helm chart's CronJob runs the same `cascade pipeline run`; on a cluster set
``features.spark_master`` and point ``artifacts`` at a shared volume.)

Artifacts (`ARTIFACTS` = ``artifacts`` of the config)::

    ARTIFACTS/versions/<version>/
        features/        `cascade build-features` output (skipped when ``features.dir`` names a prebuilt one)
        retriever/       the retriever run (checkpoints, metrics, export/)
        ranker/          the ranker run (checkpoints, metrics, export/)
        evaluation.json  candidate vs published, metric by metric, and the decision
        bundle/          the serving bundle (`serving.models.write_bundle`), only when the gate passed
        manifest.json    version, data snapshot, metrics, checksums, code version, stage records
    ARTIFACTS/published.json   the current version (written atomically) + ARTIFACTS/history.jsonl

``artifacts`` may be an object-store URI (``s3://bucket/artifacts``, `features.storage`): the version's
files are then made under ``workdir`` and its manifest, evaluation.json and bundle/ uploaded to
ARTIFACTS/versions/<version>/ — the bundle's objects first, its manifest.json last, published.json
after it — so a reader that sees the pointer finds every object it names.

Idempotent: a version's stages record their inputs' digest in the manifest; a re-run
with the same inputs skips finished stages (a crashed run resumes at the stage that
failed); a published version is announced once (a run whose announcement failed, e.g.
Kafka was down, announces on the re-run). Changed inputs for an existing version are
refused: pick a new version.

With ``metrics.pushgateway`` set, every run pushes its outcome (published, gate refused or failed; see
`jobs.outcome.push_outcome`) to a Prometheus Pushgateway when it ends, for the chart's pipeline alerts.

The gate evaluates the candidate *and* the published models on the candidate's
held-out test split (the same rows for both, so data drift cannot pass a regression)
and refuses to publish when any gated metric is worse than the published one by more
than its tolerance; the reasons are printed and stored in evaluation.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from features import storage
from features.datasets.common import DATASET_MANIFEST
from features.layout import MANIFEST as FEATURES_MANIFEST
from features.storage import StorageConfig
from jobs import backfill
from jobs.outcome import OUTCOMES, PIPELINE_METRIC_NAMES, outcome_registry, push_outcome  # noqa: F401 (re-exported)
from serving.artifacts import PUBLISHED
from serving.artifacts import VERSION_MANIFEST as MANIFEST
from serving.config import SaslConfig, TlsFiles

log = logging.getLogger("cascade.pipeline")

HISTORY = "history.jsonl"
STAGES = ("features", "retriever", "ranker", "evaluate", "publish")


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FeaturesStage:
    # A prebuilt `cascade build-features` directory to use as is, or a versioned features root (`build-features
    # --versioned`), whose current version is resolved once and leased for the run (empty: build into the
    # version directory).
    dir: str = ""
    # YAML of features.spark.config.FeatureBuildConfig (empty: its defaults).
    config: str = ""
    overrides: tuple[str, ...] = ()
    spark_master: str = ""  # overrides the build config's spark.master (e.g. "local[2]", "yarn")


@dataclass(frozen=True)
class TrainStage:
    # YAML files layered in order (dataset config, then an ablation), then `key=value` overrides.
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    world_size: int = 1  # local loopback ranks (gloo)


@dataclass(frozen=True)
class GateRule:
    model: str  # "retriever" | "ranker" | "two_stage"
    # a metric the evaluation computes: ranker auc/gauc/logloss, retriever hr@K/ndcg@K/recall@K, two_stage hr@K/ndcg@K
    metric: str
    tolerance: float = 0.0  # largest allowed regression (absolute) vs the published model

    def __post_init__(self) -> None:
        if self.model not in ("retriever", "ranker", "two_stage"):
            raise ValueError(f"gate rule model must be 'retriever', 'ranker' or 'two_stage', got {self.model!r}")
        if self.tolerance < 0:
            raise ValueError(f"gate rule {self.model}.{self.metric}: tolerance must be >= 0, got {self.tolerance}")

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "logloss"


@dataclass(frozen=True)
class GateConfig:
    rules: tuple[GateRule, ...] = (
        GateRule("ranker", "auc", 0.002),
        GateRule("ranker", "logloss", 0.005),
        GateRule("retriever", "ndcg@10", 0.002),
        GateRule("retriever", "recall@100", 0.005),
        GateRule("two_stage", "ndcg@10", 0.002),  # second-stage rankers: the cascade on the validation lists
        GateRule("two_stage", "hr@10", 0.005),
    )
    # With nothing published yet the first version is published when its ranker AUC reaches this.
    min_auc: float = 0.55
    # A second-stage ranker (model.residual_column >= 0) is published only when the cascade beats its own
    # retriever on the validation lists: two-stage NDCG@10 > min_two_stage_lift x the retriever's, HR@10 >=.
    min_two_stage_lift: float = 1.0


@dataclass(frozen=True)
class PublishConfig:
    announce: bool = True  # send the version on the models topic (servers validate and hot-swap)
    kafka_bootstrap: str = "127.0.0.1:9092"
    models_topic: str = "cascade.models"
    # The announcing producer's broker security, as the server's kafka.* keys (serving/security.py); SASL
    # credentials from CASCADE_KAFKA_SASL_USERNAME / CASCADE_KAFKA_SASL_PASSWORD.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl: SaslConfig = SaslConfig()
    tls: TlsFiles = TlsFiles()

    def __post_init__(self) -> None:
        if self.announce and self.security_protocol.startswith("SASL_") and not (self.sasl.username and self.sasl.password):
            raise ValueError(f"publish.security_protocol={self.security_protocol} needs publish.sasl.username and "
                             "publish.sasl.password (CASCADE_KAFKA_SASL_USERNAME / CASCADE_KAFKA_SASL_PASSWORD)")
        if self.tls.configured and not self.security_protocol.endswith("SSL"):
            raise ValueError("publish.tls files are set but publish.security_protocol is not SSL or SASL_SSL")


@dataclass(frozen=True)
class MetricsConfig:
    # A Prometheus Pushgateway (http://host:9091) that every run pushes its outcome to when it ends: published,
    # gate refused or failed (PIPELINE_METRIC_NAMES). Empty: nothing is pushed.
    pushgateway: str = ""
    job: str = "cascade-pipeline"  # the pushed group's `job` label
    # More labels of the pushed group, e.g. {namespace: recsys} (the Helm chart sets the release namespace).
    grouping: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.pushgateway and not self.pushgateway.startswith(("http://", "https://")):
            raise ValueError(f"metrics.pushgateway must be an http:// or https:// URL, got {self.pushgateway!r}")
        if not self.job:
            raise ValueError("metrics.job must not be empty: it is the pushed group's job label")
        if self.timeout_s <= 0:
            raise ValueError(f"metrics.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class PipelineConfig:
    dataset: str = ""  # canonical dataset directory (`cascade data import|synth`)
    # A directory, or an object-store URI (s3://bucket/artifacts): versions' manifests, evaluations and
    # bundles, published.json and history.jsonl are written there (see "Artifacts on object storage").
    artifacts: str = "var/artifacts"
    # With object-store artifacts: the local directory where a version's features, runs and bundle are
    # staged before upload (a run resumes from it). Empty: var/pipeline-work.
    workdir: str = ""
    storage: StorageConfig = StorageConfig()  # endpoint and credential variable names of s3:// artifacts
    features: FeaturesStage = FeaturesStage()
    retriever: TrainStage = TrainStage(configs=("retrieval/configs/ml-100k.yaml",))
    # the second stage by default (jobs/second_stage.py); ranking/configs/ml-100k.yaml alone trains a CTR ranker
    ranker: TrainStage = TrainStage(configs=("ranking/configs/ml-100k.yaml", "ranking/configs/two-stage.yaml"))
    gate: GateConfig = GateConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()


# Secrets of the announcing producer (Kubernetes Secrets): taken verbatim, never parsed as YAML.
SECRET_ENV = {"CASCADE_KAFKA_SASL_USERNAME": "publish.sasl.username", "CASCADE_KAFKA_SASL_PASSWORD": "publish.sasl.password"}


def load_pipeline_config(path: Path | None, overrides: list[str], env: Mapping[str, str] | None = None,
                         need_dataset: bool = True) -> PipelineConfig:
    from features.config import load_config

    env = os.environ if env is None else env
    secrets = [f"{key}={json.dumps(env[var], ensure_ascii=False)}" for var, key in SECRET_ENV.items() if env.get(var)]
    cfg = load_config(PipelineConfig, path, [*secrets, *overrides])
    if need_dataset and not cfg.dataset and not cfg.features.dir:
        raise ValueError("dataset is not set: pass dataset=PATH (a canonical dataset directory) or features.dir=PATH")
    return cfg


# ---------------------------------------------------------------------------------------------- helpers


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"


def code_version() -> str:
    """The git commit of the running code (with ``-dirty`` for local edits), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"cascade {version('cascade')}"


def read_published(artifacts: Path | str) -> dict[str, Any] | None:
    """The published pointer of an artifacts directory or object-store URI; None when nothing is published."""
    p = storage.join(artifacts, PUBLISHED)
    return json.loads(storage.read_text(p)) if storage.is_file(p) else None


def _put_json(location: str, obj: Any) -> None:
    """Written atomically: a local temp file + rename, or one object PUT."""
    storage.write_bytes_atomic(location, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def record_published(artifacts: Path | str, pointer: dict[str, Any]) -> None:
    """Replaces ARTIFACTS/published.json atomically and appends the pointer to ARTIFACTS/history.jsonl."""
    _put_json(storage.join(artifacts, PUBLISHED), pointer)
    storage.append_line(storage.join(artifacts, HISTORY), json.dumps(pointer, sort_keys=True))


def _metrics_line(m: dict[str, float], keys: tuple[str, ...]) -> str:
    return "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


# ---------------------------------------------------------------------------------------------- stages


class Run:
    """One pipeline run of one version (see the module docstring)."""

    def __init__(self, cfg: PipelineConfig, version: str, say: Callable[[str], None] = print) -> None:
        if not version or "/" in version or version.startswith("."):
            raise ValueError(f"version {version!r} is not a valid directory name")
        self.cfg = cfg
        self.version = version
        self.root = storage.check_location(cfg.artifacts, "artifacts")
        self.remote = storage.is_remote(self.root)
        # the version's files are made in a local directory; with object-store artifacts they are
        # staged in `workdir` and the records (manifest, evaluation, bundle, pointer) uploaded
        local_root = Path(cfg.workdir or "var/pipeline-work") if self.remote else Path(self.root)
        self.dir = local_root / "versions" / version
        self.uri = storage.join(self.root, "versions", version)
        self.say = say
        self.dir.mkdir(parents=True, exist_ok=True)
        mpath = self.dir / MANIFEST
        self.manifest: dict[str, Any] = json.loads(mpath.read_text()) if mpath.is_file() else {
            "version": version, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stages": {},
        }
        self.manifest["code_version"] = code_version()
        self.manifest["config"] = _config_dict(cfg)

    # -- bookkeeping
    def _save(self) -> None:
        _put_json(str(self.dir / MANIFEST), self.manifest)
        if self.remote:
            _put_json(storage.join(self.uri, MANIFEST), self.manifest)

    def _done(self, stage: str, inputs: str) -> dict[str, Any] | None:
        rec = self.manifest["stages"].get(stage)
        if rec and rec.get("status") == "done":
            if rec.get("inputs") != inputs:
                raise ValueError(
                    f"version {self.version}: stage {stage} already ran with other inputs ({rec.get('inputs')} != "
                    f"{inputs}); versions are immutable — run with a new --version")
            return rec
        return None

    def _stage(self, stage: str, inputs: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        i = STAGES.index(stage) + 1
        rec = self._done(stage, inputs)
        if rec is not None:
            self.say(f"[{i}/{len(STAGES)}] {stage:<10} done earlier ({rec['seconds']:.0f}s), skipped")
            return rec
        self.say(f"[{i}/{len(STAGES)}] {stage:<10} ...")
        t0 = time.perf_counter()
        self.manifest["stages"][stage] = {"status": "running", "inputs": inputs}
        self._save()
        try:
            out = fn()
        except BaseException as e:
            self.manifest["stages"][stage] = {"status": "failed", "inputs": inputs, "error": f"{type(e).__name__}: {e}"}
            self._save()
            raise
        rec = {"status": "done", "inputs": inputs, "seconds": round(time.perf_counter() - t0, 1), **out}
        self.manifest["stages"][stage] = rec
        self._save()
        self.say(f"[{i}/{len(STAGES)}] {stage:<10} done in {rec['seconds']:.0f}s")
        return rec

    # -- stages
    def features(self) -> dict[str, Any]:
        fc = self.cfg.features
        if fc.dir:
            fdir = Path(fc.dir)
            inputs = _digest({"dir": str(fdir.resolve()), "manifest": _file_digest(fdir / FEATURES_MANIFEST)})
            return self._stage("features", inputs, lambda: self._prebuilt(fdir))
        dataset = Path(self.cfg.dataset)
        inputs = _digest({"dataset": _file_digest(dataset / DATASET_MANIFEST), "config": fc.config,
                          "config_file": _file_digest(config_path(fc.config)) if fc.config else "",
                          "overrides": fc.overrides})
        return self._stage("features", inputs, lambda: self._build_features(dataset))

    def _prebuilt(self, fdir: Path) -> dict[str, Any]:
        if not (fdir / FEATURES_MANIFEST).is_file():
            raise FileNotFoundError(f"features.dir {fdir} has no {FEATURES_MANIFEST}: is it a `cascade build-features` output?")
        return {"dir": str(fdir), **_snapshot(fdir)}

    def _build_features(self, dataset: Path) -> dict[str, Any]:
        from features.config import load_config
        from features.spark.config import FeatureBuildConfig
        from features.spark.pipeline import build_features
        from features.spark.session import build_session

        fc = self.cfg.features
        bcfg = load_config(FeatureBuildConfig, config_path(fc.config) if fc.config else None, list(fc.overrides))
        out = self.dir / "features"
        scfg = bcfg.spark if not fc.spark_master else dataclasses.replace(bcfg.spark, master=fc.spark_master)
        session = build_session(scfg)
        try:
            build_features(session.spark, dataset, out, bcfg, overwrite=True,
                           progress=lambda name, i, n, what, secs, rows: self.say(
                               f"    features {i}/{n} {name:<18} {what}" + (f" {secs:.1f}s" if what == "done" else "")))
        finally:
            session.stop()
        return {"dir": str(out), **_snapshot(out)}

    def train(self, model: str, fdir: Path, retriever: dict[str, Any] | None = None) -> dict[str, Any]:
        """The "retriever" or "ranker" stage: train on `fdir` into VERSION/<model>/ and export. The ranker
        stage gets the retriever stage's record: a second-stage ranker learns from its lists."""
        tc: TrainStage = getattr(self.cfg, model)
        inputs = {"features": _file_digest(fdir / FEATURES_MANIFEST), "configs": tc.configs,
                  "files": [_file_digest(config_path(c)) for c in tc.configs], "overrides": tc.overrides,
                  "world": tc.world_size}
        if model == "retriever":
            return self._stage(model, _digest(inputs), lambda: train_retriever_stage(tc, fdir, self.dir / model))
        if retriever is None:
            raise ValueError("the ranker stage needs the retriever stage's record")
        inputs["retriever"] = retriever["inputs"]
        return self._stage(model, _digest(inputs), lambda: train_ranker_stage(
            tc, fdir, self.dir / model, self.cfg.retriever, Path(retriever["export"]), self.say))

    def evaluate(self, fdir: Path, retr: dict[str, Any], rank: dict[str, Any]) -> dict[str, Any]:
        published = read_published(self.root)
        base = published if published and published["version"] != self.version else None
        inputs = _digest({"retriever": retr["inputs"], "ranker": rank["inputs"],
                          "published": base["checksum"] if base else None, "gate": _config_dict(self.cfg.gate)})
        return self._stage("evaluate", inputs, lambda: self._gate(fdir, retr, rank, base))

    def _gate(self, fdir: Path, retr: dict[str, Any], rank: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
        from jobs.gate import evaluate_bundle_parts, gate_decision

        self.say("    evaluating the candidate (retriever: test split; a second-stage ranker: the validation lists) ...")
        cand = evaluate_bundle_parts(Path(retr["export"]), Path(rank["export"]), fdir)
        old = None
        if base is not None:
            bdir = self._published_bundle(base)
            self.say(f"    evaluating the published {base['version']} on the same split ...")
            old = evaluate_bundle_parts(bdir / "retriever", bdir / "ranker", fdir)
        decision = gate_decision(self.cfg.gate, cand, old, base["version"] if base else None)
        report = {"candidate": cand, "published": old, "published_version": base["version"] if base else None,
                  **decision}
        _put_json(str(self.dir / "evaluation.json"), report)
        if self.remote:
            _put_json(storage.join(self.uri, "evaluation.json"), report)
        for model in [m for m in ("retriever", "ranker", "retriever_valid", "two_stage") if m in cand]:
            c = cand[model]
            o = (old or {}).get(model, {})
            keys = tuple(k for k in c if k != "n")
            self.say(f"    {model:<9} candidate  {_metrics_line(c, keys)}")
            if o:
                self.say(f"    {model:<9} published  {_metrics_line(o, keys)}")
        verdict = "PASS" if decision["passed"] else "FAIL"
        self.say(f"    gate {verdict}: " + "; ".join(decision["reasons"]))
        return {"passed": decision["passed"], "reasons": decision["reasons"], "metrics": cand,
                "published_metrics": old, "published_version": report["published_version"]}

    def _published_bundle(self, base: dict[str, Any]) -> Path:
        """The published bundle as a local directory: an object-store one is fetched and checked against the
        pointer's checksum (the manifest, then every file it lists)."""
        if not storage.is_remote(base["bundle"]):
            return Path(base["bundle"])
        from features.datasets.common import sha256_file
        from serving.models import MANIFEST as BUNDLE_MANIFEST
        from serving.models import fetch_bundle

        cache = self.dir.parent.parent / "bundle-cache"
        cache.mkdir(parents=True, exist_ok=True)
        bdir = fetch_bundle(base["bundle"], (), cache, base["checksum"])
        for rel, digest in json.loads((bdir / BUNDLE_MANIFEST).read_text())["files"].items():
            if sha256_file(bdir / rel) != digest:
                raise ValueError(f"the published bundle {base['bundle']}: {rel} does not match its manifest checksum")
        return bdir

    def publish(self, fdir: Path, retr: dict[str, Any], rank: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
        if not ev["passed"]:
            return {"published": False}
        inputs = _digest({"evaluate": ev["inputs"]})
        return self._stage("publish", inputs, lambda: self._publish(fdir, retr, rank, ev))

    def _publish(self, fdir: Path, retr: dict[str, Any], rank: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
        from features.transforms import DenseLayout
        from serving.models import MANIFEST as BUNDLE_MANIFEST
        from serving.models import write_bundle

        layout = DenseLayout.from_manifest(json.loads((fdir / FEATURES_MANIFEST).read_text()))
        bundle = self.dir / "bundle"
        if bundle.exists():  # a crash between write_bundle and the pointer update: rebuild it
            shutil.rmtree(bundle)
        checksum = write_bundle(
            bundle, self.version, ("retrieval.export", Path(retr["export"])), ("ranking.export", Path(rank["export"])),
            layout,
            extra={"metrics": ev["metrics"], "data": self.manifest["stages"]["features"].get("snapshot"),
                   "code_version": self.manifest["code_version"]})
        where = str(bundle.resolve())
        if self.remote:  # every object first, the bundle's manifest last, then the pointer (PUTs are atomic)
            where = storage.join(self.uri, "bundle")
            storage.upload_tree(bundle, where, last=(BUNDLE_MANIFEST,))
        pointer = {"version": self.version, "bundle": where, "checksum": checksum,
                   "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "metrics": ev["metrics"]}
        record_published(self.root, pointer)
        return {"published": True, "bundle": where, "checksum": checksum}

    def announce(self, pub: dict[str, Any]) -> None:
        pc = self.cfg.publish
        if not pc.announce:
            self.say("    announce: off (publish.announce=false)")
            return
        from serving.models import announce_bundle

        from serving.security import kafka_client_kwargs

        ann = announce_bundle(pub["bundle"], pc.kafka_bootstrap, pc.models_topic,
                              client_kwargs=kafka_client_kwargs(pc))
        self.manifest["stages"]["publish"]["announced"] = {"topic": pc.models_topic, "bootstrap": pc.kafka_bootstrap,
                                                           "checksum": ann.checksum}
        self._save()
        self.say(f"    announced {ann.version} on {pc.models_topic} ({pc.kafka_bootstrap})")


def _snapshot(fdir: Path) -> dict[str, Any]:
    m = json.loads((fdir / FEATURES_MANIFEST).read_text())
    inp = m.get("input", {})
    return {"snapshot": {"features_manifest_sha256": _file_digest(fdir / FEATURES_MANIFEST),
                         "dataset": inp.get("dataset"), "time_range": inp.get("time_range"),
                         "tables": inp.get("tables"), "feature_set_version": m.get("feature_set_version")}}


def config_path(p: str) -> Path:
    """A config file path as given, or relative to the repository/package root (CronJobs run from anywhere)."""
    path = Path(p)
    if path.is_absolute() or path.exists():
        return path
    alt = Path(__file__).resolve().parent.parent / p
    if alt.exists():
        return alt
    raise FileNotFoundError(f"config file {p} does not exist (relative to {Path.cwd()} or the cascade source)")


def _config_dict(cfg: Any) -> Any:
    """The config as written into run manifests: every non-empty `password` masked."""
    from features.config import to_dict

    def mask(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: "***" if k == "password" and v else mask(v) for k, v in d.items()}
        return d

    return mask(to_dict(cfg))


def train_retriever_stage(tc: TrainStage, fdir: Path, out: Path) -> dict[str, Any]:
    from jobs.train_retriever import load_retriever_config, train
    from retrieval.export import MANIFEST as RETRIEVER_MANIFEST

    cfg = load_retriever_config([config_path(c) for c in tc.configs], tc.overrides)
    res = train(cfg, fdir, out, tc.world_size)
    ann = json.loads((Path(res.export_dir) / RETRIEVER_MANIFEST).read_text())["ann"]
    return {"export": res.export_dir, "test": res.test, "valid": res.best_valid, "best_epoch": res.best_epoch,
            "ann": {k: v for k, v in ann.items() if k.startswith("recall")}}


def train_ranker_stage(tc: TrainStage, fdir: Path, out: Path, retriever: TrainStage | None = None,
                       retriever_export: Path | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """A CTR ranker on the feature build's samples, or a second-stage ranker (`model.residual_column` >= 0) on
    the retriever's lists (`jobs.second_stage`: the lists retriever, trained here with the retriever stage's
    config and ``train.holdout_tail = lists.holdout``, then the listwise ranker)."""
    from jobs.train_ranker import load_ranker_config, train

    cfg = load_ranker_config([config_path(c) for c in tc.configs], tc.overrides)
    if cfg.model.residual_column >= 0:
        from jobs.second_stage import check_second_stage, train_second_stage
        from jobs.training import write_run_config

        check_second_stage(cfg)
        if retriever is None or retriever_export is None:
            raise ValueError("a second-stage ranker needs the retriever stage's config and export")
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(out, cfg)
        say(f"    lists retriever (the retriever's config, its last {cfg.lists.holdout} training items held out) ...")
        held = train_retriever_stage(
            dataclasses.replace(retriever, overrides=(*retriever.overrides, f"train.holdout_tail={cfg.lists.holdout}")),
            fdir, out / "lists-retriever")
        say(f"    candidate lists (top {cfg.lists.top_n}, every seen item masked) and the listwise ranker ...")
        fitted = train_second_stage(cfg, fdir, retriever_export, Path(held["export"]), out, say)
        res = fitted.result
        if not res.export_dir:
            raise RuntimeError(f"the second-stage ranker run in {out} did not export a model")
        return {"export": str(res.export_dir), "test": res.test, "valid": res.best_valid,
                "best_epoch": res.best_epoch, "second_stage": True, "lists_retriever": held["export"],
                "kept": fitted.kept, "variants": fitted.variants}
    res = train(cfg, fdir, out, tc.world_size)
    if not res.export_dir:
        raise RuntimeError(f"the ranker run in {out} did not export a model")
    return {"export": res.export_dir, "test": res.test, "valid": res.best_valid, "best_epoch": res.best_epoch}


@dataclass
class PipelineResult:
    version: str
    passed: bool
    published: bool
    reasons: list[str] = field(default_factory=list)
    bundle: str | None = None
    seconds: float = 0.0


def run_pipeline(cfg: PipelineConfig, version: str, say: Callable[[str], None] = print) -> PipelineResult:
    """Runs (or resumes) every stage of `version`; see the module docstring. Its outcome (published, gate
    refused or failed) is pushed to ``metrics.pushgateway`` when set; a failed push only logs a warning."""
    started = time.time()
    try:
        res = _run_stages(cfg, version, say)
    except BaseException:
        push_outcome(cfg.metrics, "failed", started, time.time())
        raise
    push_outcome(cfg.metrics, "published" if res.published else "gate_refused", started, time.time())
    return res


def _run_stages(cfg: PipelineConfig, version: str, say: Callable[[str], None]) -> PipelineResult:
    t0 = time.perf_counter()
    with contextlib.ExitStack() as held:
        if cfg.features.dir:  # a versioned root (features/versions.py): one version, pinned for the whole run
            from features.versions import pin

            fv = held.enter_context(pin(cfg.features.dir, job=f"pipeline {version}"))
            cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, dir=str(fv.path)))
        run = Run(cfg, version, say)
        say(f"pipeline     version {version} -> {run.dir}   (code {run.manifest['code_version']})")
        feat = run.features()
        fdir = Path(feat["dir"])
        retr = run.train("retriever", fdir)
        rank = run.train("ranker", fdir, retr)
        ev = run.evaluate(fdir, retr, rank)
        pub = run.publish(fdir, retr, rank, ev)
    if pub.get("published") and not pub.get("announced"):
        run.announce(pub)
    elif pub.get("published"):
        say(f"    announced earlier on {pub['announced']['topic']}")
    else:
        say(f"[5/5] publish    refused: version {version} is not published (see {run.dir / 'evaluation.json'})")
    return PipelineResult(version, ev["passed"], bool(pub.get("published")), list(ev["reasons"]), pub.get("bundle"),
                          time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="the scheduled pipeline: features -> train -> evaluate/gate -> publish")
    psub = p.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", required=True)
    r = psub.add_parser("run", help="run (or resume) one version of the pipeline")
    r.add_argument("--config", type=Path, default=None, help="YAML of jobs.pipeline.PipelineConfig")
    r.add_argument("--date", default=None, help="the day this run is for (YYYY-MM-DD, default today, UTC)")
    r.add_argument("--version", default=None, help="version name (default: the date)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. ranker.world_size=2")
    r.set_defaults(func=_run)
    s = psub.add_parser("status", help="published version and the versions under an artifacts directory")
    s.add_argument("--artifacts", type=Path, default=Path("var/artifacts"))
    s.set_defaults(func=_status)
    for name, what in (("promote", "make a previously published VERSION the published one again"),
                       ("rollback", "go back to the version published before the current one (or --to VERSION)")):
        c = psub.add_parser(name, help=what + ": published.json, history.jsonl, announce")
        if name == "promote":
            c.add_argument("version", metavar="VERSION")
        else:
            c.add_argument("--to", dest="version", default=None, metavar="VERSION", help="roll back to this version")
        c.add_argument("--config", type=Path, default=None, help="YAML of jobs.pipeline.PipelineConfig")
        c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. artifacts=DIR publish.announce=false")
        c.set_defaults(func=_repoint, action=name)
    backfill.register(psub)


def _run(args: argparse.Namespace) -> int:
    cfg = load_pipeline_config(args.config, args.overrides)
    storage.configure(cfg.storage, os.environ)  # s3:// artifacts: endpoint, credentials from the named variables
    day = args.date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    backfill.day_ms(day, "--date")
    res = run_pipeline(cfg, args.version or day)
    print()
    print(f"version      {res.version}   gate {'passed' if res.passed else 'FAILED'}   "
          f"published {'yes' if res.published else 'no'}   {res.seconds:.0f}s")
    for reason in res.reasons:
        print(f"  - {reason}")
    if res.bundle:
        print(f"bundle       {res.bundle}")
    return 0 if res.passed else 3


def _status(args: argparse.Namespace) -> int:
    pub = read_published(args.artifacts)
    print(f"published    {pub['version'] + '  ' + pub['bundle'] if pub else '(none)'}")
    vdir = args.artifacts / "versions"
    for d in sorted(vdir.iterdir()) if vdir.is_dir() else []:
        m = json.loads((d / MANIFEST).read_text()) if (d / MANIFEST).is_file() else {"stages": {}}
        st = " ".join(f"{k}:{v.get('status')}" for k, v in m["stages"].items())
        ev = m["stages"].get("evaluate", {})
        gate = "" if "passed" not in ev else ("  gate passed" if ev["passed"] else "  gate FAILED")
        print(f"  {d.name:<24} {st}{gate}")
    return 0


def _repoint(args: argparse.Namespace) -> int:
    from jobs.promote import read_history, repoint, rollback_target

    cfg = load_pipeline_config(args.config, args.overrides, need_dataset=False)
    version = args.version
    if version is None:
        pub = read_published(Path(cfg.artifacts))
        version = rollback_target(read_history(Path(cfg.artifacts)), pub["version"] if pub else None)
    repoint(cfg, version, args.action)
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["pipeline", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
