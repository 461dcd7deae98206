"""Embedding arch: the batch's canonical ids -> behavior, candidate and pooled embeddings.

Tables are plain TorchRec collections (features.train.sharding shards them from
outside). Ids map to table rows with the versioned hash spec through
`kernels.bucketize`, so the batch built by the reader and the one built online
from Redis hold the same canonical ids and the model does the mapping.

A behavior l and a candidate n are embedded as sums over their features::

    v_l = R_item[item_l] + R_cat[cat_l] + R_act[action_l]            (L, D)   representation
    c_n = R_item[item_n] + R_cat[cat_n]                              (N, D)
    k_l = A_item[item_l] + A_cat[cat_l] + A_act[action_l]            (L, Da)  attention (DARE)
    q_n = A_item[item_n] + A_cat[cat_n]                              (N, Da)

With DARE (``decoupled``) the A tables are separate from the R tables (Feng et
al. 2024): k and q are functions of A only, v and c of R only, so the attention
tables learn only from the attention scores and the representation tables only
from what is aggregated and fed to the MLP. Without it, k = v and q = c.

Throughput: a batch's histories repeat items a lot (N samples x L behaviors
over a catalog), so every distinct item / category id is hashed and looked up
once per batch, every distinct (item, category, action) triple is embedded once,
and each behavior's row is one gather from those.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.batch import (HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_SDIM_SIG, ITEM_CATEGORY, ITEM_ID, Batch,
                            kjt_columns)
from features.jagged import offsets_of, tail_index
from features.layout import CATEGORY_FEATURE, ITEM_FEATURE
from features.sequence import NUM_ACTIONS
from kernels import bucketize, make_hyperplanes, simhash, unpack_codes
from ranking.config import (
    CATEGORY_ATT_TABLE,
    CATEGORY_REP_TABLE,
    ITEM_ATT_TABLE,
    ITEM_REP_TABLE,
    EmbeddingArchConfig,
    SequenceArchConfig,
)


class EmbeddedBatch(NamedTuple):
    """The embedding arch's output. B users, N candidates, L kept behaviors (the last `history_len`)."""

    offsets: torch.Tensor  # (B+1,) int64: user b's behaviors are rows offsets[b]:offsets[b+1]
    cand_user: torch.Tensor  # (N,) int64 user of each candidate
    max_len: int  # the longest kept history
    keys: torch.Tensor  # (L, Dq) attention keys k_l (== values when not decoupled)
    values: torch.Tensor  # (L, D) representations v_l
    queries: torch.Tensor  # (N, Dq) candidate attention queries q_n
    candidates: torch.Tensor  # (N, D) candidate representations c_n
    hist_codes: torch.Tensor | None  # (L, m) SDIM codes of the behaviors' items (None without SDIM)
    cand_codes: torch.Tensor | None  # (N, m) SDIM codes of the candidates' items
    user_pooled: torch.Tensor  # (B, Fu * P) pooled user features
    cand_pooled: torch.Tensor  # (N, Fc * P) pooled candidate features
    long_sums: torch.Tensor | None = None  # (B, m, K, D) SDIM bucket sums from the batch (serving); rows then
    #                                        hold only the last short_len behaviors
    seen_lengths: torch.Tensor | None = None  # (B,) behaviors the model reads per user; None: offsets.diff()


