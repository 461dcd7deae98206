"""The model-bundle boundary: what a servable model version is, how it is loaded, checked and swapped.

A bundle is a version directory::

    <root>/<version>/manifest.json     {"format": "cascade.model-bundle/1", "version", "created_at",
                                        "schema_version", "hash_spec_version",
                                        "features": {"config": {"stats": ...}, "dense": {...}},
                                        "retriever": {"loader", "path"}, "ranker": {"loader", "path"},
                                        "files": {relpath: sha256}}
    <root>/<version>/retriever/...     the retriever's export (weights via torch.save(state_dict), .npy, faiss index)
    <root>/<version>/ranker/...        the ranker's export

The `models` topic announces ``{version, uri, checksum}`` where checksum is
the sha256 of ``manifest.json``; the manifest pins every file's sha256, so the
announcement pins the whole bundle. The URI is a directory or an object-store
URI (s3://...): the latter is first copied into a local cache, manifest first,
by `fetch_bundle`, and the copy goes through the same checks. Loading = verify the manifest checksum,
every file's checksum, the schema (hash spec, schema version, the dense
feature layout against what the online state keeps), load with restricted
loaders only (``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)``,
JSON, faiss), then a smoke inference through the full request path. Only a
bundle that passed all of it replaces the served one (`ModelHolder.swap`, a
single reference assignment: a request uses the bundle it started with).

Loaders are looked up by name (``"loader"`` in the manifest) and are the
exporters' own: ``retrieval.export`` and ``ranking.export``. No model code lives
in serving/.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch

from features import storage
from features.batch import Batch
from features.datasets.common import sha256_file
from features.hashing import HASH_SPEC_VERSION
from features.schema import SCHEMA_VERSION
from features.transforms import DenseLayout, StatsConfig
from serving.errors import ArtifactError
from serving.index import ItemIndex

BUNDLE_FORMAT = "cascade.model-bundle/1"
MANIFEST = "manifest.json"


class ServableRetriever(Protocol):
    """What serving needs from a retriever export (`retrieval.inference.RetrieverInference` implements it)."""

    item_ids: np.ndarray  # (N,) ids in its exported index
    dim: int

    def user_embedding(self, batch: Batch) -> torch.Tensor:
        """(B, D) L2-normalized user vectors."""
        ...

    def item_embedding(self, candidates: Any) -> torch.Tensor:
        """Item tower on a candidates KeyedJaggedTensor (item_id, item_category, ...) -> (N, D)."""
        ...

    def search(self, user_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) -> (ids (B, k) int64, scores (B, k) float32) over its exported index."""
        ...


class ServableRanker(Protocol):
    """What serving needs from a ranker export (`ranking.inference.RankerInference` implements it)."""

    def forward(self, batch: Batch) -> torch.Tensor:
        """(N,) probabilities for the batch's candidates."""
        ...

    # Optional: `behavior_signatures(item_ids: np.ndarray) -> np.ndarray` (packed int64 SDIM codes)
    # when the ranker has an SDIM module; computed at ingest and stored beside the sequence.
    # Optional with it: `sums_window: int` and `bucket_sums(item_ids, categories, actions, signatures) ->
    # (sums (m, K, D) float32, counts (m, K) int32)`: SDIM's bucket sums, kept at ingest beside the sequence
    # (tagged with the bundle's sig_spec) and sent to the ranker as `Batch.sdim_sums`.


Loader = Callable[[Path], Any]


def _lazy(module: str, func: str) -> Loader:
    def load(path: Path) -> Any:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ArtifactError("loader_unavailable", f"{module} cannot be imported ({e})") from None
        return getattr(mod, func)(path)

    return load


RETRIEVER_LOADERS: dict[str, Loader] = {
    "retrieval.export": _lazy("retrieval.export", "load_retriever"),
}
RANKER_LOADERS: dict[str, Loader] = {
    "ranking.export": _lazy("ranking.export", "load_ranker"),
}


