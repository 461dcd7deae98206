"""The packed binary layout of a user's online state (one Redis value per user).

One GET returns everything the request path needs about a user: the capped
behavior sequence (with the SDIM signatures computed at ingest), the log of
counted events for the windowed statistics, and the user's attributes.
Columns are stored contiguously, so decoding is a handful of zero-copy
``np.frombuffer`` views (a 10k-behavior user is ~250 KB and decodes in ~10 µs).

Layout (little-endian)::

    header  <4s B B H I I I q q q>  magic b"CSU1", format 2, flags, reserved,
                                    n_seq, n_log, attrs_len, sig_spec, total_cnt, total_pos
    gen     8 bytes                 (format 2) the write's generation: random per encoding, so a writer
                                    compares 8 bytes (GETRANGE) to know the value is still the one it
                                    read, instead of hashing the whole value (`cas_token`)
    seq     item_id i8[n] | ts_ms i8[n] | category i8[n] | action u1[n] | sdim_sig i8[n] (flag HAS_SIGS)
    sums    (flag HAS_SUMS) <q H H H H> sums_spec, m, K, D, 0 | count i4[m*K] | sum f4[m*K*D]
    log     ts_ms i8[m] | pos u1[m]      counted events within the retention (event time), chronological
    attrs   JSON {"sparse": {feature: [ids]}, "numeric": {key: value}}

Format 1 (the same without `gen`) is still read; its compare-and-set token is
the value's SHA-1. Readers of format 1 only (servers before format 2) cannot
read format 2: upgrade every reader before a format-2 writer (the consumer)
runs, or give the new servers their own `key_prefix`.

`sig_spec` identifies the signature function (the ranker's SDIM hyperplanes)
the stored signatures were computed with; 0 = none stored.

`sums` are SDIM's bucket sums (`BucketSums`): per hash function j and code c,
the sum of the representations of the user's last W behaviors with code c
(W = the ranker's long_len) and how many there are. `sums_spec` is the model
version they were built with (the bundle's `sig_spec`: the ranker's files);
a reader serving another version must not use them. float32, so that the
consumer can add entering and subtract leaving behaviors for as long as the
user lives: 8 x 8 x 32 floats + 64 counts = 8.5 KB per user with the default
config (m = 8, tau = 3, D = 32), next to ~33 B per stored behavior.

Item statistics are kept apart (items are shared by all consumers, so they are
written with an atomic APPEND, never read-modify-write): one value per item, a
log of 9-byte records ``ts_ms i8, pos u1``, one per counted event. Pruning
replaces the records older than the retention by *summary records* with a
negative timestamp (event timestamps are >= 0 by the schema): ``(-n, 0)`` stands
for n counted events, ``(-n, 1)`` for n positives among them. So one GET gives
both the windows and the all-time totals.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from features.sequence import SequenceState

MAGIC = b"CSU1"
FORMAT = 2
HAS_SIGS = 1
HAS_SUMS = 2
_HEADER = struct.Struct("<4sBBHIIIqqq")
_SUMS_HEADER = struct.Struct("<qHHHH")
GEN_OFFSET = _HEADER.size  # format 2: the generation's 8 bytes follow the format-1 header
GEN_BYTES = 8
HEADER_BYTES = GEN_OFFSET + GEN_BYTES
ITEM_LOG_DTYPE = np.dtype([("ts", "<i8"), ("pos", "u1")])  # 9 bytes, packed


class StateDecodeError(ValueError):
    """A stored value does not have the expected layout; names the key when the caller knows it."""


@dataclass(frozen=True)
class UserAttrs:
    sparse: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # feature -> hashed ids
    numeric: Mapping[str, float] = field(default_factory=dict)

    def encode(self) -> bytes:
        if not self.sparse and not self.numeric:
            return b""
        return json.dumps({"sparse": {k: list(v) for k, v in self.sparse.items()}, "numeric": dict(self.numeric)},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "UserAttrs":
        if not raw:
            return cls()
        d = json.loads(raw)
        return cls({k: tuple(v) for k, v in d.get("sparse", {}).items()}, d.get("numeric", {}))


_NO_ATTRS = UserAttrs()  # shared: frozen, and nothing writes into its (empty) maps


@dataclass(frozen=True)
class CounterLog:
    """Counted events of one entity: the totals ever, plus the events within the retention."""

    ts_ms: np.ndarray  # (M,) int64, chronological
    pos: np.ndarray  # (M,) uint8 0/1
    total_cnt: int = 0
    total_pos: int = 0

    @classmethod
    def empty(cls) -> "CounterLog":
        return cls(np.empty(0, np.int64), np.empty(0, np.uint8))

    def __len__(self) -> int:
        return int(self.ts_ms.shape[0])


@dataclass(frozen=True)
class BucketSums:
    """A user's SDIM bucket sums over the last W behaviors, as one model version builds them."""

    sums: np.ndarray  # (m, K, D) float32: sum of the window's behavior values per (hash function, code)
    counts: np.ndarray  # (m, K) int32: behaviors per bucket; a bucket whose count is 0 holds exactly 0
    spec: int  # the model version (ModelBundle.sig_spec) the values and codes came from; never 0

    @property
    def covered(self) -> int:
        """How many behaviors the sums cover (each is in one bucket per hash function)."""
        return int(self.counts[0].sum()) if self.counts.size else 0

    def nbytes(self) -> int:
        return _SUMS_HEADER.size + self.counts.size * 4 + self.sums.size * 4


