"""SDIM bucket sums kept at ingest: stored in the user's value, updated with every event, rebuilt for a new
model, and served from (the ranker gathers instead of scanning the behaviors) or, when unusable, counted and
scanned instead."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from features.schema import Event
from features.sequence import SequenceConfig, SequenceState
from features.transforms import StatsConfig
from ranking.inference import make_inference
from ranking.model import RankerModel
from serving.state.codec import BucketSums, StateDecodeError, UserRecord, decode_user, encode_user
from serving.state.update import apply_user_events, rebuild_bucket_sums, with_bucket_sums
from tests.ranking.batches import tiny_config

DAY = 86_400_000
SUMS_TOL = dict(rtol=1e-5, atol=2e-5)  # fp32 sums after many additions and subtractions vs one rebuild


class RankerSums:
    """The `SdimSource` a bundle is, over a tiny real SDIM ranker (serving.models.ModelBundle, without its
    value cache)."""

    def __init__(self, seed: int, long_len: int, spec: int) -> None:
        torch.manual_seed(seed)
        self.ranker = make_inference(RankerModel(tiny_config(False, "sdim", 1, long_len=long_len),
                                                 embedding_device="cpu"))
        self.sig_spec = spec

    @property
    def sums_window(self) -> int:
        return self.ranker.sums_window

    def signatures(self, ids: np.ndarray) -> np.ndarray:
        return self.ranker.behavior_signatures(np.asarray(ids, np.int64)).numpy()

    def bucket_sums(self, *cols: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.ranker.bucket_sums(*cols, lengths=lengths)

    def behavior_values(self, *cols: np.ndarray) -> np.ndarray:
        return self.ranker.behavior_values(*cols)

    def signature_codes(self, sigs: np.ndarray) -> np.ndarray:
        return self.ranker.signature_codes(sigs)


def _apply(rec, src, events, cfg):
    return apply_user_events(rec, events, [e.item_id % 7 + 100 for e in events], cfg, StatsConfig(), DAY,
                             src.sig_spec, src.signatures, sdim=src)


def _assert_matches_rebuild(rec: UserRecord, src) -> None:
    want = rebuild_bucket_sums(rec.seq, rec.sigs, src)
    if want is None:
        assert rec.sdim is None
        return
    assert rec.sdim is not None and rec.sdim.spec == src.sig_spec
    np.testing.assert_array_equal(rec.sdim.counts, want.counts)
    np.testing.assert_allclose(rec.sdim.sums, want.sums, **SUMS_TOL)
    assert not rec.sdim.sums[rec.sdim.counts == 0].any()  # an emptied bucket is exactly 0, not float residue
    assert rec.sdim.covered == min(len(rec.seq), src.sums_window)


# ---------------------------------------------------------------- layout


def _sums(m=8, k=8, d=32, spec=77, seed=0) -> BucketSums:
    rng = np.random.default_rng(seed)
    return BucketSums(rng.standard_normal((m, k, d)).astype(np.float32), rng.integers(0, 9, (m, k)).astype(np.int32),
                      spec)


@pytest.mark.parametrize("n, sigs", [(0, False), (5, True), (300, True)])
def test_sums_round_trip_beside_the_sequence(n, sigs):
    rng = np.random.default_rng(n)
    seq = SequenceState(rng.integers(1, 99, n), np.arange(n), rng.integers(0, 9, n), rng.integers(0, 9, n))
    rec = UserRecord(seq, UserRecord.empty().log, sigs=rng.integers(0, 2**24, n) if sigs else None,
                     sig_spec=77 if sigs else 0, sdim=_sums())
    blob = encode_user(rec)
    got = decode_user(blob)
    assert got.seq.equals(seq) and got.sdim is not None and got.sdim.spec == 77
    np.testing.assert_array_equal(got.sdim.sums, rec.sdim.sums)
    np.testing.assert_array_equal(got.sdim.counts, rec.sdim.counts)
    assert len(blob) == len(encode_user(dataclasses.replace(rec, sdim=None))) + rec.sdim.nbytes()
    assert rec.sdim.nbytes() == 16 + 8 * 8 * 4 + 8 * 8 * 32 * 4  # 8.5 KB with the default m, tau and D


def test_a_truncated_sums_section_is_a_decode_error():
    rec = UserRecord(SequenceState.empty(), UserRecord.empty().log, sdim=_sums())
    blob = encode_user(rec)
    with pytest.raises(StateDecodeError, match="u:1"):
        decode_user(blob[:-4], where="u:1")


def test_sums_without_a_model_version_are_refused():
    with pytest.raises(ValueError, match="non-zero spec"):
        encode_user(UserRecord(SequenceState.empty(), UserRecord.empty().log, sdim=_sums(spec=0)))


# ---------------------------------------------------------------- ingest


@pytest.mark.parametrize("seed", range(3))
def test_incremental_sums_equal_a_rebuild_on_random_streams(seed):
    """In-order batches (add entering, subtract leaving), late events (rebuild), the window (12) and the cap
    (30) crossed many times, batches with no behaviors: after every batch the stored sums are the rebuild's."""
    src = RankerSums(seed, long_len=12, spec=5)
    cfg = SequenceConfig(long_cap=30, short_cap=5)
    rng = np.random.default_rng(seed)
    rec, ts, eid = UserRecord.empty(), 1_000, 0
    for step in range(60):
        events = []
        for _ in range(int(rng.integers(0, 8))):
            late = rng.random() < 0.1
            ts += int(rng.integers(1, 50))
            kind = "impression" if rng.random() < 0.15 else str(rng.choice(["click", "rating", "purchase"]))
            events.append(Event(f"e{eid}", 1, int(rng.integers(1, 150)), ts - (500 if late else 0), kind,
                                float(rng.integers(0, 2))))
            eid += 1
        rec = _apply(rec, src, events, cfg)
        _assert_matches_rebuild(rec, src)
        rec = decode_user(encode_user(rec))  # what the next batch reads back from Redis
    assert len(rec.seq) == 30 and rec.sdim.covered == 12


