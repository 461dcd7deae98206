"""The retriever's candidate lists on real ML-100K features, and the second stage trained on them: lists
mask every seen item and are best first; an untrained residual ranker scores a list exactly as the
retriever does (same HR/NDCG); a listwise run trains, exports and the export scores a list batch."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from features.candidate_lists import CandidateLists, list_features
from features.reader import FeatureStore
from features.train.metrics import topk_metrics

pytestmark = pytest.mark.integration

TOP_N = 100


@pytest.fixture(scope="module")
def retriever(two_epochs, retrieval_features, tmp_path_factory):
    from retrieval.data import open_data
    from retrieval.export import export_retriever, load_retriever, load_unsharded

    cfg, out, _ = two_epochs
    model = load_unsharded(out / "checkpoints" / "best", cfg)
    dest = tmp_path_factory.mktemp("lists_export") / "retriever"
    export_retriever(model, cfg, open_data(retrieval_features, cfg).catalog, dest)
    return load_retriever(dest), 1.0 / cfg.loss.temperature


@pytest.fixture(scope="module")
def lists(retriever, retrieval_features) -> dict[str, CandidateLists]:
    from retrieval.lists import retrieve_lists

    r, scale = retriever
    store = FeatureStore(retrieval_features)
    ok = np.flatnonzero(store.retrieval_train_len >= 4)[:300]
    users, tl = store.timeline_users.ids[ok], store.retrieval_train_len[ok]
    train_u = np.repeat(users, 2)
    train_t = np.stack([tl - 2, tl - 1], 1).ravel()
    return {"train": retrieve_lists(r, store, train_u, train_t, TOP_N, scale),
            "valid": retrieve_lists(r, store, users, tl, TOP_N, scale),
            "test": retrieve_lists(r, store, users, tl + 1, TOP_N, scale)}


def test_lists_are_best_first_unseen_and_target_the_next_item(lists, retrieval_features):
    store = FeatureStore(retrieval_features)
    for split, cl in lists.items():
        assert cl.items.shape == (len(cl), TOP_N)
        assert np.all(np.diff(cl.logits, axis=1) <= 0), split
        seen, lens = store.items_before(cl.user_ids, cl.hist_len)
        owner = np.repeat(np.arange(len(cl)), lens)
        for r in range(0, len(cl), 37):  # every seen item masked, the whole history
            assert not set(cl.items[r].tolist()) & set(seen[owner == r].tolist()), (split, r)
            tl = store.timeline(int(cl.user_ids[r]))
            assert cl.target[r] == tl.item_ids[cl.hist_len[r]]


def test_lists_logits_are_the_retrievers_scores_times_its_scale(lists, retriever, retrieval_features):
    from retrieval.lists import _history_batch

    r, scale = retriever
    cl = lists["valid"].take(np.arange(5))
    u = r.user_embedding(_history_batch(r, FeatureStore(retrieval_features), cl.user_ids, cl.hist_len)).numpy()
    rows = {int(i): k for k, i in enumerate(r.item_ids)}
    want = np.einsum("rd,rnd->rn", u, r.item_vectors[np.vectorize(rows.get)(cl.items)]) * scale
    np.testing.assert_allclose(cl.logits, want, rtol=1e-4, atol=1e-4)


def _ranker_config(steps: int, epochs: int = 1):
    from features.config import load_config
    from ranking.config import RankerConfig

    return load_config(RankerConfig, None, [
        "model.embedding.dim=16", "model.embedding.attention_dim=8", "model.embedding.decoupled=true",
        "model.embedding.item_buckets=4096", "model.embedding.user_features=[user_id]",
        "model.sequence.short_len=20", "model.sequence.long=dare", "model.sequence.long_len=100",
        "model.sequence.top_k=8", "model.moe.num_experts=2", "model.moe.expert_hidden=[32,16]",
        "model.residual_column=0", "model.bf16_mlp=false",
        "loss.kind=listwise", "loss.contrastive_weight=0.05", "train.select_metric=ndcg@10",
        f"train.epochs={epochs}", f"train.max_steps_per_epoch={steps}", "train.threads=1", "train.log_every=5",
    ])


def test_an_untrained_residual_ranker_reproduces_the_retrievers_list_metrics(lists, retrieval_features):
    from ranking.lists import ListRankingData
    from ranking.model import RankerModel
    from ranking.task import RankerTrainTask
    from ranking.train import evaluate, resolve_model_config

    data = ListRankingData(FeatureStore(retrieval_features), lists, history_cap=100, lists_per_batch=32)
    cfg = _ranker_config(1)
    torch.manual_seed(0)
    task = RankerTrainTask(RankerModel(resolve_model_config(cfg.model, data), embedding_device="cpu"), cfg.loss)
    got = evaluate(task, data, "valid", 0, 1)
    cl = lists["valid"]
    hit = cl.hit()
    ranks = np.where(hit, (cl.items == cl.target[:, None]).argmax(1), np.inf)
    want = topk_metrics(ranks, ks=(10, 50), recall_ks=())
    assert got["hr@10"] == pytest.approx(want["hr@10"]) and got["ndcg@10"] == pytest.approx(want["ndcg@10"])
    assert 0 < want["hr@10"] < 1  # a real retriever: neither trivial nor perfect


def test_listwise_second_stage_trains_exports_and_scores_a_list(lists, retrieval_features, tmp_path):
    from features.train.launch import run_distributed
    from ranking.export import load_ranker
    from ranking.lists import ListRankingData

    data = ListRankingData(FeatureStore(retrieval_features), lists, history_cap=100, lists_per_batch=16)
    res = run_distributed(_train, 1, _ranker_config(8), data, str(tmp_path))[0]
    assert set(res.best_valid) >= {"hr@10", "ndcg@10"} and np.isfinite(res.history[0]["loss"])
    ranker = load_ranker(res.export_dir)
    b = data.batch(lists["test"].take(np.arange(2)))
    p = ranker.forward(b)
    assert p.shape == (2 * TOP_N,) and torch.isfinite(p).all()
    assert b.candidate_dense.shape[1] == list_features(np.zeros((1, 1))).shape[1]


def _train(rank, world, cfg, data, out):
    from ranking.train import train_ranker

    return train_ranker(rank, world, cfg, data, out, progress=False)


def test_sampled_training_lists_keep_the_target_and_the_whole_lists_features(lists, retrieval_features):
    from ranking.lists import ListRankingData

    data = ListRankingData(FeatureStore(retrieval_features), lists, history_cap=100, lists_per_batch=8,
                           train_width=10)
    b = next(iter(data.train_batches(0, 0, 1)))
    assert b.num_candidates.tolist() == [10] * 8
    y = b.labels[:, 0].view(8, 10)
    assert torch.equal(y.sum(1), torch.ones(8))  # exactly the target per list
    feats = b.candidate_dense.view(8, 10, -1)
    assert torch.all(feats[:, 1:, 1] > feats[:, :-1, 1])  # list order kept: log1p(rank) increasing
    assert torch.all(feats[:, :, 2] <= 0)  # gaps to the whole list's top


def test_lists_carry_the_vectors_behind_their_logits_through_a_cache(lists, retriever, retrieval_features, tmp_path):
    """`retrieval_products` sum to the logits; a cached list keeps its user vectors, and `attach_vectors` on lists
    saved without them (an older cache) recomputes the same ones."""
    from retrieval.lists import attach_vectors

    r, scale = retriever
    cl = lists["valid"].take(np.arange(40))
    products = cl.products().reshape(len(cl), TOP_N, r.dim)
    np.testing.assert_allclose(products.sum(-1), cl.logits, rtol=1e-4, atol=1e-4)
    cols = np.sort(np.random.default_rng(0).choice(TOP_N, (len(cl), 7)), 1)
    np.testing.assert_array_equal(cl.products(cols).reshape(len(cl), 7, -1),
                                  np.take_along_axis(products, cols[..., None], 1))
    loaded = CandidateLists.load(cl.save(tmp_path / "with.npz"))
    np.testing.assert_array_equal(loaded.user_vectors, cl.user_vectors)
    bare = dataclasses.replace(cl, user_vectors=None, item_vectors=None)
    again = attach_vectors(CandidateLists.load(bare.save(tmp_path / "bare.npz")), r, FeatureStore(retrieval_features),
                           scale)
    np.testing.assert_allclose(again.user_vectors, cl.user_vectors, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again.products(), cl.products(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no retriever vectors"):
        bare.products()
    with pytest.raises(ValueError, match="user_vectors must be finite"):
        cl.with_vectors(cl.user_vectors[:3], cl.item_vectors)


def test_a_second_stage_reading_the_retrievers_vectors_trains_and_exports_them(lists, retriever, retrieval_features,
                                                                              tmp_path):
    from features.train.launch import run_distributed
    from ranking.export import load_ranker
    from ranking.lists import ListRankingData

    r, _ = retriever
    store = FeatureStore(retrieval_features)
    data = ListRankingData(store, lists, history_cap=100, lists_per_batch=16, train_width=10, retriever_vectors=True,
                           retriever_similarity=3)
    assert (data.retrieval_products, data.retrieval_similarity) == (r.dim, 3)
    assert data.candidate_dense_dim == list_features(np.zeros((1, 1))).shape[1] + r.dim + 3
    b = next(iter(data.train_batches(0, 0, 1)))
    feats = b.candidate_dense.view(16, 10, -1)
    torch.testing.assert_close(feats[..., -r.dim - 3:-3].sum(-1), feats[..., 0], rtol=1e-4, atol=1e-4)
    sims = feats[..., -3:]  # cosines of unit vectors; the max over the last 3 bounds the last and the mean
    assert torch.all(sims.abs() <= 1 + 1e-4) and torch.all(sims[..., 1] >= sims[..., 0] - 1e-6)
    assert torch.all(sims[..., 1] >= sims[..., 2] - 1e-6)
    res = run_distributed(_train, 1, _ranker_config(4), data, str(tmp_path))[0]
    ranker = load_ranker(res.export_dir)
    assert (ranker.cfg.retrieval_products, ranker.cfg.retrieval_similarity) == (r.dim, 3)
    assert ranker.logits(data.batch(lists["test"].take(np.arange(2)))).shape == (2 * TOP_N,)
    bare = {k: dataclasses.replace(v, user_vectors=None, item_vectors=None) for k, v in lists.items()}
    with pytest.raises(ValueError, match="carry no retriever vectors"):
        ListRankingData(store, bare, history_cap=100, lists_per_batch=16, retriever_vectors=True)


def test_a_second_stage_reading_item_item_features_fits_one_model_per_lists_retriever_and_exports_the_served_one(
        lists, retrieval_features, tmp_path):
    from features.item_item import ItemItem
    from features.list_context import recent_items
    from features.train.launch import run_distributed
    from jobs.second_stage import list_data
    from ranking.export import load_ranker
    from ranking.lists import ListRankingData

    store = FeatureStore(retrieval_features)
    cfg = _ranker_config(4)
    cfg = dataclasses.replace(cfg, lists=dataclasses.replace(
        cfg.lists, holdout=2, train_width=10, context_window=0, item_item=True, item_item_history=30, item_item_k=16,
        item_item_lambda=20.0))
    data = list_data(store, lists, cfg, say=lambda _: None)
    served, held = data.splits["valid"].item_item, data.splits["train"].item_item
    assert data.splits["test"].item_item is served and data.item_item is served and held is not served
    offsets, items = store.timeline_offsets[:-1], store.timeline_values["item_id"]
    for model, ends in ((held, store.retrieval_train_ends(2)), (served, store.retrieval_train_ends())):
        want = ItemItem.fit(offsets, items, ends, lam=20.0, k=16)  # what each split's retriever trained on
        np.testing.assert_array_equal(model.item_ids, want.item_ids)
        np.testing.assert_allclose(model.weights, want.weights, rtol=1e-5)
    assert data.candidate_dense_dim == list_features(np.zeros((1, 1))).shape[1] + 2

    valid = data.splits["valid"].take(np.arange(4))
    rows, _ = store.timeline_users.rows(valid.user_ids)
    last30 = recent_items(store.timeline_offsets, items, rows, valid.hist_len, 30)
    got = data.batch(valid).candidate_dense.numpy()[:, -2:]
    np.testing.assert_allclose(got, served.list_features(last30, valid.items), rtol=1e-5, atol=1e-6)
    b = next(iter(data.train_batches(0, 0, 1)))
    assert torch.all(b.candidate_dense[:, -1] <= 0)  # the gap to the best of the whole list, sampled or not

    res = run_distributed(_train, 1, cfg, data, str(tmp_path))[0]
    ranker = load_ranker(res.export_dir)
    assert ranker.item_item_history == 30
    np.testing.assert_array_equal(ranker.item_item.weights, served.weights)
    again = ListRankingData.for_ranker(store, lists["test"], ranker)  # the gate's path: the export's own model
    np.testing.assert_array_equal(again.ranks(ranker, "test"), data.ranks(ranker, "test"))
    with pytest.raises(ValueError, match="carry no item-item model"):
        ListRankingData(store, lists, history_cap=100, lists_per_batch=16, item_item_history=30)