def write_bundle(out: Path, version: str, retriever: tuple[str, Path], ranker: tuple[str, Path],
                 features: DenseLayout, extra: Mapping[str, Any] | None = None) -> str:
    """Assembles a bundle directory from two exports; returns the manifest checksum (for the announcement).

    retriever / ranker: (loader name, export directory), copied to ``retriever/`` and ``ranker/``.
    features: the dense layout the ranker was trained with (``DenseLayout.from_manifest`` of the
    features manifest); written as the bundle's ``features`` entry by `DenseLayout.to_manifest`.
    """
    if not isinstance(features, DenseLayout):
        raise TypeError(f"features must be a DenseLayout (DenseLayout.from_manifest of the features manifest), "
                        f"got {type(features).__name__}")
    out = Path(out)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds a bundle; versions are immutable, pick a new version")
    out.mkdir(parents=True, exist_ok=True)
    parts = {}
    for name, (loader, src) in (("retriever", retriever), ("ranker", ranker)):
        if loader not in (RETRIEVER_LOADERS if name == "retriever" else RANKER_LOADERS):
            raise ValueError(f"unknown {name} loader {loader!r}")
        shutil.copytree(src, out / name, dirs_exist_ok=False)
        parts[name] = {"loader": loader, "path": name}
    files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {
        "format": BUNDLE_FORMAT, "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "schema_version": SCHEMA_VERSION, "hash_spec_version": HASH_SPEC_VERSION,
        "features": features.to_manifest(), **parts, "files": files, **dict(extra or {}),
    }
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (out / MANIFEST).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def announce_bundle(bundle: Path | str, bootstrap: str, topic: str, timeout_s: float = 30.0,
                    client_kwargs: Mapping[str, Any] | None = None) -> "ModelAnnouncement":
    """Sends a bundle's version, URI and manifest checksum on the models topic (acks=all).

    bundle: a bundle directory, or the object-store URI the pipeline published it to (s3://...).

    client_kwargs: extra KafkaProducer options, e.g. `serving.security.kafka_client_kwargs` (SASL / SSL)."""
    from kafka import KafkaProducer

    from features.messages import ModelAnnouncement

    if storage.is_remote(bundle):  # an object-store bundle is announced by its URI
        uri = storage.check_location(bundle, "bundle")
        data = storage.read_bytes(storage.join(uri, MANIFEST))
    else:
        manifest = Path(bundle) / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} does not exist: is {bundle} a model bundle directory?")
        uri, data = str(Path(bundle).resolve()), manifest.read_bytes()
    version = json.loads(data)["version"]
    ann = ModelAnnouncement(version=version, uri=uri, checksum=hashlib.sha256(data).hexdigest())
    prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **dict(client_kwargs or {}))
    try:
        prod.send(topic, key=version.encode(), value=ann.encode()).get(timeout=timeout_s)
    finally:
        prod.close()
    return ann