def test_sums_of_another_model_are_rebuilt_on_the_next_write():
    cfg = SequenceConfig(long_cap=50, short_cap=5)
    old, new = RankerSums(0, long_len=12, spec=5), RankerSums(1, long_len=12, spec=6)
    events = [Event(f"e{i}", 1, 10 + i, 1_000 + i, "click", 1.0) for i in range(20)]
    rec = _apply(UserRecord.empty(), old, events[:19], cfg)
    assert rec.sdim.spec == 5
    rec = _apply(rec, new, events[19:], cfg)
    assert rec.sdim.spec == 6 and rec.sig_spec == 6
    _assert_matches_rebuild(rec, new)


def test_counted_only_events_keep_the_sums():
    cfg = SequenceConfig(long_cap=50, short_cap=5)
    src = RankerSums(0, long_len=12, spec=5)
    rec = _apply(UserRecord.empty(), src, [Event(f"e{i}", 1, 10 + i, 1_000 + i, "click", 1.0) for i in range(5)], cfg)
    after = _apply(rec, src, [Event("imp", 1, 3, 2_000, "impression", 0.0)], cfg)
    assert after.sdim is rec.sdim and len(after.seq) == 5


def test_a_backfill_builds_many_users_sums_at_once_like_one_by_one():
    cfg = SequenceConfig(long_cap=50, short_cap=5)
    src = RankerSums(2, long_len=12, spec=5)
    recs = {}
    for u, n in enumerate((0, 1, 11, 12, 13, 40)):
        events = [Event(f"{u}-{i}", u, 1 + (u * 31 + i * 7) % 150, 1_000 + i, "click", 1.0) for i in range(n)]
        recs[u] = dataclasses.replace(_apply(UserRecord.empty(), src, events, cfg), sdim=None)
    built = with_bucket_sums(recs, src, chunk=4)
    assert built[0].sdim is None
    for u in range(1, 6):
        want = rebuild_bucket_sums(recs[u].seq, recs[u].sigs, src)
        np.testing.assert_array_equal(built[u].sdim.counts, want.counts)
        np.testing.assert_allclose(built[u].sdim.sums, want.sums, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- serving (real bundles; the runtime over
# the in-memory store, the consumer over real Kafka and Redis)


def _runtime(store, model_bundles, catalog, version="v1"):
    from features.config import load_config
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import Availability, CatalogRef, Popularity, Runtime

    cfg = load_config(ServingConfig, None, [])
    metrics, holder, cat = ServingMetrics(), ModelHolder(), CatalogRef(catalog)
    path, checksum = model_bundles[version]
    bundle = ModelManager(holder, cat, cfg.state, cfg.models, metrics).load(path, version, checksum)
    rt = Runtime(cfg.limits, cfg.runtime, store, holder, cat, Popularity(), Availability(), metrics)
    return cfg, bundle, rt, metrics


def _fallbacks(metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("cascade_sdim_sums_fallbacks_total", {"reason": reason}) or 0.0


def test_served_scores_from_stored_sums_equal_the_full_scan(model_bundles, catalog, ml100k_dataset, memory_store):
    """A backfill (bootstrap with the bundle) stores every user's sums; the request path serves from them, and
    the scores equal those of the scan the server falls back to when they are missing or do not fit the
    request (counted by reason)."""
    from serving.bootstrap import bootstrap_dataset
    from serving.runtime import RankQuery

    store = memory_store
    cfg, bundle, rt, metrics = _runtime(store, model_bundles, catalog)
    assert bundle.sums_window == 200  # the test bundles' long_len
    bootstrap_dataset(store, ml100k_dataset, cfg.state, catalog, bundle=bundle)
    cands = tuple(int(i) for i in catalog.item_ids[:200])
    lengths = {u: len(store.read_user(u).seq) for u in range(1, 60)}
    short = [u for u, n in lengths.items() if n < 200][:2]
    users = short + [u for u, n in lengths.items() if n > 200][:2]  # within the window, and beyond it
    assert len(users) == 4
    for uid in users:
        rec = store.read_user(uid)
        _assert_matches_rebuild(rec, bundle)
        q = RankQuery(user_id=uid, k=200, candidate_item_ids=cands)
        served = rt.rank(q)
        assert _fallbacks(metrics, "missing") == users.index(uid)  # only the scans below counted
        store.put_users({uid: dataclasses.replace(rec, sdim=None)})
        scanned = rt.rank(q)
        np.testing.assert_allclose(served.scores[np.argsort(served.item_ids)],
                                   scanned.scores[np.argsort(scanned.item_ids)], rtol=1e-4, atol=1e-6)
    assert _fallbacks(metrics, "missing") == 4

    rec = store.read_user(60)
    r = rt.rank(RankQuery(user_id=60, k=5, as_of_ms=int(rec.seq.ts_ms[len(rec.seq) // 2])))
    assert r.fallback_reason == "" and _fallbacks(metrics, "point_in_time") == 1


@pytest.mark.integration
def test_the_consumer_keeps_the_sums_and_rebuilds_them_for_a_new_model(make_server, wait_until, model_bundles):
    """Events through Kafka -> the consumer's transaction keeps the sums (== a rebuild); after a swap to v2
    the request path scans (version mismatch, counted) until the user's next event rebuilds them for v2."""
    from features.messages import ModelAnnouncement

    h = make_server(bootstrap=False)
    uid, now = 77, 893_286_700_000
    events = [Event(f"s-{i}", uid, 1 + (i * 37) % 1600, now + i, "rating", float(i % 2)) for i in range(230)]
    h.send_events(events)
    wait_until(lambda: h.metric("cascade_events_applied_total") == 230, what="230 events applied")
    v1 = h.app.models.current
    rec = h.app.store.read_user(uid)
    assert len(rec.seq) == 230 and rec.sdim.spec == v1.sig_spec
    _assert_matches_rebuild(rec, v1)
    assert h.rank(uid, k=5).fallback_reason == ""
    assert h.metric("cascade_sdim_sums_fallbacks_total", {"reason": "version"}) == 0

    path, checksum = model_bundles["v2"]
    h.send_raw(h.topics.models, ModelAnnouncement("v2", str(path), checksum).encode())
    wait_until(lambda: h.app.models.current.version == "v2", what="the swap to v2")
    h.rank(uid, k=5)
    assert h.metric("cascade_sdim_sums_fallbacks_total", {"reason": "version"}) == 1

    h.send_events([Event("s-next", uid, 5, now + 1_000, "click", 1.0)])
    wait_until(lambda: h.metric("cascade_events_applied_total") == 231, what="the next event applied")
    v2 = h.app.models.current
    rec = h.app.store.read_user(uid)
    assert rec.sdim.spec == v2.sig_spec != v1.sig_spec
    _assert_matches_rebuild(rec, v2)
    h.rank(uid, k=5)
    assert h.metric("cascade_sdim_sums_fallbacks_total", {"reason": "version"}) == 1


def test_many_users_at_once_equal_their_rebuilds():
    """The consumer's path: one poll batch of many users (`apply_user_batches`) mixes first writes (rebuilds),
    in-order appends that slide the window (the grouped scatter), users whose batch holds no behavior, and a
    late event (rebuild); every user's sums equal the rebuild of its sequence, and equal what the user alone
    would get."""
    from serving.state.update import EventArrays, apply_user_batch, apply_user_batches

    src = RankerSums(5, long_len=6, spec=41)
    cfg = SequenceConfig(long_cap=40, short_cap=10)
    rng = np.random.default_rng(3)
    recs = {u: UserRecord.empty() for u in range(12)}
    t = 1_000
    for round_ in range(6):
        users, batches = [], []
        events: list[Event] = []
        cuts = [0]
        for u in range(12):
            n = int(rng.integers(0, 4))
            kinds = ["impression"] * n if u == 11 else ["click"] * n  # user 11: no behaviors ever
            late = round_ == 4 and u == 3  # one user's event arrives out of order
            for j in range(n):
                t += 1
                events.append(Event(f"r{round_}-u{u}-{j}", u, int(rng.integers(1, 30)), t - (500 if late else 0),
                                    kinds[j], 1.0))
            cuts.append(len(events))
            users.append(u)
        arrays = EventArrays.of_events(events, [e.item_id % 7 + 100 for e in events], cfg.behavior_event_types,
                                       StatsConfig().counted_event_types())
        batches = arrays.spans(cuts)
        together = apply_user_batches([recs[u] for u in users], batches, cfg, DAY, src.sig_spec, src.signatures,
                                      sdim=src)
        for u, b, got in zip(users, batches, together):
            alone = apply_user_batch(recs[u], b, cfg, DAY, src.sig_spec, src.signatures, sdim=src)
            _assert_matches_rebuild(got, src)
            assert (got.sdim is None) == (alone.sdim is None)
            if got.sdim is not None:
                np.testing.assert_array_equal(got.sdim.counts, alone.sdim.counts)
                np.testing.assert_allclose(got.sdim.sums, alone.sdim.sums, **SUMS_TOL)
            recs[u] = got
    assert recs[11].sdim is None and all(recs[u].sdim is not None for u in range(11) if len(recs[u].seq))


def test_stored_sums_that_do_not_match_the_sequence_are_rebuilt_in_a_batch_of_healthy_users():
    """A user whose stored counts cannot be what its sequence gives (a bucket would go below zero when its
    oldest behavior leaves the window) is rebuilt from the sequence; the other users of the same batch keep
    the incremental path, and everyone ends equal to a rebuild."""
    from serving.state.update import EventArrays, apply_user_batches

    src = RankerSums(2, long_len=5, spec=19)
    cfg = SequenceConfig(long_cap=40, short_cap=10)
    recs = []
    for u in range(3):  # each user's window full (8 behaviors > W = 5)
        rec = _apply(UserRecord.empty(), src, [Event(f"s{u}-{j}", u, 3 + j + u, 1_000 + j, "click", 1.0)
                                               for j in range(8)], cfg)
        recs.append(rec)
    bad = recs[1]
    oldest = len(bad.seq) - src.sums_window  # the window's oldest behavior: the next one to leave
    code = int(src.signature_codes(bad.sigs[oldest:oldest + 1])[0, 1])
    counts = bad.sdim.counts.copy()
    counts[1] = 0
    counts[1, (code + 1) % counts.shape[1]] = src.sums_window  # hash 1's total kept, but not in the leaving bucket
    recs[1] = dataclasses.replace(bad, sdim=BucketSums(bad.sdim.sums, counts, bad.sdim.spec))
    events = [Event(f"n{u}", u, 20 + u, 2_000, "click", 1.0) for u in range(3)]
    arrays = EventArrays.of_events(events, [e.item_id % 7 + 100 for e in events], cfg.behavior_event_types,
                                   StatsConfig().counted_event_types())
    out = apply_user_batches(recs, arrays.spans([0, 1, 2, 3]), cfg, DAY, src.sig_spec, src.signatures, sdim=src)
    for rec in out:
        _assert_matches_rebuild(rec, src)
