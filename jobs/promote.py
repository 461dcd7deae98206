"""`cascade pipeline promote|rollback`: make a version published before the published one again.

Its bundle must still pass the server's own verification; ARTIFACTS/published.json is replaced atomically,
a record is appended to history.jsonl and the version is announced as `publish` does (`jobs.pipeline`).
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Callable, Literal

from features import storage
from jobs.pipeline import HISTORY, PipelineConfig, read_published, record_published


def read_history(artifacts: Path) -> list[dict[str, Any]]:
    """Every record of ARTIFACTS/history.jsonl, oldest first (a publish, promote or rollback each)."""
    p = Path(artifacts) / HISTORY
    records = []
    for i, line in enumerate(p.read_text().splitlines() if p.is_file() else [], 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not a JSON history record ({e})") from None
    return records


def rollback_target(history: list[dict[str, Any]], current: str | None) -> str:
    """The version published before the current one, skipping versions that were rolled back from (until
    published or promoted again), so repeated rollbacks walk back instead of alternating between two."""
    rolled_back: set[str] = set()
    for rec in history:
        if rec.get("action") == "rollback":
            rolled_back.add(rec.get("rolled_back_from", ""))
        else:
            rolled_back.discard(rec["version"])
    for rec in reversed(history):
        if rec["version"] != current and rec["version"] not in rolled_back:
            return rec["version"]
    raise ValueError(f"nothing to roll back to: history.jsonl has no version published before {current}")


def repoint(cfg: PipelineConfig, version: str, action: Literal["promote", "rollback"],
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """Makes `version` the published one again (`cascade pipeline promote|rollback`).

    The version must have been published before (a record in history.jsonl) and its bundle must still pass
    the server's checksum verification (`serving.models.verify_bundle`: the manifest's sha256 equals the
    recorded one, every file its listed sha256). ARTIFACTS/published.json is replaced atomically, a record
    is appended to history.jsonl and the bundle is announced on the models topic as `publish` does, so the
    servers verify, smoke-test and hot-swap it through their normal path.
    """
    from features.transforms import DenseLayout
    from serving.errors import ArtifactError
    from serving.models import MANIFEST as BUNDLE_MANIFEST
    from serving.models import verify_bundle

    if storage.is_remote(cfg.artifacts):
        raise ValueError(f"pipeline {action}: artifacts {cfg.artifacts} are on an object store; promote and rollback "
                         f"read and verify local bundles only (publish a fresh run, or {action} from a local mirror)")
    root = Path(cfg.artifacts)
    history = read_history(root)
    records = [r for r in history if r["version"] == version]
    if not records:
        known = sorted({r["version"] for r in history})
        raise ValueError(f"version {version!r} was never published under {root} (published versions: "
                         f"{', '.join(known) if known else 'none'})")
    rec = records[-1]
    bundle = Path(rec["bundle"])
    try:
        manifest = json.loads((bundle / BUNDLE_MANIFEST).read_text())
        stats = DenseLayout.from_manifest(manifest.get("features", {})).stats
        verify_bundle(bundle, rec["checksum"], version, stats, retention_ms=2**62)
    except (OSError, ValueError, KeyError, ArtifactError) as e:
        raise ValueError(f"version {version}: its bundle {bundle} fails verification, not {action}d: {e}") from None
    current = read_published(root)
    pointer = {"version": version, "bundle": rec["bundle"], "checksum": rec["checksum"],
               "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "metrics": rec.get("metrics"), "action": action,
               **({"rolled_back_from": current["version"]} if action == "rollback" and current else {})}
    record_published(root, pointer)
    say(f"published    {version} ({action}; was {current['version'] if current else 'none'})")
    pc = cfg.publish
    if pc.announce:
        from serving.models import announce_bundle
        from serving.security import kafka_client_kwargs

        ann = announce_bundle(bundle, pc.kafka_bootstrap, pc.models_topic, client_kwargs=kafka_client_kwargs(pc))
        say(f"announced    {ann.version} on {pc.models_topic} ({pc.kafka_bootstrap})")
    else:
        say("announce     off (publish.announce=false): servers load it on their next start or announcement")
    return pointer


