"""Typed configuration of the two-tower retriever (frozen dataclasses; YAML files in retrieval/configs/).

    cfg = features.config.load_config(RetrieverConfig, "retrieval/configs/ml-1m.yaml", ["train.epochs=3"])

Every knob has a default; the per-dataset YAML files set what differs (sequence
length, attribute features, dropout, epochs). No dataset names appear in code.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from features.train.sharding import ShardingConfig

ITEM_ID_TABLE = "item_id"
CATEGORY_TABLE = "category"


@dataclass(frozen=True)
class ItemTowerConfig:
    """Item tower: hashed id embedding (+ attributes) -> L2-normalized vector.

    id_buckets: rows of the item-id table; ids map to rows with the features.hashing
        spec (``pmod(xxhash64(feature, id), id_buckets)``).
    id_hashes: independent hashes per id whose rows are summed ("hash embedding"):
        with 2 hashes two catalog items share their whole representation only if
        both hashes collide, which does not happen at catalog sizes of millions.
    category: use the item's categories (multi-valued, mean-pooled; the same table
        embeds the history's primary category).
    attribute_features: pooled attribute features of the candidate KJT, e.g.
        ("item_attr_year", "item_tag"); each gets its own small hashed table.
    id_dropout: probability of dropping an item's id embedding in training, so
        that the attribute path alone gives usable vectors for new items.
    """

    id_buckets: int = 1 << 20
    id_hashes: int = 2
    category: bool = True
    category_buckets: int = 1 << 12
    attribute_features: tuple[str, ...] = ()
    attribute_buckets: int = 1 << 12
    id_dropout: float = 0.0
    init_std: float = 0.05

    def __post_init__(self) -> None:
        if self.id_buckets <= 0 or self.category_buckets <= 0 or self.attribute_buckets <= 0:
            raise ValueError("item tower bucket counts must be positive")
        if not 1 <= self.id_hashes <= 4:
            raise ValueError(f"item.id_hashes must be in 1..4, got {self.id_hashes}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"item.id_dropout must be in [0, 1), got {self.id_dropout}")


@dataclass(frozen=True)
class UserTowerConfig:
    """User tower: causal self-attention over the last `max_len` behaviors (+ user features).

    A behavior's token is id embedding (shared with the item tower) + primary
    category + action code + learned position (0 = oldest kept behavior).
    """

    max_len: int = 200
    num_layers: int = 2
    num_heads: int = 1
    ffn_mult: int = 4
    dropout: float = 0.2
    attention_dropout: float = 0.0  # > 0 leaves the fused (flash) CPU attention kernel: about 2.5x slower
    use_category: bool = True
    use_action: bool = False
    user_features: tuple[str, ...] = ()
    user_feature_buckets: int = 1 << 12
    length_groups: int = 4  # users are encoded in groups of similar history length (less padding)

    def __post_init__(self) -> None:
        if min(self.max_len, self.num_layers, self.num_heads, self.ffn_mult, self.length_groups) <= 0:
            raise ValueError("user tower sizes (max_len, num_layers, num_heads, ffn_mult, length_groups) must be positive")
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"user.{name} must be in [0, 1), got {v}")


@dataclass(frozen=True)
class ModelConfig:
    """dim: both towers' output size. score: "cosine" (both towers L2-normalize; logits cos / tau)
    or "dot" (unnormalized, logits q . v / tau: set loss.temperature=1). Either way an item's vector
    depends on the item alone, so an inner-product ANN index over the item matrix serves it."""

    dim: int = 64
    item: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    user: UserTowerConfig = field(default_factory=UserTowerConfig)
    score: Literal["cosine", "dot"] = "cosine"

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.dim % self.user.num_heads:
            raise ValueError(f"model.dim={self.dim} must be positive and divisible by user.num_heads={self.user.num_heads}")


@dataclass(frozen=True)
class LossConfig:
    """Sampled softmax over in-batch (+ uniform) negatives with logQ correction (retrieval/loss.py).

    mode: "sampled" — negatives are the batch's positives (in_batch) plus
        `uniform_negatives` items drawn uniformly from the catalog, each column
        corrected by log Q (see retrieval/loss.py for the formula); with
        in_batch=false the `uniform_negatives` draws are one pool shared by every
        row of the step (the cheap epoch: (M, K) logits instead of (M, N));
        "full" — every catalog item is a column (the limit of sampling: no
        correction needed), affordable for catalogs of thousands of items.
    dedupe: one column per distinct item (Q = inclusion probability) instead of
        one per draw (Q = expected number of draws).
    temperature: logits are cos(q, v) / temperature; `learn_temperature` makes
        it a trained parameter (clamped to [min_temperature, 1]).
    """

    mode: Literal["sampled", "full"] = "sampled"
    in_batch: bool = True
    uniform_negatives: int = 0
    dedupe: bool = True
    logq_correction: bool = True
    temperature: float = 0.05
    learn_temperature: bool = False
    min_temperature: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.min_temperature <= self.temperature <= 1.0:
            raise ValueError(f"loss.temperature must be in [min_temperature, 1], got {self.temperature}")
        if self.uniform_negatives < 0:
            raise ValueError(f"loss.uniform_negatives must be >= 0, got {self.uniform_negatives}")
        if self.mode == "sampled" and not self.in_batch and self.uniform_negatives == 0:
            raise ValueError("loss: sampled mode needs in_batch negatives or uniform_negatives > 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128  # users per step and rank (each contributes every position of its sequence)
    lr: float = 1e-3  # dense parameters (AdamW)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays to min_lr_ratio * lr at the horizon
    # the cosine's horizon: "epochs" (the last of train.epochs) or "budget" (whichever comes first of the last
    # epoch and train.max_minutes: the rate reaches its floor when the time budget is spent, not before)
    lr_horizon: Literal["epochs", "budget"] = "epochs"
    min_lr_ratio: float = 0.05
    grad_clip: float = 0.0  # 0: off; dense parameters only
    bf16: bool = False  # bfloat16 autocast for the towers (encoder); logits and loss stay float32
    seed: int = 0
    threads: int = 0  # torch threads per rank; 0: cores / world size
    eval_every: int = 1  # epochs
    patience: int = 5  # evaluations without a valid improvement before stopping (0: never)
    select_metric: str = "ndcg@10"
    # wall-clock budget of the training loop (steps + valid evaluations + checkpoints; 0: none): no epoch is
    # started that the last epoch's duration says would end past it
    max_minutes: float = 0.0
    checkpoint_every: int = 1  # epochs; the last and the best epoch are always kept
    # leave each user's last `holdout_tail` training items out of training: the second stage's lists retriever,
    # whose top-N lists at those positions are for targets it never trained on (benchmarks/two_stage_bench.py)
    holdout_tail: int = 0
    sharding: ShardingConfig = field(default_factory=lambda: ShardingConfig(embedding_lr=0.05))

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"train.epochs and train.batch_size must be positive, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_minutes < 0 or self.patience < 0:
            raise ValueError(f"train.max_minutes and train.patience must be >= 0, got {self.max_minutes}, {self.patience}")
        if self.lr_horizon == "budget" and self.max_minutes <= 0:
            raise ValueError("train.lr_horizon=budget needs a time budget: set train.max_minutes > 0")


@dataclass(frozen=True)
class EvalConfig:
    """Leave-one-out full ranking: the held-out item against every catalog item, the user's history masked."""

    ks: tuple[int, ...] = (10, 50, 200)
    recall_ks: tuple[int, ...] = (100, 500)
    batch_size: int = 512
    mask_history: bool = True
    max_users: int = 0  # 0: all users (a smaller number only for quick checks)