@dataclass(frozen=True)
class UserRecord:
    seq: SequenceState
    log: CounterLog
    attrs: UserAttrs = UserAttrs()
    sigs: np.ndarray | None = None  # (L,) int64 packed SDIM signatures, parallel to seq
    sig_spec: int = 0
    attrs_raw: bytes | None = None  # the encoded attrs, carried through ingest without decoding
    sdim: BucketSums | None = None  # SDIM bucket sums of the sequence's last W behaviors, when kept

    @classmethod
    def empty(cls) -> "UserRecord":
        return cls(SequenceState.empty(), CounterLog.empty())


def encode_user(rec: UserRecord, gen: bytes | None = None) -> bytes:
    """The record in format 2; `gen`: its 8-byte generation (default: random, so two encodings of one record
    differ only there)."""
    if gen is None:
        gen = os.urandom(GEN_BYTES)
    elif len(gen) != GEN_BYTES:
        raise ValueError(f"gen has {len(gen)} bytes, expected {GEN_BYTES}")
    seq = rec.seq
    n = len(seq)
    has_sigs = rec.sigs is not None and rec.sig_spec != 0
    if has_sigs and rec.sigs.shape != (n,):  # type: ignore[union-attr]
        raise ValueError(f"sigs has shape {rec.sigs.shape}, expected ({n},)")  # type: ignore[union-attr]
    attrs = rec.attrs_raw if rec.attrs_raw is not None else rec.attrs.encode()
    log = rec.log
    sdim = rec.sdim
    if sdim is not None:
        m, k, dim = sdim.sums.shape if sdim.sums.ndim == 3 else (-1, -1, -1)
        if sdim.sums.ndim != 3 or sdim.counts.shape != (m, k) or sdim.spec == 0 or max(m, k, dim) >= 1 << 16:
            raise ValueError(f"sdim sums {sdim.sums.shape} / counts {sdim.counts.shape} / spec {sdim.spec}: expected "
                             "(m, K, D) and (m, K) below 65536 each and a non-zero spec")
    flags = (HAS_SIGS if has_sigs else 0) | (HAS_SUMS if sdim is not None else 0)
    header = _HEADER.pack(MAGIC, FORMAT, flags, 0, n, len(log), len(attrs),
                          rec.sig_spec if has_sigs else 0, log.total_cnt, log.total_pos)
    parts = [
        header,
        gen,
        np.ascontiguousarray(seq.item_ids, dtype="<i8").tobytes(),
        np.ascontiguousarray(seq.ts_ms, dtype="<i8").tobytes(),
        np.ascontiguousarray(seq.categories, dtype="<i8").tobytes(),
        np.ascontiguousarray(seq.actions, dtype=np.uint8).tobytes(),
    ]
    if has_sigs:
        parts.append(np.ascontiguousarray(rec.sigs, dtype="<i8").tobytes())
    if sdim is not None:
        parts += [_SUMS_HEADER.pack(sdim.spec, *sdim.sums.shape, 0),
                  np.ascontiguousarray(sdim.counts, dtype="<i4").tobytes(),
                  np.ascontiguousarray(sdim.sums, dtype="<f4").tobytes()]
    parts += [np.ascontiguousarray(log.ts_ms, dtype="<i8").tobytes(), np.ascontiguousarray(log.pos, dtype=np.uint8).tobytes(), attrs]
    return b"".join(parts)


