"""Hostile model bundles: whatever a manifest or an artifact store holds, loading it is a rejection with a
reason (and a metric), never an exception of another kind, never a file from outside the bundle, and the
served model stays. Real exports of real models (conftest `model_bundles`), mutated per case and re-signed
so that each case reaches the check it is about instead of stopping at a checksum."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.errors import ArtifactError

HYPO = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _resign_exports(bundle: Path) -> None:
    """Re-pins the parts' own export manifests ({"files": {name: sha256}}) to the files as they are now."""
    for part in ("retriever", "ranker"):
        m = bundle / part / "manifest.json"
        if m.is_file() and not m.is_symlink():
            data = json.loads(m.read_text())
            data["files"] = {n: _sha(m.parent / n) for n in data.get("files", {}) if (m.parent / n).is_file()}
            m.write_text(json.dumps(data))


def resign(bundle: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Recomputes every listed checksum (exports first), applies `edit` to the manifest, writes it; -> its sha256."""
    _resign_exports(bundle)
    mpath = bundle / "manifest.json"
    manifest = json.loads(mpath.read_text())
    files = {}
    for dirpath, _, names in os.walk(bundle, followlinks=False):
        for name in names:
            p = Path(dirpath) / name
            if p != mpath and p.is_file() and not p.is_symlink():
                files[str(p.relative_to(bundle))] = _sha(p)
    manifest["files"] = dict(sorted(files.items()))
    if edit is not None:
        edit(manifest)
    data = json.dumps(manifest).encode()
    mpath.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture()
def copy_bundle(model_bundles, hostile_root: Path) -> Callable[[], Path]:
    def make() -> Path:
        dst = hostile_root / f"b-{uuid.uuid4().hex[:10]}"
        shutil.copytree(model_bundles["v1"][0], dst, symlinks=True)
        return dst

    return make


@pytest.fixture(scope="module")
def manager(model_bundles, catalog, hostile_root: Path):
    """A ModelManager serving v1, with the model roots limited to the fixtures' and this module's directories."""
    import dataclasses

    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import CatalogRef

    cfg = ServingConfig()
    models = dataclasses.replace(cfg.models, allowed_roots=(model_bundles["v1"][0].parent, hostile_root))
    m = ModelManager(ModelHolder(), CatalogRef(catalog), cfg.state, models, ServingMetrics())
    path, checksum = model_bundles["v1"]
    m.load(path, "v1", checksum)
    return m


def rejected(manager, path: Path | str, checksum: str | None = None, version: str | None = None) -> ArtifactError:
    """Loads and expects a rejection: an ArtifactError with a reason, counted, and v1 still served."""
    before = manager.holder.current
    with pytest.raises(ArtifactError) as info:
        manager.load(path, version, checksum)
    e = info.value
    assert e.reason and e.detail
    assert manager.holder.current is before and before.version == "v1"
    counted = manager.metrics.registry.get_sample_value("cascade_model_rejections_total", {"reason": e.reason})
    assert counted is not None and counted >= 1
    return e


def rejected_or_loaded(manager, path: Path, checksum: str) -> ArtifactError | None:
    """For inputs that may happen to be valid: a rejection, or a load (then v1 is put back); nothing else."""
    v1 = manager.holder.current
    try:
        manager.load(path, None, checksum)
    except ArtifactError as e:
        assert e.reason and manager.holder.current is v1
        return e
    manager.holder.swap(v1)
    return None


# ------------------------------------------------------------------------------------------ paths


def test_part_path_outside_the_bundle_is_refused(manager, copy_bundle, hostile_root: Path) -> None:
    b = copy_bundle()
    outside = hostile_root / f"outside-{uuid.uuid4().hex[:6]}"
    shutil.copytree(b / "ranker", outside)  # a perfectly good export, but not this bundle's
    for bad in (f"../{outside.name}", str(outside)):
        sha = resign(b, lambda m: m["ranker"].update(path=bad))
        assert rejected(manager, b, sha).reason == "unsafe_path"


def test_files_entry_outside_the_bundle_is_refused(manager, copy_bundle) -> None:
    b = copy_bundle()
    sha = resign(b, lambda m: m["files"].update({"../../../../etc/hostname": "0" * 64}))
    assert rejected(manager, b, sha).reason == "unsafe_path"


def test_symlink_out_of_the_bundle_is_refused_even_with_the_right_checksum(manager, copy_bundle, hostile_root) -> None:
    b = copy_bundle()
    weights = b / "ranker" / "weights.pt"
    outside = hostile_root / f"weights-{uuid.uuid4().hex[:6]}.pt"
    shutil.copy(weights, outside)  # same bytes, same sha256: only the location is wrong
    weights.unlink()
    weights.symlink_to(outside)
    sha = resign(b, lambda m: m["files"].update({"ranker/weights.pt": _sha(outside)}))
    e = rejected(manager, b, sha)
    assert e.reason == "unsafe_path" and "outside the bundle" in e.detail


def test_unlisted_file_in_a_part_is_refused(manager, copy_bundle) -> None:
    b = copy_bundle()
    resign(b)
    (b / "retriever" / "extra.bin").write_bytes(b"not checksummed")
    mpath = b / "manifest.json"
    e = rejected(manager, b, _sha(mpath))
    assert e.reason == "unlisted_file" and "extra.bin" in e.detail


def test_symlinked_directory_in_a_part_is_refused(manager, copy_bundle) -> None:
    b = copy_bundle()
    (b / "ranker" / "loop").symlink_to(b, target_is_directory=True)
    sha = resign(b)
    assert rejected(manager, b, sha).reason == "unsafe_path"


def test_bundle_uri_outside_the_allowed_roots_is_refused(manager, model_bundles, tmp_path: Path) -> None:
    elsewhere = tmp_path / "v1"
    shutil.copytree(model_bundles["v1"][0], elsewhere)
    assert rejected(manager, elsewhere, model_bundles["v1"][1]).reason == "uri_not_allowed"
    # a symlink placed under an allowed root that points elsewhere is elsewhere
    link = manager.cfg.allowed_roots[1] / f"link-{uuid.uuid4().hex[:6]}"
    link.symlink_to(elsewhere, target_is_directory=True)
    assert rejected(manager, link, model_bundles["v1"][1]).reason == "uri_not_allowed"
    for uri in ("", "s3://bucket/v1", "file://\x00"):
        assert rejected(manager, uri).reason in {"unsupported_uri", "uri_not_allowed"}


PATH_PIECES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                      max_size=12)


@st.composite
def escaping_paths(draw) -> str:
    """Relative paths that climb out of the bundle, or absolute paths."""
    tail = "/".join(draw(st.lists(PATH_PIECES, min_size=1, max_size=3)))
    if draw(st.booleans()):
        return "/" + tail
    inner = draw(st.lists(st.sampled_from(["retriever", "ranker", "a", "."]), max_size=2))
    return "/".join([*inner, *[".."] * (len([p for p in inner if p != "."]) + draw(st.integers(1, 4))), tail])


@HYPO
@given(bad=escaping_paths(), where=st.sampled_from(["files", "retriever", "ranker"]))
def test_any_escaping_path_in_the_manifest_is_a_rejection(manager, model_bundles, hostile_root, bad, where) -> None:
    b = hostile_root / f"p-{uuid.uuid4().hex[:10]}"
    shutil.copytree(model_bundles["v1"][0], b)

    def edit(m: dict[str, Any]) -> None:
        if where == "files":
            m["files"][bad] = "0" * 64
        else:
            m[where]["path"] = bad

    sha = resign(b, edit)
    assert rejected(manager, b, sha).reason in {"unsafe_path", "missing_file"}
    shutil.rmtree(b)


@HYPO
@given(victim=st.sampled_from(["retriever/model.pt", "retriever/index.faiss", "ranker/weights.pt", "ranker/config.json"]),
       target=st.sampled_from(["outside_file", "outside_dir", "manifest", "dev_zero", "dangling", "root", "parent"]),
       listed=st.booleans())
def test_any_symlink_swapped_into_a_part_is_a_rejection(manager, model_bundles, hostile_root, victim, target, listed):
    """A file of a part replaced by a symlink to anywhere (listed in the manifest with the target's checksum, or
    not listed): out of the bundle, a directory, an unlisted file, a device, nothing -> a rejection."""
    b = hostile_root / f"s-{uuid.uuid4().hex[:10]}"
    shutil.copytree(model_bundles["v1"][0], b)
    f = b / victim
    outside = hostile_root / f"o-{uuid.uuid4().hex[:6]}"
    shutil.copy(f, outside)
    dest = {"outside_file": outside, "outside_dir": hostile_root, "manifest": b / "manifest.json",
            "dev_zero": Path("/dev/zero"), "dangling": b / "nothing-here", "root": b, "parent": b.parent}[target]
    f.unlink()
    f.symlink_to(dest)
    digest = _sha(outside) if dest.is_file() and target != "dev_zero" else "0" * 64
    sha = resign(b, (lambda m: m["files"].update({victim: digest})) if listed else None)
    assert rejected(manager, b, sha).reason in {"unsafe_path", "unlisted_file", "missing_file", "checksum_mismatch"}
    shutil.rmtree(b)
    outside.unlink()


# ------------------------------------------------------------------------------------------ contents


def test_missing_and_modified_files_are_refused(manager, copy_bundle) -> None:
    b = copy_bundle()
    sha = resign(b)
    (b / "retriever" / "item_ids.npy").unlink()
    assert rejected(manager, b, sha).reason == "missing_file"
    b = copy_bundle()
    sha = resign(b)
    with open(b / "ranker" / "weights.pt", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert rejected(manager, b, sha).reason == "checksum_mismatch"


def test_a_ranker_reading_vectors_of_another_dimension_than_its_retriever_is_refused(manager, copy_bundle) -> None:
    """A second stage whose `model.retrieval_products` is not its bundle's retriever's dimension (a pair exported
    apart), checksums all good: refused at load, before it could answer with misaligned features."""
    b = copy_bundle()
    cfg_path = b / "ranker" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    retriever_dim = json.loads((b / "retriever" / "config.json").read_text())["model"]["dim"]
    cfg["model"].update(residual_column=0, retrieval_products=1 if retriever_dim != 1 else 2)
    cfg_path.write_text(json.dumps(cfg))
    e = rejected(manager, b, resign(b))
    assert e.reason == "schema" and "retriever vector terms" in e.detail


def test_a_similarity_window_beyond_the_rankers_history_is_refused(manager, copy_bundle) -> None:
    """A ranker config asking for the similarities over a billion behaviors would make every request allocate for
    them: refused at load."""
    b = copy_bundle()
    cfg_path = b / "ranker" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"].update(residual_column=0, retrieval_similarity=10**9)
    cfg_path.write_text(json.dumps(cfg))
    e = rejected(manager, b, resign(b))
    assert e.reason == "load_failed" and "retrieval_similarity" in e.detail


@pytest.fixture(scope="module")
def item_item_bundle(catalog, hostile_root: Path) -> Path:
    """A second-stage bundle whose ranker reads item-item features (a model fitted on random timelines of catalog
    items, over the last 10 behaviors)."""
    import numpy as np

    from features.item_item import ItemItem
    from tests.serving.conftest import write_real_bundle

    rng = np.random.default_rng(0)
    items = rng.choice(catalog.item_ids[:300], size=(200, 10))
    model = ItemItem.fit(np.arange(0, 2000, 10), items.ravel(), np.full(200, 10), lam=5.0, k=8)
    return write_real_bundle(catalog, hostile_root / "item-item", "ii-v1", seed=3, second_stage=True, item_item=model,
                             item_item_history=10)[0]


def _item_item_copy(item_item_bundle: Path, hostile_root: Path) -> Path:
    dst = hostile_root / f"ii-{uuid.uuid4().hex[:10]}"
    shutil.copytree(item_item_bundle, dst)
    return dst


def _nan_weights(data: bytes) -> bytes:
    import io

    import numpy as np

    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["weights"][0, 0] = np.nan
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


@pytest.mark.parametrize("how", ["truncated", "junk", "nan_weights", "history_1e9", "unlisted"])
def test_a_bad_item_item_model_signed_as_good_is_refused(manager, item_item_bundle, hostile_root, how) -> None:
    """The item-item model a second stage reads, however it is bad (checksums re-signed so the model's own checks
    are reached): a load_failed rejection naming it, and the served model stays; the good copy loads."""
    b = _item_item_copy(item_item_bundle, hostile_root)
    assert rejected_or_loaded(manager, b, resign(b)) is None
    f = b / "ranker" / "item_item.npz"
    data = f.read_bytes()
    if how == "truncated":
        f.write_bytes(data[: len(data) // 3])
    elif how == "junk":
        f.write_bytes(os.urandom(len(data)))
    elif how == "nan_weights":
        f.write_bytes(_nan_weights(data))
    else:
        cfg_path = b / "ranker" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if how == "history_1e9":  # a window every request would allocate for
            cfg["item_item"]["history"] = 10**9
        else:  # config.json reads the model; the export's manifest no longer lists it
            m = json.loads((b / "ranker" / "manifest.json").read_text())
            del m["files"]["item_item.npz"]
            (b / "ranker" / "manifest.json").write_text(json.dumps(m))
        cfg_path.write_text(json.dumps(cfg))
    e = rejected(manager, b, resign(b))
    assert e.reason == "load_failed" and "item_item" in e.detail, e


def test_announcement_checksum_and_version_must_match(manager, copy_bundle) -> None:
    b = copy_bundle()
    sha = resign(b)
    assert rejected(manager, b, "f" * 64).reason == "checksum_mismatch"
    assert rejected(manager, b, sha, version="v9").reason == "version_mismatch"


@HYPO
@given(part=st.sampled_from(["retriever/model.pt", "ranker/weights.pt", "retriever/index.faiss",
                             "retriever/item_ids.npy", "retriever/config.json", "ranker/config.json"]),
       keep=st.floats(0.0, 0.99))
def test_truncated_artifacts_signed_as_good_are_rejected(manager, model_bundles, hostile_root, part, keep) -> None:
    """A truncated torch/numpy/faiss/JSON file with correct checksums everywhere: the loader fails, we reject."""
    b = hostile_root / f"t-{uuid.uuid4().hex[:10]}"
    shutil.copytree(model_bundles["v1"][0], b)
    f = b / part
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    sha = resign(b)
    assert rejected(manager, b, sha).reason in {"load_failed", "smoke_failed"}
    shutil.rmtree(b)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                    max_leaves=30)
MANIFEST_KEYS = ["format", "version", "schema_version", "hash_spec_version", "features", "retriever", "ranker", "files"]


@HYPO
@given(junk=st.dictionaries(st.sampled_from(MANIFEST_KEYS), JSON, max_size=8), keep_rest=st.booleans())
def test_random_manifest_structures_are_rejected(manager, model_bundles, hostile_root, junk, keep_rest) -> None:
    """Random JSON under the manifest's own keys, over a real manifest (a rejection, or a load when the values
    happen to be valid) or alone (always a rejection): never an exception of another kind."""
    b = hostile_root / f"j-{uuid.uuid4().hex[:10]}"
    shutil.copytree(model_bundles["v1"][0], b)
    manifest = json.loads((b / "manifest.json").read_text()) if keep_rest else {}
    manifest.update(junk)
    data = json.dumps(manifest).encode()
    (b / "manifest.json").write_bytes(data)
    if keep_rest:
        rejected_or_loaded(manager, b, hashlib.sha256(data).hexdigest())
    else:
        rejected(manager, b, hashlib.sha256(data).hexdigest())
    shutil.rmtree(b)


@HYPO
@given(raw=st.binary(max_size=300) | st.just(b"[" * 100_000 + b"]" * 100_000) | st.just(b'{"a":' * 50_000))
def test_manifest_bytes_of_any_kind_are_rejected(manager, hostile_root, raw) -> None:
    b = hostile_root / f"r-{uuid.uuid4().hex[:10]}"
    b.mkdir()
    (b / "manifest.json").write_bytes(raw)
    rejected(manager, b, None)
    shutil.rmtree(b)


def test_manifest_that_is_a_symlink_out_or_missing_is_rejected(manager, hostile_root, model_bundles) -> None:
    b = hostile_root / f"m-{uuid.uuid4().hex[:10]}"
    b.mkdir()
    assert rejected(manager, b).reason == "missing_manifest"
    (b / "manifest.json").symlink_to(model_bundles["v1"][0] / "manifest.json")
    assert rejected(manager, b).reason == "unsafe_path"


# ------------------------------------------------------------------------------------------ any exception


class _Boom(Exception):
    def __str__(self) -> str:
        raise RuntimeError("even the message fails")


ERRORS = [ValueError("v"), KeyError("k"), RuntimeError("r"), MemoryError(), RecursionError("deep"),
          __import__("pickle").UnpicklingError("bad pickle"), EOFError(), OSError(5, "io"), _Boom()]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("stage", ["load", "smoke"])
def test_any_exception_while_loading_or_smoke_testing_is_a_rejection(manager, copy_bundle, monkeypatch, error, stage):
    """A loader (or the loaded model during the smoke inference) raising anything: rejected, v1 kept."""
    from serving import models

    real = models.RETRIEVER_LOADERS["retrieval.export"]

    class Raising:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def user_embedding(self, batch: Any) -> Any:
            raise error

    def loader(path: Path) -> Any:
        if stage == "load":
            raise error
        return Raising(real(path))

    monkeypatch.setitem(models.RETRIEVER_LOADERS, "test.raising", loader)
    b = copy_bundle()
    sha = resign(b, lambda m: m["retriever"].update(loader="test.raising"))
    e = rejected(manager, b, sha)
    assert e.reason == ("load_failed" if stage == "load" else "smoke_failed")
    assert type(error).__name__ in e.detail


@pytest.mark.parametrize("how", ["same_bytes_new_file", "append", "new_file_in_part"])
def test_a_file_changed_while_loading_is_a_rejection(manager, copy_bundle, monkeypatch, how: str) -> None:
    """The store changing under the loader (after checksumming, before the swap) is caught, even when the
    replacement holds the same bytes: what was loaded must be exactly what was checksummed."""
    from serving import models

    real = models.RETRIEVER_LOADERS["retrieval.export"]

    def loader(path: Path) -> Any:
        weights = path.parent / "ranker" / "weights.pt"
        if how == "same_bytes_new_file":
            tmp = weights.with_suffix(".swap")
            shutil.copy(weights, tmp)
            os.replace(tmp, weights)  # identical content, another file
        elif how == "append":
            with open(weights, "ab") as f:
                f.write(b"\0")
        else:
            (path / "late.bin").write_bytes(b"x")
        return real(path)

    monkeypatch.setitem(models.RETRIEVER_LOADERS, "test.racing", loader)
    b = copy_bundle()
    sha = resign(b, lambda m: m["retriever"].update(loader="test.racing"))
    e = rejected(manager, b, sha)
    assert e.reason in {"modified_during_load", "unlisted_file", "load_failed", "smoke_failed"}
    if how != "append":  # appending may already break the ranker's own load
        assert e.reason in {"modified_during_load", "unlisted_file"}


def test_a_good_copy_loads_after_all_that(manager, copy_bundle) -> None:
    """The checks refuse what is wrong, not everything: a faithful, re-signed copy loads and is served."""
    b = copy_bundle()
    sha = resign(b, lambda m: m.update(version="v1-copy"))
    bundle = manager.load(b, "v1-copy", sha)
    assert manager.holder.current is bundle and bundle.version == "v1-copy"


# ------------------------------------------------------------------------------------------ roots at start


def test_server_refuses_to_start_without_model_roots(services) -> None:
    from serving.app import ServingApp, load_serving_config

    cfg = load_serving_config(None, [f"redis.url={services.redis.address}"], env={})
    with pytest.raises(ValueError, match=r"models\.allowed_roots is empty.*allow_any_root"):
        ServingApp(cfg)
    dev = load_serving_config(None, [f"redis.url={services.redis.address}", "models.allow_any_root=true"], env={})
    ServingApp(dev).store.close()
    rooted = load_serving_config(None, [f"redis.url={services.redis.address}", "models.allowed_roots=[/srv/models]"],
                                 env={})
    ServingApp(rooted).store.close()


# ------------------------------------------------------------------------------------------ through Kafka


@pytest.mark.integration
def test_hostile_announcement_is_refused_and_the_old_model_keeps_answering(make_server, model_bundles, hostile_root,
                                                                            wait_until) -> None:
    from serving.models import announce_bundle

    roots = json.dumps([str(model_bundles["v1"][0].parent), str(hostile_root)])
    h = make_server(**{"models.allowed_roots": roots, "models.allow_any_root": "false"})
    assert h.rank(1).model_version == "v1"

    outside = hostile_root / f"steal-{uuid.uuid4().hex[:6]}"
    shutil.copytree(model_bundles["v2"][0] / "ranker", outside)
    b = hostile_root / f"k-{uuid.uuid4().hex[:10]}"
    shutil.copytree(model_bundles["v2"][0], b)
    resign(b, lambda m: m.update(version="evil") or m["ranker"].update(path=f"../{outside.name}"))
    announce_bundle(b, h.bootstrap, h.topics.models)

    wait_until(lambda: h.metric("cascade_model_rejections_total", {"reason": "unsafe_path"}) >= 1,
               what="the hostile announcement rejected")
    assert h.rank(1).model_version == "v1"
    # the models consumer is alive: a good announcement afterwards is applied
    announce_bundle(model_bundles["v2"][0], h.bootstrap, h.topics.models)
    wait_until(lambda: h.rank(1).model_version == "v2", what="v2 swapped in after the refused one")
    assert os.path.isdir(outside)