IndexKind = Literal["flat", "hnsw", "ivf", "ivf_pq"]


@dataclass(frozen=True)
class IndexTier:
    """The served index for catalogs of up to `max_items` items (fields as in IndexConfig).

    Chosen from the recall@500-vs-latency curve of benchmarks/ann_bench.py (one core, against
    exact search): the fastest setting with recall@500 >= 0.95 at <= 5 ms per query.
    """

    max_items: int
    kind: IndexKind = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 1024
    ivf_nlist: int = 0
    ivf_nprobe: int = 16
    pq_m: int = 16
    refine_factor: int = 0

    def __post_init__(self) -> None:
        if self.max_items <= 0:
            raise ValueError(f"index tier max_items must be positive, got {self.max_items}")


# From the 1M-item curve (benchmarks/results/retrieval/ann-1m.json, one core, recall@500 vs exact; exact search
# 13.7 ms per query): exact search up to 100k items (a flat scan of 100k 64-d vectors is ~1.4 ms, recall 1);
# up to 2M, IVF-Flat nlist=1,024 nprobe=64 (1M: recall 0.984 at 1.7 ms); beyond, nlist=4,096 nprobe=256
# (1M: 0.989 at 2.0 ms, fewer vectors per probed list as the catalog grows; not measured above 1M).
DEFAULT_TIERS: tuple[IndexTier, ...] = (
    IndexTier(max_items=100_000, kind="flat"),
    IndexTier(max_items=2_000_000, kind="ivf", ivf_nlist=1024, ivf_nprobe=64),
    IndexTier(max_items=1_000_000_000, kind="ivf", ivf_nlist=4096, ivf_nprobe=256),
)


