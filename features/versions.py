"""Versioned features directories: immutable versions, an atomic `current` pointer, leases, garbage collection.

A features *root* holds one directory per `cascade build-features --versioned` run and a pointer to the
newest complete one::

    ROOT/
        v-20261203T091910Z-3f2a/     a complete features directory (manifest.json, items/, ...), never rewritten
        v-20261204T011502Z-9c01/
        current.json                 {"version": "v-20261204T011502Z-9c01", ...}: written to a temp file, renamed
        leases/<version>.<id>.json   a reader's pin: pid, host, job, expiry (renewed while the reader runs)
        .lock                        flock: lease acquisition and garbage collection never interleave

A writer builds into a new version directory nobody reads, then `commit_version` flips the pointer with one
`os.replace` of a fully written, fsynced temp file (a reader sees the old or the new JSON, never a half-written
one). The pointer is a file naming the version rather than a symlink: a reader resolves it once and from then
on opens ``ROOT/<version>/...`` by name, so no later switch can change what a path it holds means (a reader
walking ``ROOT/current/...`` through a symlink would cross into the new version mid-run), and it records the
manifest's sha256. A reader calls `pin(path)` once at start: it resolves
the pointer, writes a lease on that version under the lock, and reads that version until it ends, whatever
later runs commit. `collect_garbage(root, keep)` removes a version only when it is older than the newest
`keep`, is not the current one and no live lease pins it; it renames the directory out of the version
namespace under the lock before deleting it, so a reader can never pin a half-deleted version.

A lease is live until its expiry (renewed every ``ttl/3`` by a thread of the reader); a lease of a process
that died on this host without releasing it is dead at once (its pid is gone). Leases need a filesystem with
working `flock` and `rename` (a local disk, or a ReadWriteMany volume: NFSv4, CephFS, EFS); object-store URIs
are not versioned here.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from features.layout import MANIFEST  # a version is a complete features directory

log = logging.getLogger("cascade.features.versions")

POINTER = "current.json"
LEASES = "leases"
LOCK = ".lock"
VERSION_PREFIX = "v-"
DEFAULT_LEASE_TTL_S = 600.0
RUN_RECORD = "features_version.json"  # in a training run's directory: the version it reads


@dataclass(frozen=True)
class FeaturesVersion:
    """What a reader reads: `path`, and when it came from a versioned root, the root and version name."""

    path: Path | str  # str: an object-store URI, read as given
    root: Path | None = None
    version: str | None = None


def is_versioned_root(path: str | Path) -> bool:
    return (Path(path) / POINTER).is_file()


def new_version_name(now: dt.datetime | None = None) -> str:
    """``v-<UTC time>-<4 hex>``: sorts by creation time; the suffix keeps two runs in one second apart."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{VERSION_PREFIX}{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:4]}"


def list_versions(root: str | Path) -> list[str]:
    """Version directories under `root`, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(VERSION_PREFIX))


def read_pointer(root: str | Path) -> dict[str, Any] | None:
    p = Path(root) / POINTER
    if not p.is_file():
        return None
    try:
        pointer = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a features pointer ({e})") from None
    if not isinstance(pointer, dict) or not str(pointer.get("version", "")).startswith(VERSION_PREFIX):
        raise ValueError(f"{p}: no valid 'version' in {pointer!r}")
    return pointer


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit_version(root: str | Path, version: str) -> dict[str, Any]:
    """Points ``ROOT/current.json`` at the complete version `version` (atomically); returns the pointer."""
    root = Path(root)
    vdir = root / version
    if not version.startswith(VERSION_PREFIX) or "/" in version:
        raise ValueError(f"{version!r} is not a features version name ({VERSION_PREFIX}...)")
    if not (vdir / MANIFEST).is_file():
        raise FileNotFoundError(f"{vdir} has no {MANIFEST}: a version is committed only when its build finished")
    import hashlib

    pointer = {"version": version,
               "manifest_sha256": hashlib.sha256((vdir / MANIFEST).read_bytes()).hexdigest(),
               "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    with _locked(root):
        _write_json_atomic(root / POINTER, pointer)
    return pointer


# ---------------------------------------------------------------------------------------------- leases


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (a zombie counts as gone); also used by `jobs.services`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def lease_is_live(lease: dict[str, Any], now: float | None = None) -> bool:
    """Unexpired, and not left behind by a process of this host that is gone."""
    now = time.time() if now is None else now
    if float(lease.get("expires_at", 0)) <= now:
        return False
    if lease.get("host") == socket.gethostname() and not pid_alive(int(lease.get("pid", -1))):
        return False
    return True


def read_leases(root: str | Path) -> list[dict[str, Any]]:
    """Every lease file under ``ROOT/leases`` (live or not), each with its ``file``."""
    ldir = Path(root) / LEASES
    out = []
    for p in sorted(ldir.glob("*.json")) if ldir.is_dir() else []:
        try:
            lease = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being replaced or removed right now
        out.append({**lease, "file": str(p)})
    return out


class Lease:
    """A reader's pin on one version; renewed by a daemon thread until `release`."""

    def __init__(self, root: Path, version: str, job: str, ttl_s: float) -> None:
        self.root = root
        self.version = version
        self.job = job
        self.ttl_s = ttl_s
        self.file = root / LEASES / f"{version}.{uuid.uuid4().hex[:12]}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        _write_json_atomic(self.file, {"version": self.version, "pid": os.getpid(), "host": socket.gethostname(),
                                       "job": self.job, "expires_at": time.time() + self.ttl_s})

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self._write()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.version}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.file.unlink(missing_ok=True)


