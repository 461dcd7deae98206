"""The two-tower model: a causal self-attention user tower and a hashed-id + attribute item tower.

Plain TorchRec modules, no knowledge of sharding (features.train.sharding wraps
the train task in DistributedModelParallel from outside).

Item tower (new items get a vector from their attributes alone)::

    v = normalize( sum_h E_item[hash_h(id)]  +  mean_c E_cat[c]  +  sum_f E_f[attr_f] )   # (K, D)

(`model.score: dot` leaves both towers' outputs unnormalized: score = q . v.)

User tower (SASRec/GPT-style, pre-LN, right-padded so `is_causal` alone is exact)::

    x_t = sum_h E_item[hash_h(id_t)] + E_cat[cat_t] (+ E_act[action_t]) + P[t]          # t = 0 is the oldest kept
    h   = LN(Blocks(dropout(x)))                                                     # (B, T, D)
    q_t = normalize(h_t (+ W_u sum_f E_f[user attr_f]))                               # after every position

`E_item` is one table shared by both towers (history tokens and item vectors),
as in SASRec. Ids map to rows with the versioned hash spec of
features.hashing through `kernels.bucketize` (bit-identical to Spark and serving),
so the batch built by the reader and the one built online from Redis hold the
same canonical ids and the model does the mapping.

The query after position t summarizes behaviors 0..t only (causal), so the
training forward at a sequence's last position is exactly what
`RetrieverInference.user_embedding` computes for that history.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, ITEM_CATEGORY, ITEM_ID, Batch
from features.jagged import jagged_tail, offsets_of, segment_rows
from features.layout import CATEGORY_FEATURE, ITEM_FEATURE
from features.sequence import NUM_ACTIONS
from kernels import bucketize
from retrieval.config import CATEGORY_TABLE, ITEM_ID_TABLE, ModelConfig


def id_hash_features(num_hashes: int) -> tuple[str, ...]:
    """Hash-spec feature names of the item-id hashes: "item_id", "item_id#1", ..."""
    return tuple(ITEM_FEATURE if h == 0 else f"{ITEM_FEATURE}#{h}" for h in range(num_hashes))


class TowerOutput(NamedTuple):
    queries: torch.Tensor  # (S, D) user vector after each history position (L2-normalized for cosine), S = sum of lengths
    query_offsets: torch.Tensor  # (B + 1,) int64: user b's positions are queries[off[b]:off[b+1]]
    items: torch.Tensor  # (K, D) item vectors (L2-normalized for the cosine score)


class CausalBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), x + FFN(LN(x)), causal."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attention_dropout
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with `last` (B,) each row's last real position: (B, D), the output at that
        position only (keys and values of every position, one query, one FFN row: what a user vector needs)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        p = self.attn_dropout if self.training else 0.0
        if last is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, H, T, Dh)
            x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
            return x + self.drop(self.ffn(self.ln2(x)))
        rows = torch.arange(b, device=x.device)
        visible = torch.arange(t, device=x.device)[None, :] <= last[:, None]  # (B, T): causal for that query
        a = F.scaled_dot_product_attention(q[rows, :, last].unsqueeze(2), k, v, attn_mask=visible[:, None, None, :],
                                           dropout_p=p)  # (B, H, 1, Dh)
        x = x[rows, last] + self.drop(self.proj(a.reshape(b, d)))  # (B, D)
        return x + self.drop(self.ffn(self.ln2(x)))


def _segment_mean(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(sum L, D) jagged by lengths (K,) -> (K, D) means; 0 for empty rows."""
    k = lengths.numel()
    seg = torch.repeat_interleave(torch.arange(k, device=values.device), lengths)
    out = values.new_zeros(k, values.shape[1]).index_add_(0, seg, values)
    return out / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)