def first_values(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The first value of every jagged row; 0 for empty rows. (K,)"""
    lengths = lengths.to(torch.int64)
    if values.numel() == 0:
        return torch.zeros(lengths.numel(), dtype=values.dtype, device=values.device)
    starts = offsets_of(lengths)[:-1].clamp(max=values.numel() - 1)
    return torch.where(lengths > 0, values[starts], torch.zeros_like(values[starts]))


def compose_behaviors(item: torch.Tensor, item_idx: torch.Tensor, cat: torch.Tensor | None,
                      cat_idx: torch.Tensor | None, act: nn.Embedding | None, act_idx: torch.Tensor | None) -> torch.Tensor:
    """A behavior's embedding from its looked-up rows: item[item_idx] + cat[cat_idx] + act[act_idx]  (K, d).

    The one formula for v_l / k_l (module docstring): `EmbeddingArch.forward` applies it to a batch's
    distinct tokens, `EmbeddingArch.behavior_values` to any behaviors (SDIM bucket sums kept at ingest),
    so both give the same floats.
    """
    v = item.index_select(0, item_idx)
    if cat is not None:
        v = v + cat.index_select(0, cat_idx)
    if act is not None:
        v = v + act.weight.index_select(0, act_idx)
    return v


def _unique_rows(ids: torch.Tensor, feature: str, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids -> their table rows (U,), and the index of every id into them (len(ids),)."""
    uniq, inverse = torch.unique(ids, sorted=False, return_inverse=True)
    return bucketize(uniq, feature, buckets), inverse


def _bucketized_kjt(kjt: KeyedJaggedTensor, features: tuple[str, ...], buckets: int) -> KeyedJaggedTensor:
    parts = [kjt[f] for f in features]
    return KeyedJaggedTensor(
        keys=list(features),
        values=torch.cat([bucketize(jt.values(), f, buckets) for f, jt in zip(features, parts)]),
        lengths=torch.cat([jt.lengths().to(torch.int64) for jt in parts]),
        stride=kjt.stride(),
    )


def _feature_collection(features: tuple[str, ...], dim: int, buckets: int, device: torch.device,
                        init) -> EmbeddingCollection | None:
    if not features:
        return None
    return EmbeddingCollection(tables=[EmbeddingConfig(name=f, embedding_dim=dim, num_embeddings=buckets,
                                                       feature_names=[f], init_fn=init) for f in features],
                               device=device)


def _plain(ec: EmbeddingCollection) -> bool:
    """An unsharded collection (export, inference, tests): its tables are plain `nn.Embedding`s that can be
    called directly. Training wraps the model in DistributedModelParallel, which replaces the collections
    with sharded ones; those are called through their KeyedJaggedTensor interface."""
    return type(ec) is EmbeddingCollection


def _pooled(ec: EmbeddingCollection, kjt: KeyedJaggedTensor, features: tuple[str, ...], buckets: int,
            mean: bool, columns: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Each feature's ids (bucketized) looked up and pooled per row (sum or mean; 0 for no ids) -> (R, F * P).

    Pooling is done here rather than by a pooled TorchRec collection so that ranks may hold batches of
    different sizes (an evaluation split's last batch). `columns`: `kjt_columns(kjt)` when the caller has it.
    """
    if _plain(ec):  # the table called directly: the same lookup TorchRec's forward makes, without the KJT
        cols = columns if columns is not None else kjt_columns(kjt)
        looked = [(ec.embeddings[f](bucketize(cols[f][0], f, buckets)).float(), cols[f][1]) for f in features]
    else:
        out = ec(_bucketized_kjt(kjt, features, buckets))
        looked = [(out[f].values(), out[f].lengths().to(torch.int64)) for f in features]
    parts = []
    for values, lengths in looked:
        if values.shape[0] == lengths.numel() and bool((lengths == 1).all()):
            parts.append(values)  # one id per row (user ids, single-valued attributes): the pool is the row
            continue
        rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                       output_size=values.shape[0])
        pooled = values.new_zeros(lengths.numel(), values.shape[1]).index_add(0, rows, values)
        if mean:
            pooled = pooled / lengths.clamp_min(1)[:, None].to(pooled.dtype)
        parts.append(pooled)
    return torch.cat(parts, dim=1)


class EmbeddingArch(nn.Module):
    """Batch -> EmbeddedBatch. See the module docstring for the formulas.

    Args:
        cfg: the tables.
        seq: the sequence arch's config (how much history to read; SDIM hashing).
        embedding_device: "meta" when DistributedModelParallel will shard and
            initialize the tables, "cpu" for an unsharded model (tests, export).
    """

    def __init__(self, cfg: EmbeddingArchConfig, seq: SequenceArchConfig,
                 embedding_device: torch.device | str = "meta") -> None:
        super().__init__()
        self.cfg = cfg
        self.history_len = seq.history_len
        self.short_len = seq.short_len
        device = torch.device(embedding_device)
        init = partial(nn.init.normal_, mean=0.0, std=cfg.init_std)

        # Item and category tables: representation (dim) and, with DARE, attention (attention_dim). Sequence
        # (unpooled) collections: every distinct id of the batch is looked up once, and their number
        # differs between ranks and steps, which TorchRec's pooled collections do not allow when sharded.
        def collection(item: str, cat: str, dim: int) -> EmbeddingCollection:
            t = [EmbeddingConfig(name=item, embedding_dim=dim, num_embeddings=cfg.item_buckets,
                                 feature_names=[item], init_fn=init)]
            if cfg.use_category:
                t.append(EmbeddingConfig(name=cat, embedding_dim=dim, num_embeddings=cfg.category_buckets,
                                         feature_names=[cat], init_fn=init))
            return EmbeddingCollection(tables=t, device=device)

        self.rep_tables = collection(ITEM_REP_TABLE, CATEGORY_REP_TABLE, cfg.dim)
        self.att_tables = collection(ITEM_ATT_TABLE, CATEGORY_ATT_TABLE, cfg.attention_dim) if cfg.decoupled else None
        self.action_rep = nn.Embedding(NUM_ACTIONS, cfg.dim) if cfg.use_action else None
        self.action_att = nn.Embedding(NUM_ACTIONS, cfg.attention_dim) if cfg.use_action and cfg.decoupled else None
        for emb in (self.action_rep, self.action_att):
            if emb is not None:
                nn.init.normal_(emb.weight, std=cfg.init_std)
        self.user_tables = _feature_collection(cfg.user_features, cfg.pooled_dim, cfg.user_buckets, device, init)
        self.cand_tables = _feature_collection(cfg.candidate_features, cfg.pooled_dim, cfg.candidate_buckets, device,
                                               init)
        self.sdim = seq.long == "sdim"
        self.sdim_bits = seq.sdim_bits
        self.sdim_hashes = seq.sdim_hashes
        if self.sdim:
            planes = make_hyperplanes(cfg.query_dim, seq.sdim_hashes, seq.sdim_bits, seq.sdim_seed)
            self.register_buffer("sdim_planes", planes)  # (Dq, m * tau), fixed

    @property
    def user_pooled_dim(self) -> int:
        return len(self.cfg.user_features) * self.cfg.pooled_dim

    @property
    def cand_pooled_dim(self) -> int:
        return len(self.cfg.candidate_features) * self.cfg.pooled_dim

    def _lookup(self, item_rows: torch.Tensor, cat_rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Distinct item / category rows -> {table: (U, d)} for every table."""
        out: dict[str, torch.Tensor] = {}
        for ec, item, cat in ((self.rep_tables, ITEM_REP_TABLE, CATEGORY_REP_TABLE),
                              (self.att_tables, ITEM_ATT_TABLE, CATEGORY_ATT_TABLE)):
            if ec is None:
                continue
            keys, values = [item], [item_rows]
            if cat_rows is not None:
                keys.append(cat)
                values.append(cat_rows)
            if _plain(ec):  # tables named as their features: the direct call TorchRec's forward makes
                out.update({k: ec.embeddings[k](v).float() for k, v in zip(keys, values)})
                continue
            lengths = torch.tensor([v.numel() for v in values], dtype=torch.int64, device=item_rows.device)
            res = ec(KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=lengths))  # stride 1
            out.update({k: res[k].values() for k in keys})
        return out

    def item_query_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """(K,) canonical item ids -> (K, Dq) the item-only embeddings SDIM hashes (attention table when decoupled)."""
        rows, inv = _unique_rows(item_ids, ITEM_FEATURE, self.cfg.item_buckets)
        empty = rows[:0] if self.cfg.use_category else None
        name = ITEM_ATT_TABLE if self.cfg.decoupled else ITEM_REP_TABLE
        return self._lookup(rows, empty)[name][inv]

    def behavior_values(self, item_ids: torch.Tensor, categories: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(K,) canonical item ids, categories, action codes -> (K, D) representations v_l (`compose_behaviors`):
        what SDIM sums per bucket, bit-identical to the values `forward` computes for the same behaviors."""
        item_rows, item_inv = _unique_rows(item_ids, ITEM_FEATURE, self.cfg.item_buckets)
        cat_rows = cat_inv = None
        if self.cfg.use_category:
            cat_rows, cat_inv = _unique_rows(categories, CATEGORY_FEATURE, self.cfg.category_buckets)
        rows = self._lookup(item_rows, cat_rows)
        return compose_behaviors(rows[ITEM_REP_TABLE], item_inv, rows.get(CATEGORY_REP_TABLE), cat_inv,
                                 self.action_rep, actions if self.action_rep is not None else None)

    def sdim_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(K, Dq) item embeddings -> (K, m) SimHash codes (not differentiable)."""
        with torch.no_grad():
            return simhash(x.detach(), self.sdim_planes, self.sdim_bits)

    def forward(self, batch: Batch) -> EmbeddedBatch:
        cfg = self.cfg
        b = batch.batch_size
        history, cands = kjt_columns(batch.history), kjt_columns(batch.candidates)  # each KJT split once
        lengths = history[HIST_ITEM_ID][1]
        cand_user = batch.candidate_user_index()
        sums = batch.sdim_sums if self.sdim else None
        seen = None
        if sums is not None:  # the long-term module gathers from the sums: embed only the short-term behaviors
            seen = torch.maximum(lengths.clamp(max=self.history_len), batch.sdim_lengths.to(lengths.device))
            idx, lengths = tail_index(lengths, self.short_len)
        else:
            idx, lengths = tail_index(lengths, self.history_len)  # keep the last history_len behaviors
        offsets = offsets_of(lengths)

        def hist(key: str) -> torch.Tensor:
            v = history[key][0]
            return v if idx is None else v[idx]

        hist_items = hist(HIST_ITEM_ID)  # (L,)
        num_hist = hist_items.numel()
        cand_items = cands[ITEM_ID][0]  # (N,)
        item_rows, item_inv = _unique_rows(torch.cat([hist_items, cand_items]), ITEM_FEATURE, cfg.item_buckets)
        token = item_inv[:num_hist]  # (L,) a behavior's token: (item, category, action) -> one distinct id
        cat_rows = cat_inv = None
        if cfg.use_category:
            cand_cats = first_values(*cands[ITEM_CATEGORY])  # the primary (first) category, as in histories
            cat_rows, cat_inv = _unique_rows(torch.cat([hist(HIST_CATEGORY), cand_cats]), CATEGORY_FEATURE,
                                             cfg.category_buckets)
            token = token * cat_rows.numel() + cat_inv[:num_hist]
        if cfg.use_action:
            token = token * NUM_ACTIONS + hist(HIST_ACTION)
        # Behaviors repeat (item, category, action) triples a lot: embed each distinct triple once, then one
        # gather per behavior (instead of three gathers and two adds per behavior and table).
        tokens, token_inv = torch.unique(token, sorted=False, return_inverse=True)  # (T,), (L,)
        tok_act = tokens % NUM_ACTIONS if cfg.use_action else None
        rest = tokens // NUM_ACTIONS if cfg.use_action else tokens
        tok_cat = rest % cat_rows.numel() if cat_rows is not None else None
        tok_item = rest // cat_rows.numel() if cat_rows is not None else rest

        looked_up = self._lookup(item_rows, cat_rows)

        def compose(item: str, cat: str, act: nn.Embedding | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            item_u, cat_u = looked_up[item], looked_up.get(cat)  # (U, d) each
            tok = compose_behaviors(item_u, tok_item, cat_u, tok_cat, act, tok_act)  # (T, d)
            c = compose_behaviors(item_u, item_inv[num_hist:], cat_u,
                                  None if cat_inv is None else cat_inv[num_hist:], None, None)  # (N, d)
            return tok.index_select(0, token_inv), c, item_u  # (L, d), (N, d), (U, d)

        values, candidates, item_u = compose(ITEM_REP_TABLE, CATEGORY_REP_TABLE, self.action_rep)
        if cfg.decoupled:
            keys, queries, item_u = compose(ITEM_ATT_TABLE, CATEGORY_ATT_TABLE, self.action_att)
        else:
            keys, queries = values, candidates

        hist_codes = cand_codes = None
        if self.sdim:  # item-only embeddings in the query space, each distinct item hashed once
            codes = self.sdim_codes(item_u)  # (U, m)
            cand_codes = codes[item_inv[num_hist:]]
            if sums is not None:
                hist_codes = None  # not read: the long-term module gathers from the sums
            elif HIST_SDIM_SIG in history:  # computed when the events arrived (serving)
                hist_codes = unpack_codes(hist(HIST_SDIM_SIG), self.sdim_hashes, self.sdim_bits)
            else:
                hist_codes = codes[item_inv[:num_hist]]

        n = cand_items.numel()
        if self.user_tables is not None:
            user_pooled = _pooled(self.user_tables, batch.user, cfg.user_features, cfg.user_buckets, mean=False)
        else:
            user_pooled = values.new_zeros(b, 0)
        if self.cand_tables is not None:
            cand_pooled = _pooled(self.cand_tables, batch.candidates, cfg.candidate_features, cfg.candidate_buckets,
                                  mean=True, columns=cands)
        else:
            cand_pooled = values.new_zeros(n, 0)
        max_len = int(lengths.max()) if b else 0
        return EmbeddedBatch(offsets, cand_user, max_len, keys, values, queries, candidates, hist_codes, cand_codes,
                             user_pooled, cand_pooled, sums, seen)