def decode_user(blob: bytes, where: str = "user state", decode_attrs: bool = True) -> UserRecord:
    """The inverse of `encode_user`. Arrays are read-only views into `blob` (actions widened to int64)."""
    if len(blob) < GEN_OFFSET:
        raise StateDecodeError(f"{where}: {len(blob)} bytes is shorter than the {GEN_OFFSET}-byte header")
    blob = bytearray(blob)  # one copy: writable arrays (torch.from_numpy of read-only memory is undefined)
    magic, fmt, flags, _, n, m, alen, sig_spec, tcnt, tpos = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC or fmt not in (1, FORMAT):
        raise StateDecodeError(f"{where}: bad magic/format {magic!r}/{fmt} (expected {MAGIC!r}/1 or {FORMAT})")
    head = HEADER_BYTES if fmt == FORMAT else GEN_OFFSET
    has_sigs = bool(flags & HAS_SIGS)
    expected = head + n * (25 + (8 if has_sigs else 0)) + m * 9 + alen
    sums_at = head + n * (25 + (8 if has_sigs else 0))
    sums_dims = None
    if flags & HAS_SUMS:
        if len(blob) < sums_at + _SUMS_HEADER.size:
            raise StateDecodeError(f"{where}: {len(blob)} bytes end before the SDIM sums section at {sums_at}")
        sums_spec, hm, hk, hd, _ = _SUMS_HEADER.unpack_from(blob, sums_at)
        sums_dims = (sums_spec, hm, hk, hd)
        expected += _SUMS_HEADER.size + hm * hk * 4 + hm * hk * hd * 4
    if len(blob) != expected:
        raise StateDecodeError(f"{where}: {len(blob)} bytes, the header says {expected} (n_seq={n}, n_log={m})")
    body = np.frombuffer(blob, np.uint8)  # one buffer; each column is a typed view of its section
    o = head
    item = body[o:o + 8 * n].view("<i8"); o += 8 * n
    ts = body[o:o + 8 * n].view("<i8"); o += 8 * n
    cat = body[o:o + 8 * n].view("<i8"); o += 8 * n
    act = body[o:o + n].astype(np.int64); o += n
    sigs = None
    if has_sigs:
        sigs = body[o:o + 8 * n].view("<i8"); o += 8 * n
    sdim = None
    if sums_dims is not None:
        sums_spec, hm, hk, hd = sums_dims
        o += _SUMS_HEADER.size
        counts = body[o:o + 4 * hm * hk].view("<i4").reshape(hm, hk); o += 4 * hm * hk
        sums = body[o:o + 4 * hm * hk * hd].view("<f4").reshape(hm, hk, hd); o += 4 * hm * hk * hd
        sdim = BucketSums(sums, counts, int(sums_spec))
    lts = body[o:o + 8 * m].view("<i8"); o += 8 * m
    lpos = body[o:o + m]; o += m
    raw_attrs = bytes(blob[o:o + alen])
    return UserRecord(
        seq=SequenceState(item, ts, act, cat),
        log=CounterLog(lts, lpos, int(tcnt), int(tpos)),
        attrs=UserAttrs.decode(raw_attrs) if decode_attrs else _NO_ATTRS,
        sigs=sigs,
        sig_spec=int(sig_spec) if has_sigs else 0,
        attrs_raw=raw_attrs,
        sdim=sdim,
    )