def acquire(root: str | Path, job: str = "", ttl_s: float = DEFAULT_LEASE_TTL_S,
            version: str | None = None) -> tuple[FeaturesVersion, Lease]:
    """Resolves ``ROOT/current.json`` once (or takes `version`) and leases that version, under the root's lock."""
    if ttl_s <= 0:
        raise ValueError(f"lease ttl must be > 0 seconds, got {ttl_s}")
    root = Path(root)
    with _locked(root):
        if version is None:
            pointer = read_pointer(root)
            if pointer is None:
                raise FileNotFoundError(f"{root} has no {POINTER}: no features version was committed there yet "
                                        "(run `cascade build-features --versioned --out ROOT`)")
            version = pointer["version"]
            if not (root / version / MANIFEST).is_file():
                raise FileNotFoundError(f"{root / POINTER} points at {version}, which has no {MANIFEST}")
        elif not (root / version / MANIFEST).is_file():
            raise FileNotFoundError(f"features version {root / version} is gone (collected) or incomplete: a run "
                                    "that read it cannot resume; start a new run")
        (root / LEASES).mkdir(exist_ok=True)
        lease = Lease(root, version, job, ttl_s)
        lease._write()
    lease.start()
    log.info("features %s: reading version %s (leased by %s)", root, version, job or f"pid {os.getpid()}")
    return FeaturesVersion(root / version, root, version), lease


def reserve(root: str | Path, job: str = "build", ttl_s: float = DEFAULT_LEASE_TTL_S) -> tuple[FeaturesVersion, Lease]:
    """A new version name under `root` for a writer, leased so that no collection removes it mid-build."""
    root = Path(root)
    version = new_version_name()
    with _locked(root):
        (root / LEASES).mkdir(exist_ok=True)
        lease = Lease(root, version, job, ttl_s)
        lease._write()
    lease.start()
    return FeaturesVersion(root / version, root, version), lease


@contextlib.contextmanager
def pin(path: str | Path, job: str = "", ttl_s: float = DEFAULT_LEASE_TTL_S,
        version: str | None = None) -> Iterator[FeaturesVersion]:
    """The features a job reads, held for the ``with`` block.

    A versioned root resolves to its current version (or `version`), leased until the block ends; any other
    path (a plain features directory, an object-store URI) is yielded as is.

    Example::

        with pin("/artifacts/features", job="train-ranker") as fv:
            train(fv.path)          # fv.version stays readable, whatever later builds commit
    """
    if "://" not in str(path) and is_versioned_root(path):
        fv, lease = acquire(path, job, ttl_s, version)
        try:
            yield fv
        finally:
            lease.release()
    else:
        yield FeaturesVersion(path if "://" in str(path) else Path(path))


def pin_on_rank0(held: contextlib.ExitStack, features: str | Path, job: str, rank: int, run_dir: Path,
                 resume: bool = False) -> str:
    """The features a training run reads, resolved once for all its ranks.

    Rank 0 pins `features` (`pin`) for as long as `held` stays open, records the version in
    ``run_dir/features_version.json`` and, when a process group of more than one rank is initialised, sends
    the resolved path to every rank (call it on every rank after ``init_process_group``); without one (the
    local launcher's parent) the caller passes the path on. With `resume`, the version the run recorded is
    pinned again rather than the current one, so a resumed run never mixes two versions.
    """
    path = None
    if rank == 0:
        version = None
        record = Path(run_dir) / RUN_RECORD
        if resume and record.is_file():
            rec = json.loads(record.read_text())
            if "://" not in str(features) and Path(rec["root"]) == Path(features):
                version = rec["version"]
        fv = held.enter_context(pin(features, job=job, version=version))
        if fv.version is not None:
            _write_json_atomic(record, {"root": str(fv.root), "version": fv.version, "path": str(fv.path)})
        path = str(fv.path)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    assert path is not None
    return path


# ---------------------------------------------------------------------------------------------- GC


def collect_garbage(root: str | Path, keep: int) -> list[str]:
    """Removes versions older than the newest `keep` that are neither current nor pinned; returns their names.

    Unfinished directories of crashed builds (no manifest, older than the newest `keep`) go too.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the current version is always kept), got {keep}")
    root = Path(root)
    removed: list[str] = []
    trash: list[Path] = []
    with _locked(root):
        pointer = read_pointer(root)
        current = pointer["version"] if pointer else None
        versions = list_versions(root)
        leases = read_leases(root)
        pinned = {lease["version"] for lease in leases if lease_is_live(lease)}
        for lease in leases:  # dead leases: their readers are gone
            if not lease_is_live(lease):
                Path(lease["file"]).unlink(missing_ok=True)
        for name in versions[:-keep]:
            if name == current or name in pinned:
                continue
            dest = root / f".trash-{name}-{uuid.uuid4().hex[:6]}"
            os.replace(root / name, dest)  # out of the version namespace before the slow delete
            trash.append(dest)
            removed.append(name)
    for d in trash:
        shutil.rmtree(d, ignore_errors=True)
    return removed
