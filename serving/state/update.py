"""How events change a user's online state (pure functions; the Kafka consumer calls them).

* Per-event arrays (`EventArrays`): built once for a run of events (the
  consumer: a whole poll batch; the bootstrap: a whole dataset), each user's
  events contiguous; a user's `UserBatch` is a slice of them.
* Sequence: `features.sequence.append_behaviors`, i.e. `append_event`
  semantics, exactly (in-order events in one concatenation, late ones one
  insert at a time). A property test checks `apply_user_batch` against
  folding `append_event` event by event on random arrival orders.
* Counters: counted events (`StatsConfig.event_types`) add ``(ts, label >= 0.5)``
  to the user's counter log and totals; the log keeps the retention window
  (event time) counted back from min(newest counted event, now): the wall
  clock bounds it, so one event stamped in the future cannot push the user's
  real history out of the log (the consumer also dead-letters such events,
  `features.messages.EventBounds`). Pruning never changes the totals.
* SDIM signatures: kept parallel to the sequence when the serving model has an
  SDIM module; new behaviors get theirs from the model's signature table, and
  a sequence whose stored signatures came from another model is re-signed
  whole (backfill on write).
* SDIM bucket sums (`update_bucket_sums`): when the model keeps them
  (`SdimSource.sums_window` > 0), the sums of the last W behaviors per
  (hash function, code). Events appended in order add the behaviors that enter
  the window to their m buckets and subtract those that leave it (one
  scatter over them: the incremental form of `kernels.sdim_bucket_sums`,
  with values from the model's cached `behavior_values`, so a warm consumer
  does not call the model), counts likewise, a bucket whose count drops to 0
  reset to exactly 0 so that float residue never becomes a unit vector); anything else
  (out-of-order events, sums of another model version, none stored yet)
  rebuilds them from the stored sequence. Either way they equal the sums of
  ``seq[-W:]`` up to float rounding (tests check both paths against the
  rebuild). They are part of the user's value, so they are written in the same
  transaction as the event's dedupe mark. Rounding: a bucket's sum carries the
  fp32 error of its additions and subtractions since its last rebuild (about
  1e-7 relative per operation; SDIM normalizes the sums, so only their
  direction matters).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Collection, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from features.schema import Event
from features.sequence import SequenceConfig, SequenceState, action_codes, append_behaviors
from features.transforms import StatsConfig
from serving.state.codec import BucketSums, CounterLog, UserRecord

SignatureLookup = Callable[[np.ndarray], np.ndarray]  # item ids (L,) -> packed signatures (L,) int64


class SdimSource(Protocol):
    """What keeping SDIM bucket sums needs from the served model (`serving.models.ModelBundle`)."""

    sig_spec: int  # the version the sums are tagged with

    @property
    def sums_window(self) -> int:
        """W: the sums cover the last W behaviors (0: the model keeps no sums)."""
        ...

    def bucket_sums(self, item_ids: np.ndarray, categories: np.ndarray, actions: np.ndarray,
                    signatures: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A user's behaviors -> the sums of the last W of them: (sums (m, K, D) float32, counts (m, K) int32)
        (`kernels.sdim_bucket_sums` through the ranker: the rebuild); with `lengths` (B,), B users at once."""
        ...

    def behavior_values(self, item_ids: np.ndarray, categories: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(E,) behaviors -> (E, D) float32 values (the ranker's `behavior_values`, cached per token)."""
        ...

    def signature_codes(self, signatures: np.ndarray) -> np.ndarray:
        """(E,) packed signatures -> (E, m) int64 codes."""
        ...


def rebuild_bucket_sums(seq: SequenceState, sigs: np.ndarray, src: SdimSource) -> BucketSums | None:
    """The sums of the last `src.sums_window` behaviors of `seq` (signatures `sigs`, parallel); None if empty."""
    return rebuild_many([(seq, sigs)], src)[0] if len(seq) else None


def rebuild_many(users: Sequence[tuple[SequenceState, np.ndarray]], src: SdimSource) -> list[BucketSums]:
    """`rebuild_bucket_sums` of many non-empty (sequence, signatures) pairs in one model call."""
    if not users:
        return []
    tails = [slice(max(0, len(seq) - src.sums_window), len(seq)) for seq, _ in users]
    cols = [np.concatenate([getattr(seq, name)[t] for (seq, _), t in zip(users, tails)])
            for name in ("item_ids", "categories", "actions")]
    sums, counts = src.bucket_sums(*cols, np.concatenate([g[t] for (_, g), t in zip(users, tails)]),
                                   lengths=np.array([t.stop - t.start for t in tails], np.int64))
    return [BucketSums(sums[i], counts[i], src.sig_spec) for i in range(len(users))]


def with_bucket_sums(records: dict[int, UserRecord], src: SdimSource, chunk: int = 4096) -> dict[int, UserRecord]:
    """`records` (their signatures from `src`) with their sums rebuilt, `chunk` users per model call (backfill)."""
    users = [u for u, r in records.items() if len(r.seq) and r.sigs is not None and r.sig_spec == src.sig_spec]
    out = dict(records)
    for c in range(0, len(users), chunk):
        part = users[c:c + chunk]
        for u, sums in zip(part, rebuild_many([(records[u].seq, records[u].sigs) for u in part], src)):
            out[u] = dataclasses.replace(records[u], sdim=sums)
    return out


class _Folded(NamedTuple):
    """One user's record folded with its batch, before signatures and sums (`apply_user_batches`)."""

    rec: UserRecord  # as stored
    seq: SequenceState  # after the batch's behaviors
    in_order: bool  # the behaviors were appended (append_behaviors' fast path)
    appended: int  # behaviors in the batch
    log: CounterLog  # after the batch's counted events


@dataclass(frozen=True)
class _SumsPlan:
    """One user's SDIM sums update: the stored record before, the sequence after, `appended` behaviors."""

    old: UserRecord
    seq: SequenceState
    sigs: np.ndarray
    appended: int
    in_order: bool


def update_bucket_sums(plans: Sequence[_SumsPlan], src: SdimSource, cap: int) -> list[BucketSums | None]:
    """The sums of each plan's `seq` (see the module docstring), for many users at once: the incremental ones
    in one value lookup (`src.behavior_values`, cached per token) and one scatter-add over every entering
    and leaving behavior of the batch, the rebuilds in one model call. `cap`: the sequence cap (the window
    never reaches past it)."""
    out: list[BucketSums | None] = [None] * len(plans)
    rebuild: list[int] = []
    inc: list[tuple[int, slice, slice]] = []  # (plan, entering slice of seq, leaving slice of old.seq)
    w = min(src.sums_window, cap)
    spec = src.sig_spec
    for i, p in enumerate(plans):
        prev, old = p.old.sdim, p.old
        if not (p.in_order and prev is not None and prev.spec == spec and old.sig_spec == spec
                and old.sigs is not None):
            rebuild.append(i)
        elif p.appended == 0:
            out[i] = prev
        else:
            lo, total = len(old.seq), len(old.seq) + p.appended  # positions in old.seq + the appended behaviors
            leave = slice(max(0, lo - w), min(lo, max(0, total - w)))  # in old.seq
            enter = slice(max(lo, total - w) - total + len(p.seq), len(p.seq))  # in seq (its last behaviors)
            inc.append((i, enter, leave))
    if inc:
        olds = [plans[i].old for i, _, _ in inc]
        m, k, dim = olds[0].sdim.sums.shape
        # every user's new sums at once: the stored ones stacked (one copy), the deltas added in place
        counts = np.stack([o.sdim.counts for o in olds]).astype(np.int32, copy=False)  # (U, m, K)
        # sums that do not cover the stored sequence's window (another window, lost writes) start over
        covers = counts[:, 0, :].sum(axis=1) == np.minimum([len(o.seq) for o in olds], src.sums_window)
        if not covers.all():
            rebuild += [i for (i, _, _), ok in zip(inc, covers.tolist()) if not ok]
            inc = [x for x, ok in zip(inc, covers.tolist()) if ok]
            olds = [o for o, ok in zip(olds, covers.tolist()) if ok]
            counts = counts[covers]
    if inc:
        seqs = [plans[i].seq for i, _, _ in inc]
        sigs = [plans[i].sigs for i, _, _ in inc]
        # entering then leaving behaviors of each user, users in order: (E,) columns
        cuts = [(seq, enter, o.seq, leave) for seq, (_, enter, leave), o in zip(seqs, inc, olds)]

        def cols(name: str) -> np.ndarray:
            return np.concatenate([a for new, e, old, lv in cuts
                                   for a in (getattr(new, name)[e], getattr(old, name)[lv])])

        values = src.behavior_values(cols("item_ids"), cols("categories"), cols("actions"))  # (E, D)
        codes = src.signature_codes(np.concatenate([a for g, (_, e, lv), o in zip(sigs, inc, olds)
                                                    for a in (g[e], o.sigs[lv])]))  # (E, m)
        n_moves = np.array([(e.stop - e.start, lv.stop - lv.start) for _, e, lv in inc], np.int64).reshape(-1)
        sign = np.repeat(np.tile(np.array([1, -1], np.int32), len(inc)), n_moves)  # +1 entering, -1 leaving
        owner = np.repeat(np.arange(len(inc)), n_moves.reshape(-1, 2).sum(axis=1))  # (E,) row of each behavior's user
        # behavior e goes to bucket (j, codes[e, j]) of its user for every hash function j: one flat slot each
        slot = ((owner[:, None] * m + np.arange(m)) * k + codes).reshape(-1)  # (E*m,)
        weighted = np.repeat(values.astype(np.float32, copy=False) * sign[:, None].astype(np.float32), m, axis=0)
        sums = np.stack([o.sdim.sums for o in olds]).astype(np.float32, copy=False)  # (U, m, K, D)
        flat_sums, flat_counts = sums.reshape(-1, dim), counts.reshape(-1)
        # one scatter-add (numpy's reduceat over many short segments was ~20 ms per 5,000-event batch)
        torch.from_numpy(flat_sums).index_add_(0, torch.from_numpy(slot), torch.from_numpy(weighted))
        flat_counts += np.bincount(slot, np.repeat(sign, m), len(inc) * m * k).astype(np.int32)
        flat_sums[flat_counts == 0] = 0.0  # an empty bucket holds exactly 0 (no rounding left behind)
        # stored sums that do not match the stored sequence (a bucket below 0): start over from the sequence
        broken = counts.reshape(len(inc), -1).min(axis=1) < 0
        for r, (i, _, _) in enumerate(inc):
            if broken[r]:
                rebuild.append(i)
            else:
                # each user's own arrays, not views of the batch's (a cached record must not keep them alive)
                out[i] = BucketSums(sums[r].copy(), counts[r].copy(), spec)
    todo = [i for i in rebuild if len(plans[i].seq)]
    for i, sums in zip(todo, rebuild_many([(plans[i].seq, plans[i].sigs) for i in todo], src)):
        out[i] = sums
    return out


def prune_cutoff(newest_ms: int, retention_ms: int, now_ms: int | None = None) -> int:
    """Log entries before this are outside the retention: counted back from the newest event, but never
    from later than the wall clock `now_ms` (default: now), whatever timestamp an event carried."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    return min(newest_ms, now_ms) - retention_ms


def extend_log(log: CounterLog, ts: np.ndarray, pos: np.ndarray, retention_ms: int,
               now_ms: int | None = None) -> CounterLog:
    """Adds counted events to a counter log and drops what fell out of the retention (`prune_cutoff`)."""
    if ts.size == 0:
        return log
    all_ts = np.concatenate([log.ts_ms, ts])
    all_pos = np.concatenate([log.pos, pos.astype(np.uint8, copy=False)])
    cutoff = prune_cutoff(int(all_ts.max()), retention_ms, now_ms)
    if all_ts.min() < cutoff:  # something fell out of the retention (one reduction when nothing did)
        keep = all_ts >= cutoff
        all_ts, all_pos = all_ts[keep], all_pos[keep]
    return CounterLog(all_ts, all_pos, log.total_cnt + int(ts.size), log.total_pos + int(pos.sum()))


@dataclass(frozen=True)
class UserBatch:
    """One user's new events (deduplicated, arrival order) as arrays: slices of an `EventArrays`."""

    beh_items: np.ndarray  # (B,) int64 behaviors only
    beh_ts: np.ndarray
    beh_actions: np.ndarray
    beh_categories: np.ndarray
    cnt_ts: np.ndarray  # (K,) counted events only
    cnt_pos: np.ndarray  # (K,) uint8


@dataclass(frozen=True)
class EventArrays:
    """The per-event fields of a run of events, vectorised once; users' `UserBatch`es are cut from them."""

    item: np.ndarray  # (N,) int64
    ts: np.ndarray  # (N,) int64
    act: np.ndarray  # (N,) int64 features.sequence.action_code
    cat: np.ndarray  # (N,) int64 the item's primary category id
    beh: np.ndarray  # (N,) bool a behavior (SequenceConfig.behavior_event_types)
    cnt: np.ndarray  # (N,) bool a counted event (StatsConfig.counted_event_types)
    pos: np.ndarray  # (N,) uint8 label >= 0.5

    @classmethod
    def of_columns(cls, item_ids: np.ndarray, ts_ms: np.ndarray, event_types: Sequence[str] | np.ndarray,
                   labels: np.ndarray, categories: Callable[[np.ndarray], np.ndarray] | Sequence[int] | np.ndarray,
                   behavior_types: Collection[str], counted_types: Collection[str]) -> "EventArrays":
        """`event_types`: names; `categories`: item ids -> primary category ids (`Catalog.primary_categories`),
        or the ids themselves, parallel to the events."""
        item = np.asarray(item_ids, np.int64)
        pos = (np.asarray(labels) >= 0.5).astype(np.uint8)
        cat = np.asarray(categories(item) if callable(categories) else categories, np.int64)
        behavior_types, counted_types = frozenset(behavior_types), frozenset(counted_types)
        return cls(item, np.asarray(ts_ms, np.int64), action_codes(event_types, pos), cat,
                   np.fromiter((t in behavior_types for t in event_types), bool, len(item)),
                   np.fromiter((t in counted_types for t in event_types), bool, len(item)), pos)

    @classmethod
    def of_events(cls, events: Sequence[Event], categories: Callable[[np.ndarray], np.ndarray] | Sequence[int],
                  behavior_types: Collection[str], counted_types: Collection[str]) -> "EventArrays":
        n = len(events)
        item = np.fromiter((e.item_id for e in events), np.int64, n)
        ts = np.fromiter((e.ts_ms for e in events), np.int64, n)
        labels = np.fromiter((e.label for e in events), np.float64, n)
        return cls.of_columns(item, ts, [e.event_type for e in events], labels, categories, behavior_types,
                              counted_types)

    def spans(self, cuts: Sequence[int]) -> list[UserBatch]:
        """The batch of events [cuts[k], cuts[k + 1]) for each k: slices of the run's behaviors and counted
        events (no per-user copies)."""
        b_idx, c_idx = np.flatnonzero(self.beh), np.flatnonzero(self.cnt)
        bc, cc = np.searchsorted(b_idx, cuts).tolist(), np.searchsorted(c_idx, cuts).tolist()
        item, ts, act, cat = self.item[b_idx], self.ts[b_idx], self.act[b_idx], self.cat[b_idx]
        c_ts, c_pos = self.ts[c_idx], self.pos[c_idx]
        return [UserBatch(item[b0:b1], ts[b0:b1], act[b0:b1], cat[b0:b1], c_ts[c0:c1], c_pos[c0:c1])
                for b0, b1, c0, c1 in zip(bc[:-1], bc[1:], cc[:-1], cc[1:])]

    def select(self, sel: np.ndarray) -> UserBatch:
        """The batch of the events at positions `sel` (in arrival order)."""
        bi, ci = sel[self.beh[sel]], sel[self.cnt[sel]]
        return UserBatch(self.item[bi], self.ts[bi], self.act[bi], self.cat[bi], self.ts[ci], self.pos[ci])


def apply_user_batch(rec: UserRecord, b: UserBatch, seq_cfg: SequenceConfig, retention_ms: int, sig_spec: int = 0,
                     signatures: SignatureLookup | None = None, now_ms: int | None = None,
                     sdim: SdimSource | None = None) -> UserRecord:
    """A user's record after the events of `b` (see the module docstring): `apply_user_batches` of one user.

    `sdim`: the served model when it keeps SDIM bucket sums (its `sig_spec` must be `sig_spec`); None keeps none.
    """
    return apply_user_batches([rec], [b], seq_cfg, retention_ms, sig_spec, signatures, now_ms, sdim)[0]


def apply_user_batches(recs: Sequence[UserRecord], batches: Sequence[UserBatch], seq_cfg: SequenceConfig,
                       retention_ms: int, sig_spec: int = 0, signatures: SignatureLookup | None = None,
                       now_ms: int | None = None, sdim: SdimSource | None = None) -> list[UserRecord]:
    """Each user's record after its batch of events (user i: `recs[i]`, `batches[i]`); the SDIM sums of all of
    them together (`update_bucket_sums`: the consumer's poll batch costs a few array operations, not a model
    call per user)."""
    if sdim is not None and sdim.sums_window > 0 and sdim.sig_spec != sig_spec:
        raise ValueError(f"apply_user_batch: the SDIM source has spec {sdim.sig_spec}, the signatures {sig_spec}")
    rows = []
    for rec, b in zip(recs, batches):
        seq, fast = append_behaviors(rec.seq, b.beh_items, b.beh_ts, b.beh_actions, b.beh_categories, seq_cfg)
        rows.append(_Folded(rec, seq, fast, len(b.beh_items),
                            extend_log(rec.log, b.cnt_ts, b.cnt_pos, retention_ms, now_ms)))
    all_sigs: list[np.ndarray | None] = [None] * len(rows)
    if sig_spec and signatures is not None:
        # one signature lookup for the whole batch: a user whose stored signatures are this model's and whose
        # behaviors were appended needs only the appended ones', any other its whole sequence's
        extend = [f.in_order and f.rec.sig_spec == sig_spec and f.rec.sigs is not None for f in rows]
        parts = [f.seq.item_ids[len(f.seq) - min(f.appended, len(f.seq)):] if ext else f.seq.item_ids
                 for f, ext in zip(rows, extend)]
        looked = np.split(signatures(np.concatenate(parts)) if parts else np.empty(0, np.int64),
                          np.cumsum([len(x) for x in parts])[:-1])
        for r, (f, ext, new) in enumerate(zip(rows, extend, looked)):
            if ext:
                all_sigs[r] = np.concatenate([f.rec.sigs, new])[-len(f.seq):] if len(f.seq) else np.empty(0, np.int64)
            else:
                all_sigs[r] = new
    keep_sums = sdim is not None and sdim.sums_window > 0
    planned = [r for r, sigs in enumerate(all_sigs) if keep_sums and sigs is not None]
    sums_of: dict[int, BucketSums | None] = {}
    if planned:
        sums_of = dict(zip(planned, update_bucket_sums(
            [_SumsPlan(rows[r].rec, rows[r].seq, all_sigs[r], rows[r].appended, rows[r].in_order) for r in planned],
            sdim, seq_cfg.long_cap)))
    return [UserRecord(seq=f.seq, log=f.log, attrs=f.rec.attrs, sigs=sigs, sig_spec=sig_spec if sigs is not None else 0,
                       attrs_raw=f.rec.attrs_raw, sdim=sums_of.get(r))
            for r, (f, sigs) in enumerate(zip(rows, all_sigs))]


def apply_user_events(
    rec: UserRecord,
    events: Sequence[Event],
    categories: Sequence[int],
    seq_cfg: SequenceConfig,
    stats: StatsConfig,
    retention_ms: int,
    sig_spec: int = 0,
    signatures: SignatureLookup | None = None,
    now_ms: int | None = None,
    sdim: SdimSource | None = None,
) -> UserRecord:
    """A user's record after `events` (one user's, in arrival order, deduplicated); `categories` parallel
    (the consumer's path for one user: `EventArrays`, then `apply_user_batch`)."""
    b = EventArrays.of_events(events, categories, seq_cfg.behavior_event_types, stats.counted_event_types()).spans(
        [0, len(events)])[0]
    return apply_user_batch(rec, b, seq_cfg, retention_ms, sig_spec, signatures, now_ms, sdim)
