"""The request path as named stages (`serving.runtime.Runtime.stages`, run by `Runtime.rank`) and the request's
batch validated once, piece by piece, where `serving.batching` builds it."""
from __future__ import annotations

import numpy as np
import pytest

from features.batch import BatchSpec, BatchValidationError, validate_batch
from features.sequence import SequenceState

STAGES = ["state_read", "user_tower", "ann", "filter_seen", "item_stats", "features", "ranker", "topk"]


def _view(ts_ms: list[int]):
    from serving.batching import UserView

    n = len(ts_ms)
    ids = np.arange(1, n + 1, dtype=np.int64)
    seq = SequenceState(ids, np.asarray(ts_ms, np.int64), np.full(n, 9, np.int64), np.zeros(n, np.int64))
    return UserView(7, seq, None, np.zeros((1, 2), np.float32), {})


def test_the_user_part_is_validated_where_it_is_built():
    """A behavior at or after the request time is refused by `user_batch` itself (before the user tower runs);
    `validate=False` trusts the builder."""
    from serving.batching import user_batch

    with pytest.raises(BatchValidationError, match="not before request_ts=20 .*see the future"):
        user_batch(_view([10, 20]), 20)
    assert int(user_batch(_view([10, 20]), 20, validate=False).history.lengths().sum()) == 2 * 4  # 4 parallel keys


def test_with_candidates_checks_what_it_adds_and_shares_the_user_part(catalog):
    """The candidate part is checked where it is added; the user and history parts are the user batch's own
    tensors (validated when that was built), and the whole passes the whole-batch check."""
    from serving.batching import user_batch, with_candidates

    user = user_batch(_view([10, 20]), 21)
    ids = np.asarray(catalog.item_ids[:3], np.int64)
    with pytest.raises(BatchValidationError, match=r"candidate_dense: shape \(2, 4\), expected \(3, 4\)"):
        with_candidates(user, catalog, ids, np.zeros((2, 4), np.float32))
    batch = with_candidates(user, catalog, ids, np.zeros((3, 4), np.float32))
    assert batch.history is user.history and batch.user is user.user and batch.user_dense is user.user_dense
    assert batch.request_ts is user.request_ts  # one request time: the history check made for `user` holds
    validate_batch(batch, BatchSpec(candidate_dense_dim=4))


# ---------------------------------------------------------------- the runtime (real Redis, real bundles)


@pytest.fixture()
def served(model_bundles, catalog, ml100k_dataset, redis_server):
    from features.config import load_config
    from serving.bootstrap import bootstrap_dataset
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import Availability, CatalogRef, Popularity, Runtime
    from serving.state.redis_store import RedisOnlineStore

    cfg = load_config(ServingConfig, None, [f"redis.url={redis_server.address}"])
    metrics, holder, cat = ServingMetrics(), ModelHolder(), CatalogRef(catalog)
    path, checksum = model_bundles["v1"]
    bundle = ModelManager(holder, cat, cfg.state, cfg.models, metrics).load(path, "v1", checksum)
    store = RedisOnlineStore(cfg.redis)
    try:
        bootstrap_dataset(store, ml100k_dataset, cfg.state, catalog, bundle=bundle)
        rt = Runtime(cfg.limits, cfg.runtime, store, holder, cat, Popularity(*store.top_items(100)), Availability(),
                     metrics)
        yield rt, bundle, metrics
    finally:
        store.close()


@pytest.mark.integration
def test_every_kind_of_request_is_timed_stage_by_stage_in_order(served, catalog):
    """The runner times each stage of every request under the stage's name, whichever way the candidates
    come (index, client, popularity for a cold user); a Redis-down answer is timed as the state read it
    replaces. The degraded ones are counted by reason."""
    from serving.runtime import RankQuery

    rt, _, metrics = served
    assert [name for name, _ in rt.stages] == STAGES
    client = tuple(int(i) for i in catalog.item_ids[:20])
    for q, reason in ((RankQuery(user_id=1, k=5, exclude_seen=True), ""),
                      (RankQuery(user_id=1, k=5, candidate_item_ids=client), ""),
                      (RankQuery(user_id=123_456_789, k=5), "cold_start")):
        r = rt.rank(q)
        assert [s for s, _ in r.timings] == STAGES + ["total"] and r.fallback_reason == reason
        assert len(r.item_ids) == 5 and all(sec >= 0 for _, sec in r.timings)
    rt.availability.down("test: redis is down")
    r = rt.rank(RankQuery(user_id=1, k=5))
    assert [s for s, _ in r.timings] == ["state_read", "total"] and r.fallback_reason == "redis_unavailable"
    assert rt.availability.last_error == "test: redis is down"  # the known error, not a new one
    for reason in ("cold_start", "redis_unavailable"):
        assert metrics.registry.get_sample_value("cascade_degraded_answers_total", {"reason": reason}) == 1


