"""Stand-in models in the bundle format, until `retrieval.export` and `ranking.export` land.

They are small but real: trained in seconds on a canonical dataset (ML-100K in
the tests, ML-1M in the benchmark), exported with ``torch.save(state_dict)`` +
JSON + ``.npy`` + a faiss index, loaded with ``torch.load(weights_only=True)``,
and they implement the interfaces serving uses (`serving.models.RetrieverInference`,
`RankerInference`), so the server, the tests and the benchmark exercise the
whole path. They are not the project's models and make no quality claims.

* retriever: item tower ``normalize(E_id[item] + mean E_cat[categories])``; user
  tower ``normalize(W · sum_j decay^(H-1-j) (E_id + E_cat)[behavior j])`` over the
  last H behaviors; full-softmax next-item training; exact faiss ``IndexFlatIP``.
* ranker: short-term target attention over the last 50 behaviors, SDIM over the
  whole (up to 10k) history with SimHash signatures of the item embedding
  (`kernels.simhash`, so they can be computed when the event arrives and stored;
  `behavior_signatures`), and an MLP over candidate, interests and the dense
  features of `features.transforms.DenseLayout`; bf16 MLP at inference.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_SDIM_SIG, ITEM_CATEGORY, ITEM_ID, Batch, build_batch, jagged_tail
from features.datasets.common import read_table
from features.hashing import bucketize
from features.layout import CATEGORY_FEATURE
from features.sequence import NUM_ACTIONS, SequenceConfig, action_code
from features.transforms import DenseLayout, StatsConfig, cnt_column, pos_column
from kernels.collision_gather import collision_gather
from kernels.simhash import make_hyperplanes, pack_codes, simhash, unpack_codes

LOADER = "serving.standin"
ITEM_FEATURE = "item_id"


@dataclass(frozen=True)
class StandinConfig:
    dim: int = 32  # retriever
    item_buckets: int = 1 << 15
    category_buckets: int = 1 << 10
    user_history: int = 50
    recency_decay: float = 0.95
    rank_dim: int = 16
    short_len: int = 50
    sdim_hashes: int = 4
    sdim_bits: int = 3
    hidden: tuple[int, ...] = (64, 32)
    item_numeric_keys: tuple[str, ...] = ("year",)
    retriever_epochs: int = 2
    ranker_epochs: int = 1
    batch_size: int = 1024
    lr: float = 0.01
    max_train_history: int = 64  # SDIM sees up to this many behaviors in training (any number when serving)
    max_retriever_samples: int = 200_000
    max_ranker_samples: int = 30_000
    bf16: bool = True
    seed: int = 0


def _rows(ids: torch.Tensor | np.ndarray, feature: str, n: int) -> torch.Tensor:
    a = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, np.int64)
    return torch.from_numpy(bucketize(a, feature, n))


def _padded_tail(values: torch.Tensor, lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last n of each row, right-aligned: (B, n) values (0 pad) and (B, n) bool mask."""
    v, ln = jagged_tail(values, lengths, n)
    b = lengths.numel()
    out = torch.zeros(b, n, dtype=values.dtype)
    mask = torch.zeros(b, n, dtype=torch.bool)
    if v.numel():
        row = torch.repeat_interleave(torch.arange(b), ln)
        off = torch.zeros(b + 1, dtype=torch.int64)
        off[1:] = torch.cumsum(ln, 0)
        col = n - ln[row] + (torch.arange(v.numel()) - off[:-1][row])
        out[row, col] = v
        mask[row, col] = True
    return out, mask


