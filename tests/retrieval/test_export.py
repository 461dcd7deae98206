"""Export for serving: the inference module on a batch built like the server builds it equals the training
forward at the last position; item vectors, search, new items, checksums."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_TS, ITEM_CATEGORY, ITEM_ID, USER_ID, build_batch
from features.reader import FeatureStore
from features.schema import Event, EventType
from features.sequence import SequenceConfig, fold_events
from kernels import bucketize
from retrieval.data import open_data
from retrieval.evaluate import empty_items, last_queries
from retrieval.export import ExportError, export_retriever, load_retriever, load_unsharded


@pytest.fixture(scope="module")
def exported(two_epochs, retrieval_features, tmp_path_factory):
    cfg, out, _ = two_epochs
    model = load_unsharded(out / "checkpoints" / "best", cfg)
    data = open_data(retrieval_features, cfg)
    queries = np.concatenate([last_queries(model, eb.batch).numpy() for eb in data.eval_batches("test", 0, 1)])
    dest = tmp_path_factory.mktemp("export") / "retriever"
    manifest = export_retriever(model, cfg, data.catalog, dest, queries=queries)
    return cfg, model, data, dest, manifest


def _online_batch(store: FeatureStore, user_id: int, n_behaviors: int, cfg):
    """What the server does: fold the user's events (from the stream) into its sequence state, then build a
    B = 1 batch from that state and the user's attributes."""
    tl = store.timeline(user_id)
    cats = {int(i): int(c) for i, c in zip(tl.item_ids, tl.categories)}
    events = [
        Event(event_id=f"e{j:06d}", user_id=user_id, item_id=int(tl.item_ids[j]), ts_ms=int(tl.ts_ms[j]),
              event_type=EventType(int(tl.actions[j]) // 2).name.lower(), label=float(tl.actions[j] % 2))
        for j in range(n_behaviors)
    ]
    seq = fold_events(events, cats, SequenceConfig(long_cap=10_000, short_cap=50))
    row, found = store.users.rows(np.array([user_id], np.int64))
    user = {USER_ID: ([user_id], [1])}
    for key in store.user_attr_keys:  # the user's attributes as the server keeps them (hashed ids)
        vals, present = store.user_attrs[key]
        ok = bool(found[0] and present[row[0]])
        user[key] = ([int(vals[row[0]])] if ok else [], [int(ok)])
    return build_batch(
        user=user,
        history={HIST_ITEM_ID: seq.item_ids, HIST_TS: seq.ts_ms, HIST_ACTION: seq.actions, HIST_CATEGORY: seq.categories},
        history_lengths=[len(seq)], candidates={}, num_candidates=[0], request_ts=[int(seq.ts_ms[-1]) + 1],
    )


def test_inference_on_an_online_built_batch_equals_the_training_forward(exported):
    cfg, model, data, dest, _ = exported
    r = load_retriever(dest)
    train_batch = next(iter(data.train_batches(0, 0, 1)))
    out = model(train_batch, empty_items())  # the training forward (eval mode), every position of every user
    users = train_batch.user_ids().tolist()
    store = data.store
    for b in (0, 1, len(users) - 1):
        u = users[b]
        n_hist = int(train_batch.history_lengths()[b])
        train_end = int(store.retrieval_train_len[store.timeline_users.rows(np.array([u]))[0][0]])
        online = _online_batch(store, u, train_end - 1, cfg)  # the same behaviors, the whole history
        assert int(online.history_lengths()[0]) >= n_hist
        got = r.user_embedding(online)  # (1, D)
        want = out.queries[int(out.query_offsets[b + 1]) - 1]  # query after the last training position
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


def test_exported_items_vectors_and_search(exported):
    cfg, model, data, dest, manifest = exported
    r = load_retriever(dest)
    assert r.item_ids.tolist() == data.catalog.item_ids.tolist() and r.dim == 16
    first = data.catalog.select(torch.arange(20))
    np.testing.assert_allclose(r.item_embedding(first).numpy(), r.item_vectors[:20], rtol=1e-5, atol=1e-6)
    assert manifest["ann"]["recall@500_vs_exact"] >= 0.99 and manifest["ann"]["queries"] == 943
    q = r.user_embedding(next(iter(data.eval_batches("test", 0, 1))).batch).numpy()[:8]
    ids, scores = r.search(q, 50)
    ex_ids, ex_scores = r.exact_search(q, 50)
    assert ids.shape == (8, 50) and set(ids[0]) <= set(r.item_ids.tolist())
    np.testing.assert_allclose(scores[:, 0], ex_scores[:, 0], rtol=1e-5)
    assert json.loads((dest / "config.json").read_text())["user_keys"] == ["user_id", "user_attr_gender", "user_attr_age"]


def test_a_new_item_gets_its_vector_from_attributes_alone(exported):
    _, _, data, dest, _ = exported
    r = load_retriever(dest)
    known = data.catalog.select(torch.tensor([0]))
    cats = known[ITEM_CATEGORY].values()
    year = known["item_attr_year"].values()

    def item(item_id: int):
        return build_batch(user={}, history={HIST_ITEM_ID: []}, history_lengths=[0], num_candidates=[1],
                           request_ts=[0], candidates={ITEM_ID: ([item_id], [1]), ITEM_CATEGORY: (cats, [len(cats)]),
                                                       "item_attr_year": (year, [len(year)])}).candidates

    used = set(r.model.item_ec.rows["item_id"].tolist())
    fresh = [i for i in range(10**12, 10**12 + 100)  # ids none of whose hashed rows a catalog item uses
             if not used & {int(bucketize(torch.tensor([i]), f, 65536)) for f in r.model.id_features}][:2]
    a, b = r.item_embedding(item(fresh[0])), r.item_embedding(item(fresh[1]))
    torch.testing.assert_close(a, b)  # unseen ids contribute nothing: same attributes, same vector
    assert float(a.norm()) == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(a, r.item_embedding(known))  # a known item's id embedding does contribute


def test_a_tampered_export_is_refused(exported, tmp_path):
    _, _, _, dest, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(dest, bad)
    arr = np.load(bad / "item_embeddings.npy")
    arr[0, 0] += 1.0
    np.save(bad / "item_embeddings.npy", arr)
    with pytest.raises(ExportError, match="item_embeddings.npy: sha256 does not match"):
        load_retriever(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(ExportError, match="not a retriever export"):
        load_retriever(bad)


def test_an_existing_export_is_not_overwritten(exported):
    cfg, model, data, dest, _ = exported
    with pytest.raises(FileExistsError, match="already holds an export"):
        export_retriever(model, cfg, data.catalog, dest)