@dataclass
class ModelBundle:
    version: str
    path: Path
    checksum: str
    manifest: Mapping[str, Any]
    retriever: ServableRetriever
    ranker: ServableRanker
    index: ItemIndex
    dense: DenseLayout
    sig_spec: int  # 0: the ranker has no SDIM signatures
    user_keys: tuple[str, ...] = ("user_id",)  # user features the two models read (absent ones sent empty)
    loaded_at: float = field(default_factory=time.time)
    # (sorted item ids, their signatures): one tuple, replaced by a single assignment (copy-on-write)
    _sig: tuple[np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.empty(0, np.int64), np.empty(0, np.int64)), repr=False)
    _sig_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # (item, category, action) -> (D,) behavior value for the consumer's incremental SDIM sums, bounded
    _values: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def signatures(self, item_ids: np.ndarray) -> np.ndarray:
        """Packed SDIM signatures of items; cached per item (they depend on the item and the model only)."""
        ids = np.asarray(item_ids, np.int64)
        cids, cvals = self._sig
        pos = np.searchsorted(cids, ids)
        hit = pos < len(cids)
        hit[hit] = cids[pos[hit]] == ids[hit]
        if hit.all():
            return cvals[pos]
        missing = np.unique(ids[~hit])
        sigs = np.asarray(self.ranker.behavior_signatures(missing), np.int64)
        with self._sig_lock:
            cids, cvals = self._sig
            merged, vals = np.concatenate([cids, missing]), np.concatenate([cvals, sigs])
            order = np.argsort(merged, kind="stable")
            merged, vals = merged[order], vals[order]
            keep = np.r_[True, merged[1:] != merged[:-1]]
            self._sig = (merged[keep], vals[keep])
        return self.signatures(ids)

    @property
    def sums_window(self) -> int:
        """W: the ranker's SDIM bucket sums cover the last W behaviors; 0 when it keeps none. The sums a
        user record holds belong to this bundle when their spec is `sig_spec` (a hash of the ranker's files)."""
        if not self.sig_spec or not callable(getattr(self.ranker, "bucket_sums", None)):
            return 0
        return int(self.ranker.sums_window)

    def bucket_sums(self, item_ids: np.ndarray, categories: np.ndarray, actions: np.ndarray,
                    signatures: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """SDIM bucket sums of a user's (or, with `lengths`, users') last `sums_window` behaviors
        (`serving.state.update.SdimSource`)."""
        return self.ranker.bucket_sums(item_ids, categories, actions, signatures, lengths)

    def signature_codes(self, signatures: np.ndarray) -> np.ndarray:
        """(K,) packed signatures -> (K, m) codes."""
        return self.ranker.signature_codes(signatures)

    def behavior_values(self, item_ids: np.ndarray, categories: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(K, D) float32 behavior values for the consumer's incremental sums; cached per (item, category,
        action) (they depend on those and the model only), so a warm consumer does not call the model."""
        keys = list(zip(np.asarray(item_ids).tolist(), np.asarray(categories).tolist(), np.asarray(actions).tolist()))
        if not keys:
            return np.zeros((0, self.ranker.sums_shape[2]), np.float32)
        cache = self._values
        missing = [k for k in dict.fromkeys(keys) if k not in cache]
        got: dict[tuple[int, int, int], np.ndarray] = {}
        if missing:
            arr = np.asarray(missing, np.int64)
            got = dict(zip(missing, np.asarray(self.ranker.behavior_values(arr[:, 0], arr[:, 1], arr[:, 2]),
                                               np.float32)))
        out = np.stack([got[k] if k in got else cache[k] for k in keys])
        if got:
            if len(cache) + len(got) > VALUE_CACHE_LIMIT:
                cache.clear()  # bounded: a catalog x actions larger than the limit is looked up again
            cache.update(got)
        return out

    def warm_signatures(self, item_ids: np.ndarray, chunk: int = 65536) -> None:
        if not self.sig_spec:
            return
        for s in range(0, len(item_ids), chunk):
            self.signatures(item_ids[s:s + chunk])


VALUE_CACHE_LIMIT = 1 << 20  # cached SDIM behavior values per bundle (~200 B each)
MAX_MANIFEST_BYTES = 16 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def _inside(root: Path, rel: object, what: str) -> Path:
    """`root / rel` after every symlink, refused unless it stays inside `root` (already a realpath)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ArtifactError("unsafe_path", f"{what}: {rel!r} is not a non-empty relative path")
    if os.path.isabs(rel):
        raise ArtifactError("unsafe_path", f"{what}: {rel!r} is absolute; bundle paths are relative to the bundle")
    real = _real(root / rel)
    if real != root and not real.is_relative_to(root):
        raise ArtifactError("unsafe_path", f"{what}: {rel!r} resolves to {real}, outside the bundle {root}")
    return real


def _read_manifest(root: Path) -> tuple[dict[str, Any], str]:
    p = _inside(root, MANIFEST, "manifest")
    if not p.is_file():
        raise ArtifactError("missing_manifest", f"{root / MANIFEST} does not exist or is not a regular file")
    if p.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError("bad_manifest", f"{p} is {p.stat().st_size} bytes, more than {MAX_MANIFEST_BYTES}")
    data = p.read_bytes()
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, nesting deeper than the stack
        raise ArtifactError("bad_manifest", f"{p} is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError("bad_manifest", f"{p} must hold a JSON object")
    return manifest, hashlib.sha256(data).hexdigest()


def check_model_roots(cfg: Any) -> None:
    """Refuses a server config that would load announced bundles from any directory (`ModelsConfig`)."""
    if not cfg.allowed_roots and not cfg.allow_any_root:
        raise ValueError("models.allowed_roots is empty: announced model bundles could be loaded from any local "
                         "directory. Set models.allowed_roots=[DIR, ...] (the publisher's bundle directory), or "
                         "models.allow_any_root=true for local development only (cascade serve --dev)")


def resolve_uri(uri: str, allowed_roots: tuple[Path | str, ...] = ()) -> Path:
    """An announcement URI (a local path or file://) -> the bundle directory; refuses paths outside the roots.

    The path and the roots are compared after every symlink (a link under a root pointing elsewhere is
    outside). Empty roots accept any directory: servers refuse that config at start (`check_model_roots`).
    Object-store URIs (s3://...) go through `fetch_bundle` instead."""
    if not isinstance(uri, str) or not uri.strip() or "\x00" in uri:
        raise ArtifactError("unsupported_uri", f"{uri!r} is not a bundle path")
    if "://" in uri and not uri.startswith("file://"):
        raise ArtifactError("unsupported_uri", f"{uri!r}: only local paths and file:// URIs resolve to a directory")
    path = _real(uri.removeprefix("file://"))
    local_roots = [r for r in allowed_roots if not storage.is_remote(r)]
    if allowed_roots and not any(path.is_relative_to(_real(r)) for r in local_roots):
        raise ArtifactError("uri_not_allowed", f"{path} is not under an allowed model root {[str(r) for r in allowed_roots]}")
    if not path.is_dir():
        raise ArtifactError("missing_bundle", f"{path} is not a directory")
    return path


def _object_key(rel: object, what: str) -> str:
    """A manifest path as an object key below the bundle prefix: relative, no '.', '..' or empty segments."""
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\x00" in rel or "\\" in rel
            or any(seg in ("", ".", "..") for seg in rel.split("/"))):
        raise ArtifactError("unsafe_path", f"{what}: {str(rel)[:200]!r} is not a plain relative path inside the bundle")
    return rel


_PROCESS_CACHE: list[Path] = []


def bundle_cache_dir(configured: Path | None) -> Path:
    """Where object-store bundles are copied: the configured directory, or one temporary directory per process."""
    if configured is not None:
        Path(configured).mkdir(parents=True, exist_ok=True)
        return Path(configured)
    if not _PROCESS_CACHE:
        _PROCESS_CACHE.append(Path(tempfile.mkdtemp(prefix="cascade-bundles-")))
    return _PROCESS_CACHE[0]


def fetch_bundle(uri: str, allowed_roots: tuple[Path | str, ...], cache_dir: Path,
                 expected_checksum: str | None = None) -> Path:
    """An object-store bundle URI (s3://bucket/prefix/v1) -> its local copy ``cache_dir/<manifest sha256>/``.

    Refused before any model byte is fetched: a malformed URI, another scheme, '..' or empty segments
    (``unsupported_uri``); a URI outside the object-store roots of `allowed_roots`, compared segment by
    segment (``uri_not_allowed``); a missing, oversized or non-JSON manifest, or one whose sha256 is not the
    announced checksum. Then only the files the manifest lists are downloaded (each name a plain relative key,
    else ``unsafe_path``), and an object under a part that the manifest does not list is refused
    (``unlisted_file``), as `verify_bundle` refuses one on disk. The copy is content-addressed: a
    redelivered announcement reuses it. The caller verifies the copy (`verify_bundle` re-hashes every file)
    before loading it."""
    try:
        loc = storage.check_location(uri, "bundle URI")
    except storage.StorageError as e:
        raise ArtifactError("unsupported_uri", str(e)) from None
    if not storage.is_remote(loc):
        raise ArtifactError("unsupported_uri", f"{uri!r} is a local path; fetch_bundle reads object-store URIs")
    remote_roots = [r for r in allowed_roots if storage.is_remote(r)]
    if allowed_roots and not any(storage.is_under(loc, str(r)) for r in remote_roots):
        raise ArtifactError("uri_not_allowed", f"{loc} is not under an allowed model root {[str(r) for r in allowed_roots]}")
    murl = storage.join(loc, MANIFEST)
    try:
        if not storage.is_file(murl):
            raise ArtifactError("missing_manifest", f"{murl} does not exist")
        if (n := storage.size(murl)) > MAX_MANIFEST_BYTES:
            raise ArtifactError("bad_manifest", f"{murl} is {n} bytes, more than {MAX_MANIFEST_BYTES}")
        data = storage.read_bytes(murl)
    except ArtifactError:
        raise
    except (OSError, storage.StorageError) as e:  # unreachable store, denied access
        raise ArtifactError("missing_bundle", f"{murl}: {describe_error(e)}") from None
    checksum = hashlib.sha256(data).hexdigest()
    if expected_checksum is not None and checksum != expected_checksum:
        raise ArtifactError("checksum_mismatch", f"{murl} has sha256 {checksum}, the announcement says {expected_checksum}")
    dest = Path(cache_dir) / checksum
    if (dest / MANIFEST).is_file():
        return dest
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ArtifactError("bad_manifest", f"{murl} is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ArtifactError("schema", "manifest.files must map relative paths to sha256")
    keys = [_object_key(rel, "manifest.files entry") for rel in files]
    parts = []
    for part in ("retriever", "ranker"):
        spec = manifest.get(part)
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise ArtifactError("schema", f"manifest.{part} must be {{loader: string, path: string}}")
        parts.append(_object_key(spec["path"], f"manifest.{part}.path"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{checksum}.", dir=cache_dir))
    try:
        for part in parts:
            for rel in storage.list_files(storage.join(loc, part)):
                if f"{part}/{rel}" not in files:
                    raise ArtifactError("unlisted_file", f"{part}: {part}/{rel} is not in manifest.files (not checksummed)")
        (tmp / MANIFEST).write_bytes(data)
        for rel in keys:
            storage.download(storage.join(loc, rel), tmp / rel)
        try:
            os.rename(tmp, dest)
        except OSError:  # a concurrent fetch of the same bundle won: use its copy
            if not (dest / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except ArtifactError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, storage.StorageError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError("missing_file", f"{loc}: {describe_error(e)}") from None
    return dest


def locate_bundle(uri: str, allowed_roots: tuple[Path | str, ...], cache_dir: Path | None,
                  expected_checksum: str | None = None) -> Path:
    """The local directory to verify and load for an announced URI: the directory itself for a local path,
    a fetched copy for an object-store URI (`resolve_uri`, `fetch_bundle`)."""
    if isinstance(uri, str) and "\x00" not in uri and storage.is_remote(uri):
        return fetch_bundle(uri, allowed_roots, bundle_cache_dir(cache_dir), expected_checksum)
    return resolve_uri(uri, allowed_roots)


def evict_fetched(uri: str, path: Path, cache_dir: Path | None) -> None:
    """Drops the fetched copy of an object-store `uri` that failed verification, so the next announcement
    downloads it anew; a local bundle directory is left alone."""
    if "\x00" in uri or not storage.is_remote(uri):
        return
    root = _real(bundle_cache_dir(cache_dir))
    p = _real(path)
    if p.parent == root:
        shutil.rmtree(p, ignore_errors=True)


def _part_dir(root: Path, manifest: Mapping[str, Any], part: str) -> Path:
    spec = manifest.get(part)
    if not isinstance(spec, dict) or not isinstance(spec.get("loader"), str) or "path" not in spec:
        raise ArtifactError("schema", f"manifest.{part} must be {{loader: string, path: string}}")
    d = _inside(root, spec["path"], f"manifest.{part}.path")
    if not d.is_dir():
        raise ArtifactError("missing_file", f"manifest.{part}.path {spec['path']!r} is not a directory in the bundle")
    return d


def _check_part_tree(root: Path, part: str, d: Path, verified: set[Path]) -> None:
    """Everything a loader could open under a part directory is a checksummed file of this bundle."""
    for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = p.relative_to(root)
            if stat.S_ISLNK(st.st_mode):
                real = _real(p)
                if not real.is_relative_to(root):
                    raise ArtifactError("unsafe_path", f"{part}: {rel} is a symlink to {real}, outside the bundle")
                if real.is_dir():
                    raise ArtifactError("unsafe_path", f"{part}: {rel} is a symlinked directory")
                if real not in verified:
                    raise ArtifactError("unlisted_file", f"{part}: {rel} links to {real}, not a checksummed file")
            elif stat.S_ISREG(st.st_mode):
                if p not in verified:
                    raise ArtifactError("unlisted_file", f"{part}: {rel} is not in manifest.files (not checksummed)")
            elif not stat.S_ISDIR(st.st_mode):
                raise ArtifactError("unsafe_path", f"{part}: {rel} is not a regular file or directory")


def _fingerprint(st: os.stat_result) -> tuple[int, ...]:
    # ctime moves on every write, rename or chmod and cannot be set back by the writer
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def verify_bundle(path: Path, expected_checksum: str | None, expected_version: str | None,
                  stats: StatsConfig, retention_ms: int,
                  fingerprints: dict[Path, tuple[int, ...]] | None = None) -> tuple[dict[str, Any], str, DenseLayout]:
    """Checksums + schema; returns (manifest, manifest checksum, dense layout). Raises ArtifactError.

    Every path the manifest names resolves (after symlinks) inside the bundle directory; every file under
    the parts' directories is listed in ``files`` with its sha256, so the loaders open checksummed files only.
    fingerprints: filled with each verified file's identity (inode, size, times) as it was hashed, for
    `check_unchanged` after loading (a file replaced or written between hashing and loading is caught)."""
    root = _real(path)
    manifest, checksum = _read_manifest(root)
    if expected_checksum is not None and checksum != expected_checksum:
        raise ArtifactError("checksum_mismatch",
                            f"{root / MANIFEST} has sha256 {checksum}, the announcement says {expected_checksum}")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ArtifactError("schema", f"manifest format {str(manifest.get('format'))[:100]!r}, expected {BUNDLE_FORMAT!r}")
    version = manifest.get("version")
    if not isinstance(version, str) or not version:
        raise ArtifactError("schema", "manifest.version must be a non-empty string")
    if expected_version is not None and version != expected_version:
        raise ArtifactError("version_mismatch", f"manifest version {version[:100]!r}, the announcement says {expected_version!r}")
    if manifest.get("hash_spec_version") != HASH_SPEC_VERSION:
        raise ArtifactError("schema", f"hash_spec_version {str(manifest.get('hash_spec_version'))[:100]} != {HASH_SPEC_VERSION}")
    if str(manifest.get("schema_version"))[:100] != SCHEMA_VERSION:
        raise ArtifactError("schema", f"schema_version {str(manifest.get('schema_version'))[:100]} != {SCHEMA_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError("schema", "manifest.files must map relative paths to sha256")
    verified: set[Path] = set()
    for rel, digest in files.items():
        f = _inside(root, rel, "manifest.files entry")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ArtifactError("schema", f"manifest.files[{rel!r}] must be a lowercase hex sha256")
        if not f.is_file():
            raise ArtifactError("missing_file", f"{f} is listed in the manifest but missing (or not a regular file)")
        before = _fingerprint(os.stat(f))
        got = sha256_file(f)
        if got != digest:
            raise ArtifactError("checksum_mismatch", f"{f}: sha256 {got}, the manifest says {digest}")
        if _fingerprint(os.stat(f)) != before:
            raise ArtifactError("modified_during_load", f"{f} changed while it was being checksummed")
        verified.add(f)
        if fingerprints is not None:
            fingerprints[f] = before
    try:
        dense = DenseLayout.from_manifest(manifest.get("features", {}))
    except Exception as e:  # any malformed features block is a schema rejection
        raise ArtifactError("schema", f"manifest.features: {type(e).__name__}: {str(e)[:300]}") from None
    if set(dense.stats.counted_event_types()) != set(stats.counted_event_types()):
        raise ArtifactError("schema", f"the model counts event types {sorted(dense.stats.counted_event_types())}, "
                                      f"the online state counts {sorted(stats.counted_event_types())}")
    for w, ms in zip(dense.stats.windows, dense.stats.window_ms()):
        if ms is not None and ms > retention_ms:
            raise ArtifactError("schema", f"stats window {w} is longer than the online state's retention "
                                          f"({retention_ms} ms)")
    for part in ("retriever", "ranker"):
        _check_part_tree(root, part, _part_dir(root, manifest, part), verified)
    return manifest, checksum, dense


def check_unchanged(path: Path, manifest: Mapping[str, Any], fingerprints: Mapping[Path, tuple[int, ...]]) -> None:
    """After loading: every verified file is still the one hashed, and the parts hold nothing new. Raises
    ArtifactError("modified_during_load") otherwise (the artifact store changed under the loader)."""
    root = _real(path)
    for f, fp in fingerprints.items():
        try:
            now = _fingerprint(os.stat(f))
        except OSError as e:
            raise ArtifactError("modified_during_load", f"{f} is gone after loading ({e})") from None
        if now != fp:
            raise ArtifactError("modified_during_load", f"{f} was replaced or written after it was checksummed")
    for part in ("retriever", "ranker"):
        _check_part_tree(root, part, _part_dir(root, manifest, part), set(fingerprints))


def describe_error(e: BaseException, limit: int = 500) -> str:
    """``Type: message`` of any exception, bounded, even when its __str__ itself fails."""
    try:
        msg = str(e)
    except Exception:
        msg = "<unprintable>"
    return f"{type(e).__name__}: {msg[:limit]}"


def part_digest(manifest: Mapping[str, Any], part: str) -> bytes:
    """sha256 of a part's ("retriever" or "ranker") ``relpath=sha256`` file entries, sorted: names the part's exact
    contents whatever else the bundle holds (GetModelInfo's per-model checksum; the ranker's seeds `sig_spec`)."""
    prefix = str(manifest[part]["path"]).rstrip("/") + "/"
    return hashlib.sha256("".join(f"{k}={v}" for k, v in sorted(manifest["files"].items())
                                  if k.startswith(prefix)).encode()).digest()


def load_verified_bundle(path: Path, stats: StatsConfig, retention_ms: int) -> ModelBundle:
    """`verify_bundle` then `load_bundle` of a bundle named by a trusted local path (benchmarks, tools): no
    announcement's checksum or version to match. Raises ArtifactError."""
    manifest, checksum, dense = verify_bundle(path, None, None, stats, retention_ms)
    return load_bundle(path, manifest, checksum, dense)


def load_bundle(path: Path, manifest: Mapping[str, Any], checksum: str, dense: DenseLayout) -> ModelBundle:
    """Loads both models of a verified bundle (restricted loaders only). Raises ArtifactError."""
    parts = {}
    root = _real(path)
    for part, loaders in (("retriever", RETRIEVER_LOADERS), ("ranker", RANKER_LOADERS)):
        spec = manifest[part]
        loader = loaders.get(spec["loader"]) if isinstance(spec.get("loader"), str) else None
        if loader is None:
            raise ArtifactError("unknown_loader", f"{part} loader {str(spec.get('loader'))[:100]!r} is not one of "
                                                  f"{sorted(loaders)}")
        part_dir = _part_dir(root, manifest, part)
        try:
            parts[part] = loader(part_dir)
        except ArtifactError:
            raise
        except Exception as e:  # a loader failing on a bad artifact is a rejection, not a crash
            raise ArtifactError("load_failed", f"{part} ({spec['loader']}) from {part_dir}: {describe_error(e)}") from e
    retriever, ranker = parts["retriever"], parts["ranker"]
    products = int(getattr(getattr(ranker, "cfg", None), "retrieval_products", 0) or 0)
    if products > 0 and products != int(getattr(retriever, "dim", -1)):
        raise ArtifactError("schema", f"the ranker reads {products} retriever vector terms but the bundle's retriever "
                                      f"has dimension {getattr(retriever, 'dim', None)}: export the pair together")
    context = getattr(ranker, "context", None)
    if context is not None:  # a second stage's context counts: their serve-point totals, before any request
        context.prepare_serving()
    sig_spec = 0
    if callable(getattr(ranker, "behavior_signatures", None)):
        sig_spec = int.from_bytes(part_digest(manifest, "ranker")[:8], "little") & ((1 << 63) - 1) or 1
    user_keys = list(getattr(retriever, "user_keys", ("user_id",)))
    spec = getattr(ranker, "batch_spec", None)
    if callable(spec):
        user_keys += list(spec().user_keys)
    return ModelBundle(
        version=manifest["version"], path=path, checksum=checksum, manifest=manifest, retriever=retriever,
        ranker=ranker, index=ItemIndex(retriever, int(retriever.dim)), dense=dense, sig_spec=sig_spec,
        user_keys=tuple(dict.fromkeys(["user_id", *user_keys])),
    )


class ModelHolder:
    """The served bundle: read with `.current` (no lock), replaced with `swap` (one assignment)."""

    def __init__(self) -> None:
        self._current: ModelBundle | None = None
        self._lock = threading.Lock()  # serializes swaps, never taken by readers
        self._listeners: list[Callable[[ModelBundle], None]] = []

    @property
    def current(self) -> ModelBundle | None:
        return self._current

    def on_swap(self, fn: Callable[[ModelBundle], None]) -> None:
        self._listeners.append(fn)

    def swap(self, bundle: ModelBundle) -> ModelBundle | None:
        with self._lock:
            old = self._current
            self._current = bundle
        for fn in self._listeners:
            fn(bundle)
        return old
