"""Bundles announced by object-store URI (s3://) on a real S3-compatible server (moto_server): fetched into the
content-addressed cache and loaded; every refusal of a local bundle holds for a remote one, with the same reasons
(confinement to URI roots, '..', other schemes, checksums, unlisted files), and the served model stays."""
from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path

import pytest

from features import storage
from tests.serving.test_artifacts_hostile import rejected, resign

pytestmark = pytest.mark.integration


@pytest.fixture()
def remote(model_bundles, catalog, s3_bucket, tmp_path):
    """(manager serving v1 from s3, the artifacts root URI, an upload helper) with roots = [root] only."""
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import CatalogRef

    root = f"{s3_bucket}/artifacts"

    def upload(src: Path, name: str) -> str:
        uri = storage.join(root, "versions", name, "bundle")
        storage.upload_tree(src, uri, last=("manifest.json",))
        return uri

    cfg = ServingConfig()
    models = dataclasses.replace(cfg.models, allowed_roots=(root,), cache_dir=tmp_path / "cache")
    m = ModelManager(ModelHolder(), CatalogRef(catalog), cfg.state, models, ServingMetrics())
    path, checksum = model_bundles["v1"]
    m.load(upload(path, "v1"), "v1", checksum)
    return m, root, upload


def _copy(model_bundles, tmp_path) -> Path:
    dst = tmp_path / f"b-{uuid.uuid4().hex[:8]}"
    shutil.copytree(model_bundles["v1"][0], dst)
    return dst


def test_a_bundle_is_served_from_its_s3_uri_through_the_cache(remote, model_bundles, tmp_path):
    manager, root, _ = remote
    bundle = manager.holder.current
    assert bundle.version == "v1" and bundle.checksum == model_bundles["v1"][1]
    assert bundle.path == tmp_path / "cache" / model_bundles["v1"][1]  # content-addressed by the manifest sha256
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [model_bundles["v1"][1]]  # no partial copies


def test_a_redelivered_announcement_reuses_the_cached_copy(remote, model_bundles, tmp_path):
    manager, root, _ = remote
    again = manager.load(storage.join(root, "versions", "v1", "bundle"), "v1", model_bundles["v1"][1])
    assert again is manager.holder.current


@pytest.mark.parametrize("uri", ["{bucket}/elsewhere/v1/bundle", "{root}-evil/v1/bundle", "s3://other-bucket/artifacts/v1",
                                 "/tmp/local/bundle"])
def test_a_uri_outside_the_roots_is_refused(remote, s3_bucket, uri):
    manager, root, _ = remote
    assert rejected(manager, uri.format(bucket=s3_bucket, root=root)).reason == "uri_not_allowed"


@pytest.mark.parametrize("uri", ["{root}/versions/../../elsewhere/bundle", "{root}//versions/v1/bundle",
                                 "http://127.0.0.1:1/{root}", "ftp://bucket/artifacts/v1"])
def test_climbing_or_foreign_scheme_uris_are_refused(remote, uri):
    manager, root, _ = remote
    assert rejected(manager, uri.format(root=root)).reason == "unsupported_uri"


def test_a_wrong_announced_checksum_is_refused_before_any_model_file_is_fetched(remote, model_bundles, tmp_path):
    manager, root, upload = remote
    uri = upload(model_bundles["v2"][0], "v2")
    assert rejected(manager, uri, "0" * 64, "v2").reason == "checksum_mismatch"
    assert not (tmp_path / "cache" / model_bundles["v2"][1]).exists()


def test_an_object_replaced_after_signing_is_refused_and_the_bad_copy_evicted(remote, model_bundles, tmp_path):
    manager, root, upload = remote
    src = _copy(model_bundles, tmp_path)
    checksum = resign(src, lambda m: m.update(version="v7"))
    uri = upload(src, "v7")
    weights = next(k for k in json.loads((src / "manifest.json").read_text())["files"] if k.startswith("ranker/"))
    storage.write_bytes_atomic(storage.join(uri, weights), b"tampered")
    assert rejected(manager, uri, checksum, "v7").reason == "checksum_mismatch"
    assert not (tmp_path / "cache" / checksum).exists()  # the next announcement downloads it anew


def test_an_object_under_a_part_that_the_manifest_does_not_list_is_refused(remote, model_bundles, tmp_path):
    manager, root, upload = remote
    src = _copy(model_bundles, tmp_path)
    checksum = resign(src, lambda m: m.update(version="v8"))
    uri = upload(src, "v8")
    storage.write_bytes_atomic(storage.join(uri, "ranker", "extra.pt"), b"not checksummed")
    assert rejected(manager, uri, checksum, "v8").reason == "unlisted_file"


@pytest.mark.parametrize("bad", ["../../elsewhere/weights.pt", "/etc/passwd", "ranker/./w.pt", "ranker//w.pt"])
def test_a_manifest_naming_a_key_outside_the_bundle_is_refused(remote, model_bundles, tmp_path, bad):
    manager, root, upload = remote
    src = _copy(model_bundles, tmp_path)
    checksum = resign(src, lambda m: m["files"].update({bad: "0" * 64}))
    uri = upload(src, f"v9-{uuid.uuid4().hex[:6]}")
    assert rejected(manager, uri, checksum).reason == "unsafe_path"


def test_a_missing_bundle_is_refused(remote):
    manager, root, _ = remote
    assert rejected(manager, storage.join(root, "versions", "nope", "bundle")).reason == "missing_manifest"


def test_server_config_takes_uri_roots_and_refuses_climbing_ones():
    from features.config import ConfigError
    from serving.app import load_serving_config

    cfg = load_serving_config(None, ["models.allowed_roots=[s3://bucket/artifacts/, /srv/models]",
                                     "models.initial_bundle=s3://bucket/artifacts/versions/v1/bundle"], env={})
    assert cfg.models.allowed_roots == ("s3://bucket/artifacts", Path("/srv/models"))
    with pytest.raises(ConfigError, match=r"models.allowed_roots\[0\].*segment"):
        load_serving_config(None, ["models.allowed_roots=[s3://bucket/a/../b]"], env={})


def test_the_pipeline_gate_fetches_an_s3_published_bundle_checked_against_the_pointer(remote, model_bundles, tmp_path):
    from jobs.pipeline import PipelineConfig, Run

    _, root, upload = remote
    run = Run(PipelineConfig(dataset="unused", artifacts=root, workdir=str(tmp_path / "work")), "v2", lambda s: None)
    uri = storage.join(root, "versions", "v1", "bundle")
    bdir = run._published_bundle({"bundle": uri, "checksum": model_bundles["v1"][1]})
    assert (bdir / "retriever").is_dir() and bdir.parent == tmp_path / "work" / "bundle-cache"
    src = _copy(model_bundles, tmp_path)
    checksum = resign(src, lambda m: m.update(version="v3"))
    uri3 = upload(src, "v3")
    weights = next(k for k in json.loads((src / "manifest.json").read_text())["files"] if k.startswith("retriever/"))
    storage.write_bytes_atomic(storage.join(uri3, weights), b"tampered")
    with pytest.raises(ValueError, match="does not match its manifest checksum"):
        run._published_bundle({"bundle": uri3, "checksum": checksum})