@dataclass(frozen=True)
class IndexConfig:
    """The exported ANN index over the item embedding matrix (faiss, inner product).

    kind: "auto" picks the first of `tiers` whose max_items holds the catalog (the served
    parameters per catalog size); the others fix the index: "flat" (exact), "hnsw", "ivf"
    (IVF-Flat), "ivf_pq" (IVF with `pq_m` 8-bit sub-quantizers, re-ranked exactly over
    `refine_factor` x k candidates when refine_factor > 0). ivf_nlist 0: about 4 sqrt(N).
    """

    kind: Literal["auto", "flat", "hnsw", "ivf", "ivf_pq"] = "auto"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 1024
    ivf_nlist: int = 0  # 0: about 4 * sqrt(N)
    ivf_nprobe: int = 16
    pq_m: int = 16
    refine_factor: int = 0
    recall_k: int = 500
    tiers: tuple[IndexTier, ...] = DEFAULT_TIERS

    def __post_init__(self) -> None:
        if self.hnsw_m <= 0 or self.hnsw_ef_search <= 0 or self.ivf_nprobe <= 0 or self.recall_k <= 0:
            raise ValueError("index: hnsw_m, hnsw_ef_search, ivf_nprobe and recall_k must be positive")
        if self.pq_m <= 0 or self.refine_factor < 0:
            raise ValueError(f"index: pq_m must be positive and refine_factor >= 0, got {self.pq_m}, {self.refine_factor}")
        if self.kind == "auto" and not self.tiers:
            raise ValueError("index.kind=auto needs at least one entry in index.tiers")
        sizes = [t.max_items for t in self.tiers]
        if sizes != sorted(sizes):
            raise ValueError(f"index.tiers must be sorted by max_items, got {sizes}")

    def for_catalog(self, num_items: int) -> "IndexConfig":
        """The concrete index (kind != auto) for a catalog of `num_items` items: the first tier that holds it
        (the last tier beyond the largest max_items)."""
        if self.kind != "auto":
            return self
        tier = next((t for t in self.tiers if num_items <= t.max_items), self.tiers[-1])
        fields = {k: getattr(tier, k) for k in ("kind", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                                                "ivf_nlist", "ivf_nprobe", "pq_m", "refine_factor")}
        return replace(self, **fields)


@dataclass(frozen=True)
class RetrieverConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        known = [f"{m}@{k}" for k in self.eval.ks for m in ("hr", "ndcg")] + [f"recall@{k}" for k in self.eval.recall_ks]
        if self.train.select_metric not in known:
            raise ValueError(f"train.select_metric {self.train.select_metric!r} is not computed; choose one of {known}")
