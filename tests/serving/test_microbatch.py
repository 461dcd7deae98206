"""Micro-batching (serving/microbatch.py): concurrent requests' ranker forwards run as one and every request
gets what it would have got alone, with the real exported rankers; a failing forward fails only its requests."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from features.batch import build_batch, concat_batches
from serving.microbatch import RankerBatcher


def _runtime(bundle_path, checksum, version, catalog, store, **runtime):
    from features.config import load_config
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import Availability, CatalogRef, Popularity, Runtime

    cfg = load_config(ServingConfig, None, [f"runtime.{k}={v}" for k, v in runtime.items()])
    metrics, holder, cat = ServingMetrics(), ModelHolder(), CatalogRef(catalog)
    ModelManager(holder, cat, cfg.state, cfg.models, metrics).load(bundle_path, version, checksum)
    return Runtime(cfg.limits, cfg.runtime, store, holder, cat, Popularity(*store.top_items(100)), Availability(),
                   metrics), metrics


@pytest.fixture(scope="module")
def second_stage_bundle(catalog, tmp_path_factory):
    from tests.serving.conftest import write_real_bundle

    return write_real_bundle(catalog, tmp_path_factory.mktemp("ss"), "ss1", seed=3, second_stage=True)


@pytest.mark.parametrize("which", ["ctr_sdim", "second_stage"])
def test_concurrent_requests_share_forwards_and_get_their_own_answers(which, model_bundles, second_stage_bundle,
                                                                       catalog, ml100k_dataset, memory_store):
    from serving.bootstrap import bootstrap_dataset
    from serving.config import StateConfig
    from serving.runtime import RankQuery

    path, checksum = model_bundles["v1"] if which == "ctr_sdim" else second_stage_bundle
    version = "v1" if which == "ctr_sdim" else "ss1"
    alone, _ = _runtime(path, checksum, version, catalog, memory_store, ranker_batch_max=1)
    bootstrap_dataset(memory_store, ml100k_dataset, StateConfig(), catalog, bundle=alone.models.current)
    batched, metrics = _runtime(path, checksum, version, catalog, memory_store, ranker_batch_max=8,
                                ranker_batch_wait_ms=20)
    assert alone.batcher is None and batched.batcher is not None
    users = list(range(1, 25))
    queries = [RankQuery(user_id=u, k=10, exclude_seen=True, num_candidates=50 + 7 * (u % 5)) for u in users]
    expected = {q.user_id: alone.rank(q) for q in queries}
    got, errors = {}, []
    start = threading.Barrier(8)

    def client(part):
        try:
            start.wait()
            for q in part:
                got[q.user_id] = batched.rank(q)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(queries[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batched.close()
    assert not errors
    for u in users:
        assert got[u].item_ids.tolist() == expected[u].item_ids.tolist(), f"user {u}"
        np.testing.assert_allclose(got[u].scores, expected[u].scores, rtol=1e-5, atol=1e-5)
    forwards = metrics.registry.get_sample_value("cascade_ranker_batch_size_count")
    assert metrics.registry.get_sample_value("cascade_ranker_batch_size_sum") == len(users)
    assert forwards < len(users)  # some forwards served several requests


def _batch(user: int, n: int, extra_key: bool = False, dense: int = 2):
    hist = {"hist_item_id": np.arange(3), "hist_ts": np.arange(3), "hist_action": np.zeros(3),
            "hist_category": np.zeros(3)}
    cands = {"item_id": (np.arange(n) + 100 * user, np.ones(n))}
    if extra_key:
        cands["item_tag"] = (np.arange(n), np.ones(n))
    return build_batch(user={"user_id": ([user], [1])}, history=hist, history_lengths=[3], candidates=cands,
                       num_candidates=[n], request_ts=[10], candidate_dense=np.full((n, dense), float(user)))


def test_concat_batches_stacks_users_in_order_and_names_a_mismatch():
    parts = [_batch(1, 3), _batch(2, 5), _batch(3, 1)]
    b = concat_batches(parts)
    assert b.batch_size == 3 and b.total_candidates == 9
    assert b.user_ids().tolist() == [1, 2, 3] and b.num_candidates.tolist() == [3, 5, 1]
    assert b.candidate_item_ids().tolist() == [100, 101, 102, 200, 201, 202, 203, 204, 300]
    assert b.history_lengths().tolist() == [3, 3, 3] and b.candidate_dense[:, 0].tolist() == [1] * 3 + [2] * 5 + [3]
    with pytest.raises(ValueError, match="candidates keys"):
        concat_batches([_batch(1, 2), _batch(2, 2, extra_key=True)])
    with pytest.raises(ValueError, match="candidate_dense"):
        concat_batches([_batch(1, 2), _batch(2, 2, dense=3)])


def test_a_failing_forward_fails_only_its_own_request_and_the_worker_lives():
    """The score function here stands in for a model that rejects one user's batch (the logic under test is the
    batcher's error isolation, not a model)."""
    def score(ranker, batch):
        if 13 in batch.user_ids().tolist():
            raise RuntimeError("user 13's batch is bad")
        return batch.candidate_dense[:, 0] * 10

    seen = []
    batcher = RankerBatcher(max_batch=8, max_wait_ms=30, observe=seen.append)
    results, errors = {}, {}
    start = threading.Barrier(4)

    def client(user):
        start.wait()
        try:
            results[user] = batcher.score(None, _batch(user, 2), score)
        except RuntimeError as e:
            errors[user] = str(e)

    threads = [threading.Thread(target=client, args=(u,)) for u in (11, 12, 13, 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert set(errors) == {13} and "user 13" in errors[13]
    for u in (11, 12, 14):
        assert torch.equal(results[u], torch.full((2,), 10.0 * u))
    assert batcher.score(None, _batch(5, 1), score).tolist() == [50.0]  # the worker is still running
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.score(None, _batch(5, 1), score)