def cas_token(blob: bytes | None) -> bytes:
    """What a writer compares to know a stored user value is still `blob` (redis_store's APPLY script): b""
    for no value; a format-2 value's 8-byte generation; else (format 1, or not a user value) the value's SHA-1
    as 40 hex digits."""
    if blob is None:
        return b""
    if len(blob) >= HEADER_BYTES and blob[:4] == MAGIC and blob[4] == FORMAT:
        return bytes(blob[GEN_OFFSET:HEADER_BYTES])
    return hashlib.sha1(blob).hexdigest().encode()


def encode_item_log(ts_ms: np.ndarray, pos: np.ndarray) -> bytes:
    rec = np.empty(len(ts_ms), ITEM_LOG_DTYPE)
    rec["ts"] = ts_ms
    rec["pos"] = pos
    return rec.tobytes()


def summary_records(cnt: int, pos: int) -> bytes:
    """The summary records standing for `cnt` pruned counted events, `pos` of them positive."""
    rows = [(-cnt, 0)] if cnt else []
    if pos:
        rows.append((-pos, 1))
    rec = np.array(rows, ITEM_LOG_DTYPE)
    return rec.tobytes()


def decode_item_logs(blobs: list[bytes | None], where: str = "item stats"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n items' logs -> (ts (M,), pos (M,), owner (M,) in [0, n), total_cnt (n,), total_pos (n,)), vectorized.

    The returned events exclude summary records; the totals include them.
    """
    n = len(blobs)
    lengths = np.fromiter((0 if b is None else len(b) for b in blobs), np.int64, n)
    bad = lengths % ITEM_LOG_DTYPE.itemsize
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StateDecodeError(f"{where}: log {i} has {lengths[i]} bytes, not a multiple of {ITEM_LOG_DTYPE.itemsize}")
    rec = np.frombuffer(b"".join(b for b in blobs if b), ITEM_LOG_DTYPE)
    owner = np.repeat(np.arange(n), lengths // ITEM_LOG_DTYPE.itemsize)
    ts, pos = rec["ts"], rec["pos"]
    event = ts >= 0
    total_cnt = np.bincount(owner[event], minlength=n).astype(np.int64)
    total_pos = np.bincount(owner[event], weights=pos[event], minlength=n).astype(np.int64)
    if not event.all():
        summ = ~event
        w = -ts[summ]
        is_pos = pos[summ] == 1
        total_cnt += np.bincount(owner[summ][~is_pos], weights=w[~is_pos], minlength=n).astype(np.int64)
        total_pos += np.bincount(owner[summ][is_pos], weights=w[is_pos], minlength=n).astype(np.int64)
        ts, pos, owner = ts[event], pos[event], owner[event]
    return ts, pos, owner, total_cnt, total_pos


def prune_item_log(blob: bytes, cutoff_ms: int) -> tuple[bytes, int] | None:
    """(the log with events before `cutoff_ms` folded into the summary records, how many were folded);
    None if nothing is that old."""
    rec = np.frombuffer(blob, ITEM_LOG_DTYPE)
    old = (rec["ts"] >= 0) & (rec["ts"] < cutoff_ms)
    if not old.any():
        return None
    summ = rec["ts"] < 0
    cnt = int(old.sum()) + int(-rec["ts"][summ & (rec["pos"] == 0)].sum())
    pos = int(rec["pos"][old].sum()) + int(-rec["ts"][summ & (rec["pos"] == 1)].sum())
    return summary_records(cnt, pos) + rec[~old & ~summ].tobytes(), int(old.sum())