def _right_pad_index(lengths: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flat index into a (B, T) right-padded layout for every jagged element, and T = max length."""
    b = lengths.numel()
    t = int(lengths.max()) if b else 0
    offsets = offsets_of(lengths)
    row = torch.repeat_interleave(torch.arange(b, device=lengths.device), lengths)
    col = torch.arange(int(offsets[-1]), device=lengths.device) - offsets[:-1][row]
    return row * t + col, t


class TwoTowerRetriever(nn.Module):
    """The model. forward(batch, items) -> TowerOutput (queries at every history position, item vectors).

    Args:
        cfg: ModelConfig.
        embedding_device: where TorchRec tables are allocated; "meta" when the
            model is to be sharded by DistributedModelParallel (it materializes
            and initializes the shards), "cpu" for an unsharded model (export,
            inference).

    Shapes: B users with history lengths L_b (S = sum L_b), K items, D = cfg.dim.

    Example::

        model = TwoTowerRetriever(ModelConfig(dim=32), torch.device("cpu"))
        out = model(batch, batch.candidates)   # out.queries (S, 32), out.items (N, 32)
    """

    def __init__(self, cfg: ModelConfig, embedding_device: torch.device | str = "meta") -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        it, ut = cfg.item, cfg.user
        self.id_features = id_hash_features(it.id_hashes)
        init = partial(nn.init.normal_, mean=0.0, std=it.init_std)
        tables = [EmbeddingConfig(name=ITEM_ID_TABLE, embedding_dim=d, num_embeddings=it.id_buckets,
                                  feature_names=list(self.id_features), init_fn=init)]
        self.use_category = it.category or ut.use_category
        if self.use_category:
            tables.append(EmbeddingConfig(name=CATEGORY_TABLE, embedding_dim=d, num_embeddings=it.category_buckets,
                                          feature_names=[CATEGORY_FEATURE], init_fn=init))
        self.item_ec = EmbeddingCollection(tables=tables, device=torch.device(embedding_device))
        self.item_ebc = _bag_collection(it.attribute_features, d, it.attribute_buckets, embedding_device, init)
        self.user_ebc = _bag_collection(ut.user_features, d, ut.user_feature_buckets, embedding_device, init)

        self.positions = nn.Embedding(ut.max_len, d)
        nn.init.normal_(self.positions.weight, std=it.init_std)
        self.actions = nn.Embedding(NUM_ACTIONS, d) if ut.use_action else None
        if self.actions is not None:
            nn.init.normal_(self.actions.weight, std=it.init_std)
        self.input_dropout = nn.Dropout(ut.dropout)
        self.blocks = nn.ModuleList(
            CausalBlock(d, ut.num_heads, ut.ffn_mult, ut.dropout, ut.attention_dropout) for _ in range(ut.num_layers)
        )
        self.final_ln = nn.LayerNorm(d)
        self.user_proj = nn.Linear(d, d) if ut.user_features else None

    def forward(self, batch: Batch, items: KeyedJaggedTensor, last_only: bool = False) -> TowerOutput:
        """Queries after every (kept) history position of batch's users, and vectors of `items`.

        last_only: only each user's query after its last behavior (queries (B, D), query_offsets 0..B), the
            user vector serving and evaluation read; the last block then computes one position per user.

        batch: only `history` (hist_item_id, hist_category, hist_action) and `user`
            are read; histories longer than max_len keep their last max_len behaviors.
        items: a candidates-style KJT (item_id + the configured attribute keys),
            stride K; may have no keys (K = 0) for a user-only forward.

        Both parts share one sharded lookup. In a distributed run every rank must
        make the same kind of call (user-only, item-only or both) at the same time.
        """
        cfg = self.cfg
        hist_len, hist = self._history(batch)  # (B,), key -> (S,)
        b, s = hist_len.numel(), int(hist_len.sum())
        k = items.stride() if ITEM_ID in items.keys() else 0
        item_ids = items[ITEM_ID].values() if k else hist[HIST_ITEM_ID].new_zeros(0)
        ones = torch.ones(k, dtype=torch.int64, device=hist_len.device)

        keys, values, lengths = [], [], []
        id_vals = torch.cat([hist[HIST_ITEM_ID], item_ids])
        for f in self.id_features:
            keys.append(f)
            values.append(bucketize(id_vals, f, cfg.item.id_buckets))
            lengths.append(torch.cat([hist_len, ones]))
        item_cat_len = None
        if self.use_category:
            hc = hist[HIST_CATEGORY] if cfg.user.use_category else hist_len.new_zeros(0)
            hl = hist_len if cfg.user.use_category else torch.zeros_like(hist_len)
            if cfg.item.category and k:
                jt = items[ITEM_CATEGORY]
                ic, item_cat_len = jt.values(), jt.lengths().to(torch.int64)
            else:
                ic, item_cat_len = hc.new_zeros(0), torch.zeros_like(ones)
            keys.append(CATEGORY_FEATURE)
            values.append(bucketize(torch.cat([hc, ic]), CATEGORY_FEATURE, cfg.item.category_buckets))
            lengths.append(torch.cat([hl, item_cat_len]))
        emb = self.item_ec(KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)))

        id_emb = emb[self.id_features[0]].values()  # (S + K, D)
        for f in self.id_features[1:]:
            id_emb = id_emb + emb[f].values()
        cat_emb = emb[CATEGORY_FEATURE].values() if self.use_category else None
        item_vecs = self._item_vectors(items, id_emb[s:], cat_emb, item_cat_len, s if cfg.user.use_category else 0)

        if b == 0:
            return TowerOutput(id_emb.new_zeros(0, cfg.dim), torch.zeros(1, dtype=torch.int64), item_vecs)
        tokens = id_emb[:s]
        if cfg.user.use_category:
            tokens = tokens + cat_emb[:s]
        if self.actions is not None:
            tokens = tokens + self.actions(hist[HIST_ACTION])
        h = self._encode(tokens, hist_len, last_only)  # (S, D), or (B, D) last_only
        if self.user_ebc is not None:
            u = self.user_proj(self._pooled(self.user_ebc, batch.user, cfg.user.user_features,
                                            cfg.user.user_feature_buckets))
            h = h + (u if last_only else torch.repeat_interleave(u, hist_len, dim=0))
        offsets = torch.zeros(b + 1, dtype=torch.int64, device=h.device)
        offsets[1:] = torch.cumsum(torch.ones_like(hist_len) if last_only else hist_len, 0)
        return TowerOutput(self._output(h.float()), offsets, item_vecs)

    def _history(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg.user
        keys = [HIST_ITEM_ID] + ([HIST_CATEGORY] if cfg.use_category else []) + ([HIST_ACTION] if cfg.use_action else [])
        lengths = batch.history_lengths()
        out = {key: batch.history_values(key) for key in keys}
        if lengths.numel() and int(lengths.max()) > cfg.max_len:
            for key in keys:
                out[key], new_len = jagged_tail(out[key], lengths, cfg.max_len)
            lengths = new_len
        return lengths, out

    def _item_vectors(self, items: KeyedJaggedTensor, id_emb: torch.Tensor, cat_emb: torch.Tensor | None,
                      cat_len: torch.Tensor | None, cat_start: int) -> torch.Tensor:
        k = id_emb.shape[0]
        if k == 0:
            return id_emb.new_zeros(0, self.cfg.dim)
        if self.training and self.cfg.item.id_dropout > 0:
            keep = torch.rand(k, 1, device=id_emb.device) >= self.cfg.item.id_dropout
            id_emb = id_emb * keep
        v = id_emb
        if self.cfg.item.category:
            v = v + _segment_mean(cat_emb[cat_start:], cat_len)  # the items' rows follow the history's
        if self.item_ebc is not None:
            v = v + self._pooled(self.item_ebc, items, self.cfg.item.attribute_features, self.cfg.item.attribute_buckets)
        return self._output(v.float())  # (K, D)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        """The towers' last step: L2-normalized for the cosine score, as is for the dot product."""
        return F.normalize(x, dim=-1) if self.cfg.score == "cosine" else x

    def _pooled(self, ebc: EmbeddingBagCollection, kjt: KeyedJaggedTensor, features: tuple[str, ...],
                buckets: int) -> torch.Tensor:
        """Sum over `features` of their mean-pooled embeddings: (stride, D)."""
        jts = [kjt[f] for f in features]
        inp = KeyedJaggedTensor(
            keys=list(features),
            values=torch.cat([bucketize(jt.values(), f, buckets) for f, jt in zip(features, jts)]),
            lengths=torch.cat([jt.lengths() for jt in jts]),
        )
        pooled = ebc(inp).values()  # (stride, F * D)
        return pooled.view(pooled.shape[0], len(features), self.cfg.dim).sum(1)

    def _encode(self, tokens: torch.Tensor, lengths: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(S, D) jagged tokens -> (S, D) causal encoder outputs; (B, D) of each user's last position with
        `last_only`.

        Users are sorted by length and encoded in `length_groups` groups, each
        right-padded only to its own longest history: with skewed lengths (Beauty:
        median 6, cap 50) one padded (B, max L) block would be mostly padding.
        Causality makes the result independent of the grouping.
        """
        b = lengths.numel()
        groups = min(self.cfg.user.length_groups, b)
        if groups <= 1:
            return self._encode_padded(tokens, lengths, last_only)
        starts = offsets_of(lengths)[:-1]
        idx, enc = [], []
        for g in torch.tensor_split(torch.argsort(lengths, stable=True), groups):
            lg = lengths[g]
            rows = segment_rows(starts[g], lg)  # the group's tokens in `tokens`
            idx.append(g if last_only else rows)
            enc.append(self._encode_padded(tokens[rows], lg, last_only))
        out = tokens.new_zeros(b, tokens.shape[1]) if last_only else torch.zeros_like(tokens)
        return out.index_copy(0, torch.cat(idx), torch.cat(enc).to(tokens.dtype))

    def _encode_padded(self, tokens: torch.Tensor, lengths: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        b, d = lengths.numel(), self.cfg.dim
        idx, t = _right_pad_index(lengths)
        x = tokens.new_zeros(b * t, d).index_copy(0, idx, tokens).view(b, t, d)
        x = self.input_dropout(x + self.positions.weight[:t])  # (B, T, D)
        if last_only:
            last = (lengths - 1).clamp(min=0)
            for block in self.blocks[:-1]:
                x = block(x)
            return self.final_ln(self.blocks[-1](x, last))  # (B, D)
        for block in self.blocks:
            x = block(x)
        x = self.final_ln(x)
        return x.reshape(b * t, d)[idx]  # (S, D)


def _bag_collection(features: tuple[str, ...], dim: int, buckets: int, device: torch.device | str,
                    init) -> EmbeddingBagCollection | None:
    if not features:
        return None
    return EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f, embedding_dim=dim, num_embeddings=buckets, feature_names=[f],
                                   pooling=PoolingType.MEAN, init_fn=init) for f in features],
        device=torch.device(device),
    )
