"""Where artifacts live: local paths and object-store URIs (s3://, gs://, file://) behind one small API.

Every stage that reads or writes artifacts — the features reader, the pipeline's
pointer files and bundles, the server's bundle loader — names a location as a
string: a local path (``var/artifacts``, ``file:///srv/artifacts``) or an object
URI (``s3://bucket/prefix``). This module parses and checks it once, and does the
few operations those stages need through fsspec (s3fs for ``s3://``, gcsfs for
``gs://``)::

    from features import storage

    storage.write_bytes_atomic("s3://bucket/artifacts/published.json", data)  # one PUT: atomic per object
    storage.upload_tree(local_bundle, "s3://bucket/artifacts/v1/bundle", last=("manifest.json",))
    fs, path = storage.filesystem("s3://bucket/features/ml-100k")            # for pyarrow.parquet

Atomic publish: locally a temporary file + ``os.replace``; on an object store an
object PUT is atomic, so writers put the data objects first and the pointer
object (``published.json``, a bundle's ``manifest.json``) last.

Credentials and endpoint come from a typed `StorageConfig` resolved at the edge
(`configure`, called by ``jobs/`` and ``serving/app.py`` with the process
environment): the config names the environment variables that hold the keys,
never the keys themselves. With no names set, s3fs uses the standard AWS chain
(``AWS_ACCESS_KEY_ID`` ..., ``~/.aws``, instance roles).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

REMOTE_SCHEMES = ("s3", "gs", "gcs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FS_PACKAGE = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


class StorageError(ValueError):
    """A location is malformed or refused, or the object store cannot be reached; the message names it."""


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StorageConfig:
    """How to reach the S3-compatible object store (``s3://`` URIs). Secrets are named, never inlined.

    endpoint_url: an S3-compatible endpoint (MinIO, Ceph, a local test server); None: AWS.
    access_key_env / secret_key_env / session_token_env: NAMES of environment variables holding the
    credentials; None: the standard AWS credential chain.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_env: str | None = None
    secret_key_env: str | None = None
    session_token_env: str | None = None
    anon: bool = False  # public buckets: no credentials at all

    def __post_init__(self) -> None:
        for name in ("access_key_env", "secret_key_env", "session_token_env"):
            v = getattr(self, name)
            if v is not None and not _ENV_NAME.fullmatch(v):
                raise ValueError(f"storage.{name} must be the NAME of an environment variable "
                                 f"(like AWS_ACCESS_KEY_ID), got {v!r}: secrets are never written in config")
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ValueError("storage.access_key_env and storage.secret_key_env go together")
        if self.anon and self.access_key_env is not None:
            raise ValueError("storage.anon=true takes no credentials (access_key_env / secret_key_env)")
        if self.endpoint_url is not None and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise ValueError(f"storage.endpoint_url must look like http(s)://HOST[:PORT], got {self.endpoint_url!r}")


def s3_options(cfg: StorageConfig, environ: Mapping[str, str]) -> dict[str, Any]:
    """The s3fs options of a config, credentials read from `environ` by name (raises StorageError if unset)."""
    def env(name: str | None, what: str) -> str | None:
        if name is None:
            return None
        if not environ.get(name):
            raise StorageError(f"storage.{what}={name}: the environment variable {name} is not set")
        return environ[name]

    opts: dict[str, Any] = {"use_listings_cache": False}  # a pointer just written is read back, never a stale listing
    if cfg.anon:
        opts["anon"] = True
    key, secret = env(cfg.access_key_env, "access_key_env"), env(cfg.secret_key_env, "secret_key_env")
    token = env(cfg.session_token_env, "session_token_env")
    opts.update({k: v for k, v in (("key", key), ("secret", secret), ("token", token)) if v is not None})
    if cfg.endpoint_url is not None:
        opts["endpoint_url"] = cfg.endpoint_url
    if cfg.region is not None:
        opts["client_kwargs"] = {"region_name": cfg.region}
    return opts


def configure(cfg: StorageConfig, environ: Mapping[str, str]) -> None:
    """Makes `cfg` the process's object-store settings. Called once at the edge (jobs/, serving/app.py)."""
    import fsspec

    fsspec.config.conf["s3"] = s3_options(cfg, environ)
    _clear_instances()


def _clear_instances() -> None:
    import fsspec

    try:
        cls = fsspec.get_filesystem_class("s3")
    except ImportError:
        return
    cls.clear_instance_cache()


# ---------------------------------------------------------------------------------------------- locations


def scheme(location: str | os.PathLike) -> str:
    """"s3", "gs", ... for an object URI; "file" for a local path or file:// URI."""
    m = _SCHEME.match(str(location))
    return "file" if m is None else m.group(1).lower()


def is_remote(location: str | os.PathLike) -> bool:
    return scheme(location) != "file"


def check_location(location: str | os.PathLike, what: str = "location") -> str:
    """A location as a normalized string; raises StorageError naming `what` when it is malformed.

    Remote URIs: a known scheme, a bucket, and a key without ``.``/``..``/empty segments (object keys
    are not normalized by the store: ``a/../b`` would be a different object, and a way out of a prefix).
    Local: any path, ``file://`` stripped; confinement of local paths is the caller's (after symlinks).
    """
    s = str(location) if isinstance(location, (str, os.PathLike)) else None
    if not s or not s.strip() or "\x00" in s:
        raise StorageError(f"{what}: {location!r} is not a path or URI")
    sch = scheme(s)
    if sch == "file":
        return s[len("file://"):] if s.lower().startswith("file://") else s
    if sch not in REMOTE_SCHEMES:
        raise StorageError(f"{what}: {s!r} has scheme {sch!r}; artifacts live on local paths, file://, "
                           f"{', '.join(f'{x}://' for x in REMOTE_SCHEMES)}")
    rest = s[len(sch) + 3:]
    bucket, _, key = rest.partition("/")
    if not bucket or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", bucket):
        raise StorageError(f"{what}: {s!r} has no valid bucket name")
    key = key.rstrip("/")
    segments = key.split("/") if key else []
    if any(seg in ("", ".", "..") or "\\" in seg for seg in segments):
        raise StorageError(f"{what}: {s!r} has an empty, '.', '..' or backslashed path segment")
    return f"{sch}://{bucket}" + (f"/{key}" if key else "")


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` / parts, for a local path or a URI (parts are relative names, checked)."""
    base = check_location(location)
    for p in parts:
        if not p or p.startswith("/") or any(seg in ("", ".", "..") for seg in p.split("/")):
            raise StorageError(f"{p!r} is not a relative name to join to {base}")
    if is_remote(base):
        return "/".join([base, *parts])
    return str(Path(base, *parts))


def is_under(location: str, root: str) -> bool:
    """Whether remote `location` is `root` or below it (whole segments: s3://b/ab is not under s3://b/a)."""
    loc, base = check_location(location), check_location(root)
    return loc == base or loc.startswith(base + "/")


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a location; a missing fsspec backend is a named error."""
    import fsspec

    loc = check_location(location)
    try:
        fs, path = fsspec.core.url_to_fs(loc)
    except ImportError as e:
        pkg = _FS_PACKAGE.get(scheme(loc), "the fsspec backend")
        raise StorageError(f"{loc}: reading {scheme(loc)}:// needs {pkg} (pip install {pkg}; it is a pinned "
                           f"dependency of cascade for s3): {e}") from None
    return fs, path


# ---------------------------------------------------------------------------------------------- operations


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return bool(fs.exists(path))


def is_file(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return bool(fs.isfile(path))


def size(location: str | os.PathLike) -> int:
    fs, path = filesystem(location)
    return int(fs.size(path))


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{check_location(location)} does not exist") from None


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def write_bytes_atomic(location: str | os.PathLike, data: bytes) -> None:
    """Readers see the old content or the new, never a part: temp file + rename locally, one PUT remotely."""
    loc = check_location(location)
    if is_remote(loc):
        fs, path = filesystem(loc)
        fs.pipe_file(path, data)
        return
    p = Path(loc)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(location: str | os.PathLike, line: str) -> None:
    """Appends one line to a log (history.jsonl). Objects cannot be appended to: remotely the object is
    rewritten whole (one writer at a time: the pipeline of one artifacts location)."""
    loc = check_location(location)
    if not is_remote(loc):
        with open(loc, "a") as f:
            f.write(line.rstrip("\n") + "\n")
        return
    old = read_bytes(loc) if exists(loc) else b""
    write_bytes_atomic(loc, old + line.rstrip("\n").encode() + b"\n")


def list_files(location: str | os.PathLike) -> list[str]:
    """Every file under a directory/prefix, as sorted relative paths ('/'-separated)."""
    fs, path = filesystem(location)
    base = path.rstrip("/")
    if not fs.isdir(base):
        return []
    return sorted(p[len(base) + 1:] for p in fs.find(base) if p.startswith(base + "/"))


def upload_tree(local_dir: str | os.PathLike, location: str | os.PathLike, last: Iterable[str] = ()) -> list[str]:
    """Copies every file under `local_dir` to `location`; the relative paths in `last` are written after all
    others, in order (the pointer objects: a reader that sees them sees everything they name). Returns the
    relative paths written."""
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    rels = sorted(str(p.relative_to(src)).replace(os.sep, "/") for p in src.rglob("*") if p.is_file())
    tail = [r for r in last if r in rels]
    for rel in [r for r in rels if r not in tail] + tail:
        dst = join(location, rel)
        if is_remote(dst):
            fs, path = filesystem(dst)
            fs.put_file(str(src / rel), path)
        else:
            write_bytes_atomic(dst, (src / rel).read_bytes())
    return rels


def download(location: str | os.PathLike, dest: str | os.PathLike) -> None:
    """One file to a local path (parents created)."""
    fs, path = filesystem(location)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(path, str(dest))
    except FileNotFoundError:
        raise FileNotFoundError(f"{check_location(location)} does not exist") from None


def sha256(location: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, streamed."""
    fs, path = filesystem(location)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