@pytest.mark.integration
def test_a_request_validates_each_piece_of_its_batch_once_before_a_model_reads_it(served, monkeypatch):
    """The user part is validated when it is built (before the user tower reads it), the candidate part when
    it is added (before the ranker reads it), nothing twice; the ranker's batch passes the whole-batch check."""
    import serving.batching
    from serving.runtime import RankQuery

    rt, bundle, _ = served
    events: list[str] = []
    real_validate = serving.batching.validate_batch

    def validate(batch, spec):
        events.append("validate user part" if not spec.candidate_keys else "validate candidate part")
        return real_validate(batch, spec)

    def traced(name, fn):
        def call(batch):
            events.append(name)
            if name == "ranker":  # the pieces, each validated on its own, make a valid whole
                validate_batch(batch, BatchSpec(user_keys=bundle.user_keys,
                                                candidate_dense_dim=batch.candidate_dense.shape[1]))
            return fn(batch)
        return call

    monkeypatch.setattr(serving.batching, "validate_batch", validate)
    monkeypatch.setattr(bundle.retriever, "user_embedding", traced("user_tower", bundle.retriever.user_embedding))
    monkeypatch.setattr(bundle.ranker, "forward", traced("ranker", bundle.ranker.forward))
    r = rt.rank(RankQuery(user_id=1, k=5, exclude_seen=True))
    assert r.fallback_reason == "" and len(r.item_ids) == 5
    assert events == ["validate user part", "user_tower", "validate candidate part", "ranker"]


@pytest.mark.integration
def test_client_candidates_all_seen_and_excluded_get_an_empty_answer(served):
    """Every client candidate filtered out (the user has seen them all): an empty list, not an error — the
    candidate part of the batch is then empty and is checked as such."""
    from serving.runtime import RankQuery

    rt, _, _ = served
    seen = tuple(dict.fromkeys(int(i) for i in rt.store.read_user(1).seq.item_ids[-3:]))
    r = rt.rank(RankQuery(user_id=1, k=5, candidate_item_ids=seen, exclude_seen=True))
    assert len(r.item_ids) == 0 and r.fallback_reason == "" and r.candidates_considered == 0
    assert [s for s, _ in r.timings] == STAGES + ["total"]


@pytest.mark.integration
def test_the_batch_holds_only_the_history_the_models_read_and_scores_do_not_change(served, monkeypatch):
    """The request's batch carries the latest `_history_needed` behaviors (the user tower's max_len; the ranker's
    short_len with stored SDIM sums, its history_len without); the answer equals sending the whole history, for
    requests at now (sums used) and point-in-time ones (the ranker scans)."""
    import serving.runtime
    from serving.runtime import RankQuery, Runtime

    rt, bundle, _ = served
    lengths = {u: len(rt.store.read_user(u).seq) for u in range(1, 120)}
    users = sorted(lengths, key=lengths.get)[-4:]  # the longest ML-100K histories
    r, k = bundle.retriever, bundle.ranker
    assert min(lengths[u] for u in users) > max(r.max_len, k.history_len) > max(r.max_len, k.short_len)
    sent: list[int] = []
    real = serving.runtime.user_batch

    def spy(view, *a, **kw):
        batch = real(view, *a, **kw)
        sent.append(int(batch.history_lengths()[0]))
        return batch

    monkeypatch.setattr(serving.runtime, "user_batch", spy)
    for u in users:
        newest = int(rt.store.read_user(u).seq.ts_ms[-1])
        for as_of, want in ((0, max(r.max_len, k.short_len)), (newest, max(r.max_len, k.history_len))):
            q = RankQuery(user_id=u, k=10, exclude_seen=True, as_of_ms=as_of)
            sent.clear()
            trimmed = rt.rank(q)
            assert sent == [want], (u, as_of)
            with monkeypatch.context() as m:
                m.setattr(Runtime, "_history_needed", staticmethod(lambda ctx: 0))
                whole = rt.rank(q)
            assert sent[-1] > want  # the whole history before the request time (ties at `newest` excluded)
            assert trimmed.item_ids.tolist() == whole.item_ids.tolist(), (u, as_of)
            np.testing.assert_allclose(trimmed.scores, whole.scores, rtol=1e-6, atol=1e-6)
