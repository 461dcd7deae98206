"""Metamorphic and gradient tests of the ranker on tiny unsharded models (fast, seeded)."""
from __future__ import annotations

import pytest
import torch

from features.batch import HIST_SDIM_SIG, build_batch
from features.config import ConfigError, load_config
from ranking.config import LossConfig, ModelConfig, RankerConfig, SequenceArchConfig
from ranking.model import RankerModel
from ranking.task import RankerTrainTask, contrastive_gate_loss
from tests.ranking.batches import tiny_config

VARIANTS = {
    "din": dict(decoupled=False, long="none", experts=1),
    "dare+awmoe": dict(decoupled=True, long="dare", experts=4),
    "sdim+awmoe": dict(decoupled=False, long="sdim", experts=3),
    "full-attention": dict(decoupled=False, long="full", experts=1),
}


def build(variant: str, seed: int = 0, **kw) -> RankerModel:
    torch.manual_seed(seed)
    v = VARIANTS[variant]
    return RankerModel(tiny_config(v["decoupled"], v["long"], v["experts"], **kw), embedding_device="cpu").eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_candidate_score_does_not_depend_on_other_candidates(variant, make_batch, select_batch):
    model = build(variant)
    batch = make_batch(1, [30], [8])
    with torch.no_grad():
        full = model(batch).logits[:, 0]
        for perm in ([7, 2, 5], [3], [6, 0, 1, 4, 7, 2]):
            sub = model(select_batch(batch, [0], [perm])).logits[:, 0]
            torch.testing.assert_close(sub, full[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scores_do_not_depend_on_padding_by_other_users(variant, make_batch, select_batch):
    """Batched users are padded to the longest one inside the kernels; a user's scores must not change."""
    model = build(variant)
    batch = make_batch(2, [4, 0, 35, 11], [2, 3, 1, 2])
    with torch.no_grad():
        together = model(batch).logits[:, 0]
        alone = torch.cat([model(select_batch(batch, [u], [list(range(int(batch.num_candidates[u])))])).logits[:, 0]
                           for u in range(4)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_history_beyond_what_the_model_reads_is_ignored(variant, make_batch):
    """Truncation: a 90-behavior history scores like its last `history_len` (40) behaviors."""
    model = build(variant)
    batch = make_batch(3, [90], [4])
    n = model.cfg.sequence.history_len
    keep = slice(90 - n, 90)
    cut = build_batch(
        user={k: (batch.user[k].values(), batch.user[k].lengths()) for k in batch.user.keys()},
        history={k: batch.history_values(k)[keep] for k in batch.history.keys()},
        history_lengths=[n],
        candidates={k: (batch.candidates[k].values(), batch.candidates[k].lengths()) for k in batch.candidates.keys()},
        num_candidates=batch.num_candidates, request_ts=batch.request_ts, user_dense=batch.user_dense,
        candidate_dense=batch.candidate_dense, labels=batch.labels,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(cut).logits, model(batch).logits, rtol=1e-5, atol=1e-6)


def _table(model: RankerModel, table: str) -> torch.nn.Parameter:
    ec = model.embedding.att_tables if table.endswith("_att") else model.embedding.rep_tables
    return ec.embeddings[table].weight


def _no_grad(grads) -> bool:
    return all(g is None or not bool(g.any()) for g in grads)


def test_dare_tables_are_decoupled(make_batch):
    """Attention tables feed only keys/queries, representation tables only values/candidates."""
    model = build("dare+awmoe").train()
    batch = make_batch(4, [12, 25, 0], [2, 2, 1])
    emb = model.embedding(batch)
    att = [_table(model, "item_att"), _table(model, "category_att"), model.embedding.action_att.weight]
    rep = [_table(model, "item_rep"), _table(model, "category_rep"), model.embedding.action_rep.weight]
    for t, uses in ((emb.keys, att), (emb.queries, att[:2])):  # candidates have no action
        # the attention path never touches the representation tables
        assert _no_grad(torch.autograd.grad(t.sum(), rep, allow_unused=True, retain_graph=True))
        assert all(g is not None and bool(g.any())
                   for g in torch.autograd.grad(t.sum(), uses, allow_unused=True, retain_graph=True))
    for t in (emb.values, emb.candidates):  # and the representation path never touches the attention tables
        assert _no_grad(torch.autograd.grad(t.sum(), att, allow_unused=True, retain_graph=True))


def test_dare_loss_trains_both_tables_separately(make_batch):
    """The loss reaches both tables; the attention table's gradient is exactly what flows through the scores."""
    model = build("dare+awmoe").train()
    batch = make_batch(5, [12, 25, 30], [2, 2, 1])
    task = RankerTrainTask(model, LossConfig())
    captured = {}
    emb_forward = model.embedding.forward

    def spy(b):
        out = emb_forward(b)
        captured["emb"] = out
        return out

    model.embedding.forward = spy
    loss, _ = task(batch)
    emb = captured["emb"]
    att_item = _table(model, "item_att")
    rep_item = _table(model, "item_rep")
    g_att, g_rep = torch.autograd.grad(loss, [att_item, rep_item], retain_graph=True)
    assert g_att.abs().sum() > 0 and g_rep.abs().sum() > 0
    # the attention table's gradient equals the one routed through keys and queries alone
    gk, gq = torch.autograd.grad(loss, [emb.keys, emb.queries], retain_graph=True)
    routed, = torch.autograd.grad([emb.keys, emb.queries], [att_item], grad_outputs=[gk, gq], retain_graph=True)
    torch.testing.assert_close(routed, g_att)
    # and the representation table's gradient the one routed through values and candidates alone
    gv, gc = torch.autograd.grad(loss, [emb.values, emb.candidates], retain_graph=True)
    routed, = torch.autograd.grad([emb.values, emb.candidates], [rep_item], grad_outputs=[gv, gc])
    torch.testing.assert_close(routed, g_rep)


def test_contrastive_loss_is_zero_and_finite_without_behaviors(make_batch):
    model = build("dare+awmoe").train()
    task = RankerTrainTask(model, LossConfig(contrastive_weight=0.5))
    batch = make_batch(6, [0, 0, 0], [2, 1, 3])
    loss, out = task(batch)
    assert out.contrastive.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_contrastive_loss_ignores_users_without_behaviors(make_batch, select_batch):
    model = build("dare+awmoe").train()
    task = RankerTrainTask(model, LossConfig(contrastive_weight=0.5))
    base = make_batch(7, [9, 14, 6, 0, 0], [2, 1, 1, 2, 1])
    torch.manual_seed(11)
    _, a = task(base)
    torch.manual_seed(11)  # the same masks: empty users draw no mask entries
    _, b = task(select_batch(base, [0, 1, 2], [[0, 1], [0], [0]]))
    assert torch.isfinite(a.contrastive) and a.contrastive > 0
    torch.testing.assert_close(a.contrastive, b.contrastive)


def test_contrastive_gate_loss_prefers_agreeing_views():
    g = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(16, dtype=torch.bool)
    same = contrastive_gate_loss(g, g, valid, 0.2)
    shuffled = contrastive_gate_loss(g, g[torch.randperm(16, generator=torch.Generator().manual_seed(1))], valid, 0.2)
    assert same < shuffled
    one = contrastive_gate_loss(g, g, torch.tensor([True] + [False] * 15), 0.2)
    assert one.item() == 0.0


def test_sdim_precomputed_signatures_give_the_online_scores(make_batch):
    from ranking.inference import make_inference

    model = build("sdim+awmoe")
    ranker = make_inference(model)
    batch = make_batch(8, [3, 40], [3, 2])
    sigs = ranker.behavior_signatures(batch.history_values("hist_item_id"))
    with_sigs = build_batch(
        user={k: (batch.user[k].values(), batch.user[k].lengths()) for k in batch.user.keys()},
        history={**{k: batch.history_values(k) for k in batch.history.keys()}, HIST_SDIM_SIG: sigs},
        history_lengths=batch.history_lengths(),
        candidates={k: (batch.candidates[k].values(), batch.candidates[k].lengths()) for k in batch.candidates.keys()},
        num_candidates=batch.num_candidates, request_ts=batch.request_ts, user_dense=batch.user_dense,
        candidate_dense=batch.candidate_dense,
    )
    torch.testing.assert_close(ranker.forward(with_sigs), ranker.forward(batch))
    assert sigs.dtype == torch.int64 and int(sigs.min()) >= 0


def test_two_tasks_share_the_bottom(make_batch):
    torch.manual_seed(0)
    cfg = tiny_config(True, "dare", 4, tasks=("click", "like"))
    model = RankerModel(cfg, embedding_device="cpu")
    task = RankerTrainTask(model, LossConfig(task_weights=(1.0, 0.5), contrastive_weight=0.1))
    loss, out = task(make_batch(9, [5, 8], [2, 2], num_tasks=2))
    assert out.logits.shape == (4, 2)
    loss.backward()
    with pytest.raises(ValueError, match="1 label column"):
        task(make_batch(9, [5, 8], [2, 2], num_tasks=1))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="contrastive_weight > 0 needs the AW-MoE gate"):
        RankerConfig(loss=LossConfig(contrastive_weight=0.1))
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  sequence:\n    long: lsh\n")
    with pytest.raises(ConfigError, match="model.sequence.long"):
        load_config(RankerConfig, p)
    p.write_text("model:\n  moe:\n    experts: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['experts'\]"):
        load_config(RankerConfig, p)
    with pytest.raises(ValueError, match="resolve them from the data"):
        RankerModel(ModelConfig(), embedding_device="cpu")


def test_length_groups_give_the_one_call_result():
    """Full attention runs one kernel call per group of similar history lengths; same result as one call."""
    from kernels import jagged_target_attention
    from features.jagged import offsets_of
    from ranking.arches.embedding import EmbeddedBatch
    from ranking.arches.sequence import LongTermArch, length_buckets

    g = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.zeros(5, dtype=torch.int64), torch.randint(1, 300, (200,), generator=g)])
    groups = length_buckets(lengths)
    assert len(groups) > 2 and sorted(torch.cat(groups).tolist()) == list(range(205))
    off = offsets_of(lengths)
    cand_user = torch.randint(0, 205, (260,), generator=g)
    k = torch.randn(int(off[-1]), 8, generator=g, requires_grad=True)
    q = torch.randn(260, 8, generator=g, requires_grad=True)
    emb = EmbeddedBatch(off, cand_user, int(lengths.max()), k, k, q, q, None, None, None, None)
    out = LongTermArch(SequenceArchConfig(long="full", long_len=1000))(emb)
    ref = jagged_target_attention(q, k, k, off, cand_user, int(lengths.max()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    gq, gk = torch.autograd.grad(out.square().sum(), [q, k])
    rq, rk = torch.autograd.grad(ref.square().sum(), [q, k])
    torch.testing.assert_close(gq, rq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gk, rk, rtol=1e-4, atol=1e-5)


def test_bf16_experts_only_where_the_cpu_computes_bf16_natively(monkeypatch):
    """`model.bf16_mlp` autocasts the experts only on CPUs with native bf16 (features.hardware.native_bf16):
    emulated bf16 is tens of times slower than fp32 (AVX2-only CPUs), so there the experts stay fp32."""
    from ranking.arches import moe
    from ranking.config import MoEArchConfig

    torch.manual_seed(0)
    arch = moe.AWMoEArch(MoEArchConfig(num_experts=2, expert_hidden=(16, 8)), in_dim=12, value_dim=4, base_dim=3,
                         num_tasks=1, bf16=True)
    x = torch.randn(5, 12)
    with torch.no_grad():
        w0, b0 = arch.experts.weights[0], arch.experts.biases[0]
        w1, b1 = arch.experts.weights[1], arch.experts.biases[1]
        h = torch.relu(torch.einsum("nf,efh->enh", x, w0) + b0)
        fp32 = torch.relu(torch.baddbmm(b1, h, w1))
        monkeypatch.setattr(moe, "native_bf16", lambda: False)
        off = _experts_under_arch_autocast(arch, x)
        torch.testing.assert_close(off, fp32, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(moe, "native_bf16", lambda: True)
        on = _experts_under_arch_autocast(arch, x)
    assert not torch.equal(on, fp32)  # bf16 rounding: the autocast ran
    torch.testing.assert_close(on, fp32, rtol=0.05, atol=0.05)


def _experts_under_arch_autocast(arch, x):
    """The experts' output through `AWMoEArch.forward`'s autocast decision (captured by a forward hook)."""
    out = {}
    handle = arch.experts.register_forward_hook(lambda m, i, o: out.setdefault("h", o.float()))
    try:
        arch(x, torch.zeros(x.shape[0], arch.gate_dim))
    finally:
        handle.remove()
    return out["h"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_direct_table_calls_equal_the_torchrec_path(variant, make_batch, monkeypatch):
    """An unsharded model calls its tables directly (`embedding._plain`); the scores and every gradient equal
    the KeyedJaggedTensor path a sharded model takes."""
    import ranking.arches.embedding as E

    batch = make_batch(3, [0, 5, 40], [4, 6, 3])

    def run(plain: bool):
        monkeypatch.setattr(E, "_plain", (lambda ec: type(ec) is E.EmbeddingCollection) if plain else (lambda ec: False))
        model = build(variant).train(False)
        out = model(batch).logits
        out.sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (direct, g_direct), (kjt, g_kjt) = run(True), run(False)
    assert torch.equal(direct, kjt)
    assert g_direct.keys() == g_kjt.keys() and g_direct
    for name in g_direct:
        assert torch.equal(g_direct[name], g_kjt[name]), name


def _experts_on_whole_input(model: RankerModel, f) -> torch.Tensor:
    """The reference: the experts on x with every column in place (the user columns gathered per candidate),
    the first layer as one einsum per expert, mixed by an einsum: what `Experts`' split must equal."""
    ex = model.moe.experts
    n = f.x.shape[0]
    x = torch.empty(n, len(ex.user_cols) + len(ex.cand_cols))
    x[:, list(ex.cand_cols)] = f.x
    x[:, list(ex.user_cols)] = f.x_user[f.rows]
    h = torch.relu(torch.einsum("nf,efh->enh", x, ex.weights[0]) + ex.biases[0])
    for w, b in zip(list(ex.weights)[1:], list(ex.biases)[1:]):
        h = torch.relu(torch.baddbmm(b, h, w))
    gate = model.gate_logits(f)
    if not model.moe.gated:
        return h[0].unsqueeze(1)
    g = torch.softmax(gate.view(n, model.moe.num_tasks, -1), dim=-1)
    return torch.einsum("nte,enh->nth", g, h)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_per_user_columns_computed_once_equal_the_whole_input(variant, make_batch):
    """The experts' first layer over the user columns once per user, added to each candidate's row, equals the
    layer over the whole concatenated input; the cached weights (no grad) follow a parameter change; the
    gradients reach every first-layer weight row."""
    model = build(variant)
    batch = make_batch(3, [0, 5, 40], [4, 6, 3])
    ex = model.moe.experts
    assert len(ex.user_cols) == model.embedding.user_pooled_dim + model.cfg.user_dense_dim + 1
    with torch.no_grad():
        f = model.encode(batch)
        assert f.x.shape[1] == len(ex.cand_cols) and f.x_user.shape == (3, len(ex.user_cols))
        torch.testing.assert_close(model.moe(f.x, model.gate_logits(f), f.x_user, f.rows),
                                   _experts_on_whole_input(model, f), rtol=1e-5, atol=1e-5)
        before = model(batch).logits
        assert torch.equal(model(batch).logits, before)  # the cached weights
        ex.weights[0][:, ex.user_cols[0]] += 1.0  # a user column's weights change: the cache must not hide it
        torch.testing.assert_close(model.moe(f.x, model.gate_logits(f), f.x_user, f.rows),
                                   _experts_on_whole_input(model, f), rtol=1e-5, atol=1e-5)
    model.train()
    model(batch).logits.sum().backward()
    grad = ex.weights[0].grad
    assert grad is not None and bool((grad[:, list(ex.user_cols)].abs().sum(-1) > 0).any())
    with pytest.raises(ValueError, match="user columns need user_x"):
        ex(f.x)
