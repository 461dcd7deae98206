"""The ranker as the second stage: a residual on the retriever's logit that starts at zero, the listwise
softmax loss over a request's retrieved list, and the list metrics that select it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from features.train.metrics import topk_metrics
from ranking.config import LossConfig
from ranking.model import RankerModel
from ranking.task import RankerTrainTask, listwise_softmax_ce
from ranking.train import list_ranks
from tests.ranking.batches import random_batch, tiny_config


def residual_model(variant_long: str = "dare", experts: int = 3, seed: int = 0) -> RankerModel:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(tiny_config(True, variant_long, experts), residual_column=1)
    return RankerModel(cfg, embedding_device="cpu")


@pytest.mark.parametrize("long,experts", [("dare", 3), ("sdim", 1), ("none", 2)])
def test_untrained_residual_ranker_reproduces_the_first_stage_logit(long, experts):
    model = residual_model(long, experts).eval()
    batch = random_batch(0, [12, 0, 30], [5, 7, 9])
    with torch.no_grad():
        logits = model(batch).logits[:, 0]
    assert torch.equal(logits, batch.candidate_dense[:, 1])  # exactly: the heads start at zero


def test_residual_correction_learns_from_the_first_step():
    model = residual_model()
    task = RankerTrainTask(model, LossConfig(kind="listwise"))
    batch = random_batch(1, [10, 20], [6, 6])
    loss, _ = task(batch)
    loss.backward()
    assert model.heads.weight.grad is not None and bool(model.heads.weight.grad.abs().sum() > 0)


def test_residual_column_must_exist_in_the_data():
    with pytest.raises(ValueError, match="residual_column 3 is not a candidate_dense column"):
        dataclasses.replace(tiny_config(False, "none", 1), residual_column=3)


def test_listwise_loss_is_the_softmax_cross_entropy_of_each_list():
    torch.manual_seed(0)
    logits = torch.randn(3 * 4)
    labels = torch.zeros(12)
    labels[[1, 6, 11]] = 1.0
    got = listwise_softmax_ce(logits, labels, torch.tensor([4, 4, 4]))
    want = F.cross_entropy(logits.view(3, 4), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(got, want)


def test_listwise_loss_skips_lists_without_a_positive_and_handles_ragged_lists():
    logits = torch.tensor([0.5, 2.0, -1.0, 0.3, 0.1, 4.0], requires_grad=True)
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # request 2 (3 candidates) has no positive
    got = listwise_softmax_ce(logits, labels, torch.tensor([3, 3]))
    torch.testing.assert_close(got, -torch.log_softmax(logits[:3], 0)[1])
    got.backward()
    assert torch.equal(logits.grad[3:], torch.zeros(3))
    none = listwise_softmax_ce(logits, torch.zeros(6), torch.tensor([3, 3]))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_listwise_loss_spreads_the_target_over_several_positives():
    logits = torch.tensor([1.0, 0.0, -1.0])
    got = listwise_softmax_ce(logits, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([3]))
    lp = torch.log_softmax(logits, 0)
    torch.testing.assert_close(got, -(0.5 * lp[0] + 0.5 * lp[1]))


def test_list_ranks_name_the_positive_position_and_count_missing_targets_as_misses():
    scores = np.array([0.1, 0.9, 0.5, 3.0, 2.0, 1.0, 0.0], np.float32)
    labels = np.array([0, 0, 1, 0, 0, 0, 0], np.float32)  # request 2 lacks its target
    r = list_ranks(scores, labels, np.array([3, 0, 4]))
    assert r[0] == 1.0 and np.isinf(r[1]) and np.isinf(r[2])
    m = topk_metrics(r, ks=(10,), recall_ks=())
    assert m["hr@10"] == pytest.approx(1 / 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(-1, 5)), min_size=1, max_size=8), st.integers(0, 2**31 - 1))
def test_list_ranks_match_a_direct_count(requests, seed):
    """Per request: (list length, position of the positive or -1); ties count against the positive."""
    rng = np.random.default_rng(seed)
    counts = np.array([n for n, _ in requests], np.int64)
    scores = rng.integers(0, 4, int(counts.sum())).astype(np.float32)  # small range: many ties
    labels = np.zeros(int(counts.sum()), np.float32)
    want, start = [], 0
    for n, p in requests:
        if 0 <= p < n:
            labels[start + p] = 1.0
            want.append(float((np.delete(scores[start:start + n], p) >= scores[start + p]).sum()))
        else:
            want.append(np.inf)
        start += n
    np.testing.assert_array_equal(list_ranks(scores, labels, counts), np.array(want))


def test_listwise_training_lifts_a_noisy_first_stage():
    """The first-stage logit is the truth plus noise; the item id carries the truth. A few listwise steps of
    the residual ranker beat the first stage's own order on fresh lists."""
    torch.manual_seed(0)
    model = residual_model("none", 1)
    task = RankerTrainTask(model, LossConfig(kind="listwise"))
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    good = set(range(1, 200, 4))  # items whose id makes them the target

    def lists(seed: int):
        rng = np.random.default_rng(seed)
        b = random_batch(seed, [8] * 16, [20] * 16)
        items = b.candidate_item_ids().numpy()
        y = np.zeros(len(items), np.float32)
        for u in range(16):
            sl = slice(20 * u, 20 * u + 20)
            cand = np.flatnonzero(np.isin(items[sl], list(good)))
            if cand.size:
                y[20 * u + rng.choice(cand)] = 1.0
        b.labels = torch.from_numpy(y[:, None])
        b.candidate_dense[:, 1] = torch.from_numpy(y * 1.0 + rng.normal(0, 1.5, len(y)).astype(np.float32))
        return b

    def hr(batch) -> float:
        with torch.no_grad():
            s = model(batch).logits[:, 0].numpy()
        return float((list_ranks(s, batch.labels[:, 0].numpy(), batch.num_candidates.numpy()) < 3).mean())

    held_out = [lists(1000 + i) for i in range(4)]
    before = np.mean([hr(b) for b in held_out])
    model.train()
    for step in range(150):
        loss, _ = task(lists(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = np.mean([hr(b) for b in held_out])
    assert after > before + 0.1, (before, after)


def test_export_carries_the_context_counts_and_refuses_a_tampered_copy(tmp_path):
    import json

    from features.list_context import ContextCounts
    from ranking.export import CONTEXT, RankerExportError, export_ranker, load_ranker

    offsets = np.array([0, 4, 7], np.int64)
    items = np.array([1, 2, 3, 2, 2, 3, 1], np.int64)
    ts = np.arange(7, dtype=np.int64) * 1000
    context = ContextCounts.from_timelines(offsets, items, ts, items % 2, np.array([4, 3]), window=2)
    out = export_ranker(residual_model(), tmp_path / "ranker", context=context)
    assert json.loads((out / "config.json").read_text())["context"]["window"] == 2
    back = load_ranker(out).context
    np.testing.assert_array_equal(back.pair_keys, context.pair_keys)
    assert load_ranker(export_ranker(residual_model(), tmp_path / "plain")).context is None

    np.savez(out / CONTEXT, items=np.zeros(1, np.int64))  # replaced after export: the checksum no longer holds
    with pytest.raises(RankerExportError, match="sha256"):
        load_ranker(out)


def test_export_carries_the_item_item_model_and_refuses_a_bad_or_unlisted_one(tmp_path):
    import hashlib
    import json

    from features.item_item import ItemItem
    from ranking.export import ITEM_ITEM, RankerExportError, export_ranker, load_ranker

    model = ItemItem.fit(np.array([0, 3]), np.array([1, 2, 3, 2, 4]), np.array([3, 2]), lam=1.0, k=2)
    out = export_ranker(residual_model(), tmp_path / "ranker", item_item=model, item_item_history=7)
    meta = json.loads((out / "config.json").read_text())["item_item"]
    assert (meta["history"], meta["k"], meta["features"]) == (7, 2, ["item_item_score", "item_item_gap"])
    back = load_ranker(out)
    assert back.item_item_history == 7
    np.testing.assert_array_equal(back.item_item.weights, model.weights)
    plain = load_ranker(export_ranker(residual_model(), tmp_path / "plain"))
    assert plain.item_item is None and plain.item_item_history == 0
    with pytest.raises(ValueError, match="reads 1..10000 behaviors"):
        export_ranker(residual_model(), tmp_path / "x", item_item=model, item_item_history=0)

    def resign(edit_config=None) -> None:
        cfg = json.loads((out / "config.json").read_text())
        if edit_config:
            edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
        m = json.loads((out / "manifest.json").read_text())
        m["files"] = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in m["files"]}
        (out / "manifest.json").write_text(json.dumps(m))

    good = (out / ITEM_ITEM).read_bytes()
    (out / ITEM_ITEM).write_bytes(good[: len(good) // 2])  # truncated, checksums re-signed: the model check refuses
    resign()
    with pytest.raises(RankerExportError, match="item_item.npz: not an item-item model"):
        load_ranker(out)
    (out / ITEM_ITEM).write_bytes(good)
    resign(lambda c: c["item_item"].update(history=10**9))  # a window every request would allocate for
    with pytest.raises(RankerExportError, match=r"item_item.history must be an integer in \[1, 10000\]"):
        load_ranker(out)
    resign(lambda c: c["item_item"].update(history=7, features=["something_else"]))
    with pytest.raises(RankerExportError, match="item-item features"):
        load_ranker(out)
    resign(lambda c: c["item_item"].update(features=["item_item_score", "item_item_gap"]))
    m = json.loads((out / "manifest.json").read_text())
    del m["files"][ITEM_ITEM]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RankerExportError, match="does not list item_item.npz"):
        load_ranker(out)


@pytest.mark.parametrize("with_ii,without,kept", [(0.31, 0.30, "item-item"), (0.30, 0.30, "no-item-item"),
                                                   (0.29, 0.30, "no-item-item")])
def test_item_item_select_keeps_the_ranker_better_on_the_valid_lists_and_a_tie_the_one_without(
        monkeypatch, tmp_path, with_ii, without, kept):
    # the logic around training: which configs are trained where, and which result is kept (the training itself,
    # faked here, runs for real in tests/jobs/test_pipeline_second_stage.py)
    from features.config import load_config
    from features.train.loop import TrainResult
    from jobs import second_stage
    from ranking.config import RankerConfig

    cfg = load_config(RankerConfig, "ranking/configs/two-stage.yaml")
    assert cfg.lists.item_item and cfg.lists.item_item_select  # the shipped default selects
    variants = second_stage.ranker_variants(cfg)
    assert list(variants) == ["no-item-item", "item-item"] and variants["item-item"] is cfg
    assert not variants["no-item-item"].lists.item_item and variants["no-item-item"].model == cfg.model
    single = dataclasses.replace(cfg, lists=dataclasses.replace(cfg.lists, item_item_select=False))
    assert second_stage.ranker_variants(single) == {"": single}

    valid = {True: with_ii, False: without}
    trained = []

    def fake_fit(vcfg, data, out):
        trained.append((vcfg.lists.item_item, out))
        return TrainResult(best_epoch=1, best_valid={"ndcg@10": valid[vcfg.lists.item_item]},
                           test={"ndcg@10": 0.0}, epochs_run=1, stopped="epochs", train_seconds=0.0,
                           wall_seconds=0.0, plan={}, export_dir=str(out / "export"))

    class Data:
        def __init__(self, vcfg):
            self.item_item = vcfg.lists.item_item
            self.splits = {"train": []}

    monkeypatch.setattr(second_stage, "fit", fake_fit)
    monkeypatch.setattr(second_stage, "list_data", lambda store, lists, vcfg, say: Data(vcfg))
    log: list[str] = []
    got = second_stage.fit_selected(cfg, None, {"train": []}, tmp_path, log.append)
    assert trained == [(False, tmp_path / "no-item-item"), (True, tmp_path / "item-item")]
    assert got.kept == kept and got.data.item_item == (kept == "item-item")
    assert got.result.export_dir == str(tmp_path / kept / "export") == got.variants[kept]["export"]
    assert {n: v["valid"]["ndcg@10"] for n, v in got.variants.items()} == {"item-item": with_ii,
                                                                          "no-item-item": without}
    assert any(f"kept the ranker {kept!r}" in line for line in log)
    trained.clear()
    one = second_stage.fit_selected(single, None, {"train": []}, tmp_path, log.append)
    assert trained == [(True, tmp_path)] and one.kept == "" and list(one.variants) == [""]
