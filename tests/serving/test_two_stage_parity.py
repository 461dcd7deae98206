"""The server answers what the benchmark evaluates: `Rank` over gRPC with a second-stage bundle returns the
same top-k, in the same order and with the same scores, as the offline two-stage evaluation
(`retrieval.lists.retrieve_lists` + `ranking.lists.ListRankingData` + the exported ranker) for the same
user, history and model version."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration

N, K = 60, 10


@pytest.fixture(scope="module")
def second_stage_bundle(catalog, tmp_path_factory, retrieval_features):
    """A second-stage bundle whose ranker reads every list feature: the retriever's logits, the context features
    (counts over the features' events), the retriever's per-dimension logit terms and its similarities, and the
    item-item features (a model fitted on the features' retrieval-training prefixes, over the last 30 behaviors:
    fewer than most of the tested users have, so the server must cut the same window)."""
    from features.item_item import ItemItem
    from features.reader import FeatureStore
    from ranking.lists import ListRankingData
    from tests.serving.conftest import write_real_bundle

    store = FeatureStore(retrieval_features)
    context = ListRankingData.context_counts(store)
    item_item = ItemItem.fit(store.timeline_offsets[:-1], store.timeline_values["item_id"],
                             store.retrieval_train_ends(), lam=50.0, k=32)
    return write_real_bundle(catalog, tmp_path_factory.mktemp("two_stage"), "ts-v1", seed=5, second_stage=True,
                             context=context, retriever_vectors=True, retriever_similarity=5, item_item=item_item,
                             item_item_history=30)


def served_at(features) -> int:
    """A request time after every event of the features (ms): the server's view then holds whole timelines."""
    from features.reader import FeatureStore

    return int(FeatureStore(features).timeline_values["ts_ms"].max()) + 86_400_000


def offline_top_k(bundle_dir, features, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The offline evaluation's answer: each user's list after its whole timeline, reranked; (U, K) ids, logits."""
    from features.reader import FeatureStore
    from ranking.export import load_ranker
    from ranking.lists import ListRankingData
    from retrieval.export import load_retriever
    from retrieval.lists import retrieve_lists

    store = FeatureStore(features)
    retriever, ranker = load_retriever(bundle_dir / "retriever"), load_ranker(bundle_dir / "ranker")
    rows, _ = store.timeline_users.rows(user_ids)
    full = store.timeline_offsets[rows + 1] - store.timeline_offsets[rows]
    lists = retrieve_lists(retriever, store, user_ids, full, N)
    data = ListRankingData.for_ranker(store, lists, ranker, 8)
    # the served features include the context ones, the retriever's vectors and the item-item ones
    assert ranker.context is not None and ranker.cfg.retrieval_products == retriever.dim == data.retrieval_products
    assert ranker.cfg.retrieval_similarity == data.retrieval_similarity == 5
    assert ranker.item_item is not None and data.item_item_history == 30
    lists = data.splits["valid"]
    logits = ranker.logits(data.batch(lists, as_served_at=served_at(features))).numpy().reshape(len(user_ids), N)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(lists.items, order, 1), np.take_along_axis(logits, order, 1)


def test_rank_over_grpc_equals_the_offline_two_stage_evaluation(make_server, second_stage_bundle, retrieval_features):
    from features.reader import FeatureStore

    store = FeatureStore(retrieval_features)
    lengths = np.diff(store.timeline_offsets)
    users = store.timeline_users.ids[np.flatnonzero((lengths >= 20) & (lengths <= 4 * N))[:4]]
    want_ids, want_logits = offline_top_k(second_stage_bundle[0], retrieval_features, users)
    assert len({tuple(r) for r in want_ids.tolist()}) > 1  # the users get different answers

    h = make_server(bundle=None, consume=False, **{"models.initial_bundle": str(second_stage_bundle[0])})
    for u, ids, logits in zip(users, want_ids, want_logits):
        r = h.rank(int(u), k=K, num_candidates=N, exclude_seen=True, as_of_ms=served_at(retrieval_features))
        assert r.model_version == "ts-v1" and r.fallback_reason == ""
        assert [it.item_id for it in r.items] == ids.tolist(), f"user {u}"
        np.testing.assert_allclose([it.score for it in r.items], logits, rtol=1e-4, atol=1e-3)


def test_the_second_stage_reorders_the_retrievers_list(second_stage_bundle, retrieval_features):
    """Guards the test above against a vacuous pass: the ranker's top-k is not the retriever's."""
    from features.reader import FeatureStore
    from retrieval.export import load_retriever
    from retrieval.lists import retrieve_lists

    store = FeatureStore(retrieval_features)
    lengths = np.diff(store.timeline_offsets)
    users = store.timeline_users.ids[np.flatnonzero((lengths >= 20) & (lengths <= 4 * N))[:4]]
    ids, _ = offline_top_k(second_stage_bundle[0], retrieval_features, users)
    r = load_retriever(second_stage_bundle[0] / "retriever")
    rows, _ = store.timeline_users.rows(users)
    lists = retrieve_lists(r, store, users, lengths[rows], N)
    assert (ids != lists.items[:, :K]).any()