# ----------------------------------------------------------------------------- retriever
class _RetrieverNet(nn.Module):
    def __init__(self, cfg: StandinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(cfg.item_buckets, cfg.dim)
        self.cat = nn.Embedding(cfg.category_buckets, cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        nn.init.normal_(self.item.weight, std=0.05)
        nn.init.normal_(self.cat.weight, std=0.05)

    def item_vecs(self, item_rows: torch.Tensor, cat_rows: torch.Tensor, cat_lengths: torch.Tensor) -> torch.Tensor:
        off = torch.zeros(cat_lengths.numel(), dtype=torch.int64)
        off[1:] = torch.cumsum(cat_lengths, 0)[:-1]
        cats = F.embedding_bag(cat_rows, self.cat.weight, off, mode="mean") if cat_rows.numel() else 0.0
        return F.normalize(self.item(item_rows) + cats, dim=-1)  # (N, D)

    def user_vecs(self, hist_item_rows: torch.Tensor, hist_cat_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = hist_item_rows.shape[1]
        w = self.cfg.recency_decay ** torch.arange(h - 1, -1, -1, dtype=torch.float32)  # (H,)
        w = w * mask  # (B, H)
        e = self.item(hist_item_rows) + self.cat(hist_cat_rows)  # (B, H, D)
        return F.normalize(self.proj((w[..., None] * e).sum(1)), dim=-1)  # (B, D)


class StandinRetriever:
    """RetrieverInference over a trained `_RetrieverNet` and an exact faiss index of its item vectors."""

    def __init__(self, net: _RetrieverNet, item_ids: np.ndarray, index: Any) -> None:
        self.net = net.eval()
        self.item_ids = item_ids
        self.index = index
        self.dim = net.cfg.dim

    @torch.inference_mode()
    def user_embedding(self, batch: Batch) -> torch.Tensor:
        c = self.net.cfg
        lengths = batch.history_lengths()
        items, mask = _padded_tail(batch.history_values(HIST_ITEM_ID), lengths, c.user_history)
        cats, _ = _padded_tail(batch.history_values(HIST_CATEGORY), lengths, c.user_history)
        rows = _rows(items.reshape(-1), ITEM_FEATURE, c.item_buckets).view_as(items)
        crow = _rows(cats.reshape(-1), CATEGORY_FEATURE, c.category_buckets).view_as(cats)
        return self.net.user_vecs(rows, crow, mask)

    @torch.inference_mode()
    def item_embedding(self, candidates: Any) -> torch.Tensor:
        c = self.net.cfg
        ids = candidates[ITEM_ID].values()
        cat = candidates[ITEM_CATEGORY]
        return self.net.item_vecs(_rows(ids, ITEM_FEATURE, c.item_buckets),
                                  _rows(cat.values(), CATEGORY_FEATURE, c.category_buckets), cat.lengths().to(torch.int64))

    def search(self, user_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(user_vecs, np.float32)
        kk = min(k, self.index.ntotal)
        scores, rows = self.index.search(q, kk)
        ids = np.where(rows >= 0, self.item_ids[np.maximum(rows, 0)], -1)
        return ids, scores


# ----------------------------------------------------------------------------- ranker
class _RankerNet(nn.Module):
    def __init__(self, cfg: StandinConfig, user_dense: int, cand_dense: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.rank_dim
        self.item = nn.Embedding(cfg.item_buckets, d)
        self.cat = nn.Embedding(cfg.category_buckets, d)
        self.act = nn.Embedding(NUM_ACTIONS, d)
        for e in (self.item, self.cat, self.act):
            nn.init.normal_(e.weight, std=0.05)
        self.register_buffer("planes", make_hyperplanes(d, cfg.sdim_hashes, cfg.sdim_bits, seed=cfg.seed))
        layers: list[nn.Module] = []
        width = 5 * d + user_dense + cand_dense + 1
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.user_dense, self.cand_dense = user_dense, cand_dense

    def codes(self, item_rows: torch.Tensor) -> torch.Tensor:
        return simhash(self.item.weight[item_rows].detach(), self.planes, self.cfg.sdim_bits)  # (N, m)

    def logits(self, batch: Batch, bf16: bool = False) -> torch.Tensor:
        c = self.cfg
        b = batch.batch_size
        owner = batch.candidate_user_index()  # (N,)
        cand = batch.candidate_item_ids()
        cand_rows = _rows(cand, ITEM_FEATURE, c.item_buckets)
        ccat = batch.candidates[ITEM_CATEGORY]
        coff = torch.zeros(ccat.lengths().numel(), dtype=torch.int64)
        coff[1:] = torch.cumsum(ccat.lengths().to(torch.int64), 0)[:-1]
        cat_part = (F.embedding_bag(_rows(ccat.values(), CATEGORY_FEATURE, c.category_buckets), self.cat.weight, coff,
                                    mode="mean") if ccat.values().numel() else torch.zeros(len(cand), c.rank_dim))
        e_c = self.item(cand_rows) + cat_part  # (N, d)

        lengths = batch.history_lengths()
        hist = batch.history_values(HIST_ITEM_ID)
        hist_rows = _rows(hist, ITEM_FEATURE, c.item_buckets)
        hist_cat = _rows(batch.history_values(HIST_CATEGORY), CATEGORY_FEATURE, c.category_buckets)
        values = self.item(hist_rows) + self.cat(hist_cat)  # (L, d)

        # short term: target attention over the last short_len behaviors
        s_items, mask = _padded_tail(hist_rows, lengths, c.short_len)
        s_cat, _ = _padded_tail(hist_cat, lengths, c.short_len)
        s_act, _ = _padded_tail(batch.history_values(HIST_ACTION), lengths, c.short_len)
        e_s = self.item(s_items) + self.cat(s_cat) + self.act(s_act.clamp(0, NUM_ACTIONS - 1))  # (B, S, d)
        if b == 1:  # serving: one user, no (N, S, d) gather
            att = (e_c @ e_s[0].T) / math.sqrt(c.rank_dim)  # (N, S)
            att = att.masked_fill(~mask[0], float("-inf"))
            short = torch.softmax(att, -1).nan_to_num(0.0) @ e_s[0]  # (N, d); no history: zeros
        else:
            k = e_s[owner]  # (N, S, d)
            att = (k @ e_c[:, :, None]).squeeze(-1) / math.sqrt(c.rank_dim)  # (N, S)
            att = att.masked_fill(~mask[owner], float("-inf"))
            w = torch.softmax(att, -1).nan_to_num(0.0)  # users without history: zeros
            short = (w[..., None] * k).sum(1)  # (N, d)

        # long term: SDIM collision gather over the whole history (signatures stored at ingest when present)
        if HIST_SDIM_SIG in batch.history.keys():
            codes = unpack_codes(batch.history_values(HIST_SDIM_SIG), c.sdim_hashes, c.sdim_bits)
        else:
            codes = self.codes(hist_rows)
        offsets = torch.zeros(b + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        max_len = int(lengths.max()) if b else 0
        long = collision_gather(values, codes, offsets, self.codes(cand_rows), owner, max(max_len, 1))  # (N, d)

        x = torch.cat([e_c, short, long, e_c * short, e_c * long, batch.user_dense[owner], batch.candidate_dense,
                       torch.log1p(lengths.to(torch.float32))[owner, None]], dim=1)
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.mlp(x).float().squeeze(-1)
        return self.mlp(x).squeeze(-1)  # (N,)


class StandinRanker:
    """RankerInference over a trained `_RankerNet`."""

    def __init__(self, net: _RankerNet) -> None:
        self.net = net.eval()

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        return torch.sigmoid(self.net.logits(batch, bf16=self.net.cfg.bf16))

    @torch.inference_mode()
    def behavior_signatures(self, item_ids: np.ndarray) -> np.ndarray:
        c = self.net.cfg
        codes = self.net.codes(_rows(item_ids, ITEM_FEATURE, c.item_buckets))
        return pack_codes(codes, c.sdim_bits).numpy()


# ----------------------------------------------------------------------------- export / load
def _save(net: nn.Module, out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "weights.pt")
    (out / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _config(d: dict[str, Any]) -> StandinConfig:
    d = dict(d)
    for k in ("hidden", "item_numeric_keys"):
        d[k] = tuple(d[k])
    return StandinConfig(**d)


def load_retriever(path: Path) -> StandinRetriever:
    import faiss

    meta = json.loads((path / "config.json").read_text())
    net = _RetrieverNet(_config(meta["config"]))
    net.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
    ids = np.load(path / "item_ids.npy", allow_pickle=False)
    index = faiss.read_index(str(path / "index.faiss"))
    if index.ntotal != len(ids) or index.d != net.cfg.dim:
        raise ValueError(f"index has {index.ntotal} x {index.d} vectors, item_ids {len(ids)} x dim {net.cfg.dim}")
    return StandinRetriever(net, ids, index)


def load_ranker(path: Path) -> StandinRanker:
    meta = json.loads((path / "config.json").read_text())
    net = _RankerNet(_config(meta["config"]), int(meta["user_dense"]), int(meta["candidate_dense"]))
    net.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
    return StandinRanker(net)


# ----------------------------------------------------------------------------- training
@dataclass
class _Data:
    """A dataset's events sorted by (user, ts, event_id), plus item categories."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    action: np.ndarray
    category: np.ndarray  # of each event's item
    label: np.ndarray
    etype: np.ndarray  # object array of event type names
    is_beh: np.ndarray
    items: Any  # the Catalog


def _load(dataset: Path, seq: SequenceConfig) -> _Data:
    from serving.catalog import load_catalog

    t = read_table(dataset, "events", ["event_id", "user_id", "item_id", "ts_ms", "event_type", "label"])
    cols = {n: t.column(n).to_numpy(zero_copy_only=False) for n in t.column_names}
    order = np.lexsort((cols["event_id"], cols["ts_ms"], cols["user_id"]))
    cat = load_catalog(dataset)
    et = cols["event_type"][order]
    label = cols["label"][order].astype(np.float32)
    types = {t: i for i, t in enumerate(np.unique(et))}
    codes_by_type = {t: action_code(t, 0.0) for t in types}
    act = np.fromiter((codes_by_type[e] for e in et), np.int64, len(et)) + (label >= 0.5)
    item = cols["item_id"][order].astype(np.int64)
    return _Data(cols["user_id"][order].astype(np.int64), item, cols["ts_ms"][order].astype(np.int64), act,
                 cat.primary_categories(item), label, et, np.isin(et, list(seq.behavior_event_types)), cat)


def _windows(start: np.ndarray, s: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the n positions before each s (within its user, from start), (S, n) + mask."""
    idx = s[:, None] - n + np.arange(n)[None, :]
    mask = idx >= start[:, None]
    return np.where(mask, idx, 0), mask


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False)


def train_retriever(data: _Data, cfg: StandinConfig, progress: bool = False) -> StandinRetriever:
    import faiss

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    b = data.is_beh
    user, item, cat = data.user[b], data.item[b], data.category[b]
    first = np.r_[True, user[1:] != user[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(user)), 0))
    samples = np.flatnonzero(~first)  # every behavior after a user's first is a next-item target
    catalog = data.items
    item_ids = catalog.item_ids
    net = _RetrieverNet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    all_rows = _rows(item_ids, ITEM_FEATURE, cfg.item_buckets)
    cv, cl = catalog.jagged(np.arange(len(catalog)), "category")
    all_cat = _rows(cv, CATEGORY_FEATURE, cfg.category_buckets)
    all_len = torch.from_numpy(cl)
    if len(samples) > cfg.max_retriever_samples:
        samples = np.sort(rng.choice(samples, cfg.max_retriever_samples, replace=False))
    target_row = torch.from_numpy(catalog.rows(item[samples]))
    keep = target_row >= 0
    samples, target_row = samples[keep.numpy()], target_row[keep]
    bar = _bar(cfg.retriever_epochs * -(-len(samples) // cfg.batch_size), "stand-in retriever", progress)
    for _ in range(cfg.retriever_epochs):
        perm = rng.permutation(len(samples))
        for s in range(0, len(perm), cfg.batch_size):
            bar.update(1)
            sel = perm[s:s + cfg.batch_size]
            idx, mask = _windows(start[samples[sel]], samples[sel], cfg.user_history)
            u = net.user_vecs(_rows(item[idx].reshape(-1), ITEM_FEATURE, cfg.item_buckets).view(idx.shape),
                              _rows(cat[idx].reshape(-1), CATEGORY_FEATURE, cfg.category_buckets).view(idx.shape),
                              torch.from_numpy(mask))
            v = net.item_vecs(all_rows, all_cat, all_len)
            loss = F.cross_entropy(u @ v.T / 0.05, target_row[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
    bar.close()
    net.eval()
    with torch.no_grad():
        vecs = net.item_vecs(all_rows, all_cat, all_len).numpy().astype(np.float32)
    index = faiss.IndexFlatIP(cfg.dim)
    index.add(vecs)
    return StandinRetriever(net, item_ids.copy(), index)


def asof_counters(entity_keys: np.ndarray, ev_ts: np.ndarray, ev_pos: np.ndarray, q_keys: np.ndarray, q_ts: np.ndarray,
                  entity: str, stats: StatsConfig) -> dict[str, np.ndarray]:
    """Counters of each query (entity, t) over the entity's counted events in [t - w, t) (training only)."""
    span = int(max(ev_ts.max(initial=0), q_ts.max(initial=0))) + 1
    uniq, inv = np.unique(np.concatenate([entity_keys, q_keys]), return_inverse=True)
    if len(uniq) * span >= 1 << 62:
        raise ValueError("stand-in counters: too many entities x time span for the composite key")
    ek, qk = inv[:len(entity_keys)] * span, inv[len(entity_keys):] * span
    order = np.argsort(ek + ev_ts, kind="stable")
    keys = (ek + ev_ts)[order]
    cpos = np.concatenate([[0], np.cumsum(ev_pos[order])])
    right = np.searchsorted(keys, qk + q_ts, "left")
    out = {}
    for w, ms in zip(stats.windows, stats.window_ms()):
        left = np.searchsorted(keys, qk if ms is None else qk + np.maximum(q_ts - ms, 0), "left")
        out[cnt_column(entity, w)] = (right - left).astype(np.float64)
        out[pos_column(entity, w)] = (cpos[right] - cpos[left]).astype(np.float64)
    return out


def train_ranker(data: _Data, cfg: StandinConfig, stats: StatsConfig,
                 progress: bool = False) -> tuple[StandinRanker, DenseLayout]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    counted = np.isin(data.etype, list(stats.counted_event_types()))
    prior = float((data.label[counted] >= 0.5).mean()) if counted.any() else 0.5
    keys = tuple(k for k in cfg.item_numeric_keys if k in data.items.numeric)
    layout = DenseLayout(stats, prior, keys)
    samples = np.flatnonzero(counted)
    if len(samples) > cfg.max_ranker_samples:
        samples = np.sort(rng.choice(samples, cfg.max_ranker_samples, replace=False))
    pos = (data.label >= 0.5) & counted
    ud = layout.user_dense(asof_counters(data.user[counted], data.ts[counted], pos[counted].astype(np.int64),
                                         data.user[samples], data.ts[samples], "user", stats))
    cd = layout.candidate_dense(
        asof_counters(data.item[counted], data.ts[counted], pos[counted].astype(np.int64), data.item[samples],
                      data.ts[samples], "item", stats),
        data.items.numeric_of(data.items.rows(data.item[samples]), keys))
    # history of a sample: the user's behaviors strictly before its ts (the last max_train_history);
    # behaviors are sorted by (user, ts), so one search on a composite (user rank, ts) key finds the bound
    beh = np.flatnonzero(data.is_beh)
    uniq, uinv = np.unique(data.user, return_inverse=True)
    span = int(data.ts.max(initial=0)) + 1
    bkey = uinv[beh] * span + data.ts[beh]
    lo = np.searchsorted(bkey, uinv[samples] * span, "left")
    hi = np.searchsorted(bkey, uinv[samples] * span + data.ts[samples], "left")
    start = np.maximum(lo, hi - cfg.max_train_history)
    net = _RankerNet(cfg, ud.shape[1], cd.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    cv_all, cl_all = data.items.jagged(data.items.rows(data.item[samples]), "category")
    coff = np.concatenate([[0], np.cumsum(cl_all)])
    labels = torch.from_numpy((data.label[samples] >= 0.5).astype(np.float32))
    bar = _bar(cfg.ranker_epochs * -(-len(samples) // cfg.batch_size), f"stand-in ranker (seed {cfg.seed})", progress)
    for _ in range(cfg.ranker_epochs):
        perm = rng.permutation(len(samples))
        for s in range(0, len(perm), cfg.batch_size):
            bar.update(1)
            sel = np.sort(perm[s:s + cfg.batch_size])
            batch = _sample_batch(data, samples[sel], start[sel], hi[sel], beh, ud[sel], cd[sel],
                                  [cv_all[coff[i]:coff[i + 1]] for i in sel])
            loss = F.binary_cross_entropy_with_logits(net.logits(batch), labels[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
    bar.close()
    return StandinRanker(net), layout


def _sample_batch(data: _Data, samples: np.ndarray, start: np.ndarray, end: np.ndarray, beh: np.ndarray,
                  ud: np.ndarray, cd: np.ndarray, cand_cats: list[np.ndarray]) -> Batch:
    lens = end - start
    idx = beh[np.concatenate([np.arange(a, b) for a, b in zip(start, end)])] if lens.sum() else np.empty(0, np.int64)
    n = len(samples)
    ones = np.ones(n, np.int64)
    return build_batch(
        user={"user_id": (data.user[samples], ones)},
        history={HIST_ITEM_ID: data.item[idx], "hist_ts": data.ts[idx], HIST_ACTION: data.action[idx],
                 HIST_CATEGORY: data.category[idx]},
        history_lengths=lens,
        candidates={ITEM_ID: (data.item[samples], ones),
                    ITEM_CATEGORY: (np.concatenate(cand_cats) if n else np.empty(0, np.int64),
                                    np.array([len(c) for c in cand_cats], np.int64))},
        num_candidates=ones, request_ts=data.ts[samples], user_dense=ud, candidate_dense=cd,
    )


def features_block(layout: DenseLayout) -> dict[str, Any]:
    """The ``features`` entry of a bundle manifest (the shape `DenseLayout.from_manifest` reads)."""
    s = layout.stats
    return {"config": {"stats": {"windows": list(s.windows), "event_types": list(s.event_types),
                                 "prior_weight": s.prior_weight}},
            "dense": {"prior_rate": layout.prior_rate, "item_numeric_keys": list(layout.item_numeric_keys)}}


def train_standin_bundle(dataset: Path, out_root: Path, versions: tuple[str, ...] = ("v1",),
                         cfg: StandinConfig = StandinConfig(), stats: StatsConfig = StatsConfig(),
                         seq: SequenceConfig = SequenceConfig(), progress: bool = False) -> dict[str, tuple[Path, str]]:
    """Trains the stand-in retriever and ranker on a canonical dataset and writes one bundle per version.

    Versions after the first get a ranker retrained with another seed (distinct weights, same interface),
    which is what hot-swap tests and demos need. Returns {version: (bundle dir, manifest checksum)}.
    """
    from serving.models import write_bundle

    t0 = time.perf_counter()
    data = _load(dataset, seq)
    retriever = train_retriever(data, cfg, progress)
    staging = Path(out_root) / ".staging"
    _save(retriever.net, staging / "retriever", {"config": asdict(retriever.net.cfg), "trained_on": str(dataset)})
    np.save(staging / "retriever" / "item_ids.npy", retriever.item_ids, allow_pickle=False)
    import faiss

    faiss.write_index(retriever.index, str(staging / "retriever" / "index.faiss"))
    out = {}
    for i, v in enumerate(versions):
        rcfg = StandinConfig(**{**asdict(cfg), "seed": cfg.seed + i})
        ranker, layout = train_ranker(data, rcfg, stats, progress)
        rdir = staging / f"ranker-{v}"
        _save(ranker.net, rdir, {"config": asdict(rcfg), "user_dense": ranker.net.user_dense,
                                 "candidate_dense": ranker.net.cand_dense, "trained_on": str(dataset)})
        path = Path(out_root) / v
        checksum = write_bundle(path, v, (LOADER, staging / "retriever"), (LOADER, rdir), features_block(layout),
                                extra={"trained_in_s": round(time.perf_counter() - t0, 1)})
        out[v] = (path, checksum)
    import shutil

    shutil.rmtree(staging)
    return out


__all__ = ["LOADER", "StandinConfig", "StandinRanker", "StandinRetriever", "asof_counters", "features_block",
           "load_ranker", "load_retriever", "train_standin_bundle"]
