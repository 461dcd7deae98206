"""Typed configuration of the CTR ranker (frozen dataclasses; YAML files in ranking/configs/).

    cfg = features.config.load_config(RankerConfig, "ranking/configs/ml-1m.yaml", ["train.epochs=2"])

An ablation is a config, never a code path chosen by name: ``ranking/configs/ablations/din.yaml``
turns the long-sequence module, DARE's decoupled tables and the mixture of experts off;
``full.yaml`` turns all of them on. Dataset files set what differs per dataset (table
sizes, history caps, epochs). No dataset names appear in code.

The model config is what an export stores (config.json): the inference module is
rebuilt from it and the code, never unpickled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from features.item_item import MAX_HISTORY as ITEM_ITEM_MAX_HISTORY
from features.train.sharding import ShardingConfig

# TorchRec table names.
ITEM_REP_TABLE = "item_rep"
ITEM_ATT_TABLE = "item_att"
CATEGORY_REP_TABLE = "category_rep"
CATEGORY_ATT_TABLE = "category_att"

LongModule = Literal["none", "full", "dare", "sdim"]


@dataclass(frozen=True)
class EmbeddingArchConfig:
    """Embedding tables.

    dim: the representation dimension D (behaviors, candidates, interest vectors).
    decoupled: DARE (Feng et al. 2024): every behavior feature (item, category,
        action) has two tables, an *attention* table of `attention_dim` used only
        to score behaviors against the candidate, and a *representation* table of
        `dim` used only to aggregate them and as the candidate's input to the MLP.
        False: one table of `dim` does both (DIN, SDIM, full attention baselines).
    attention_dim: Da of the attention tables (DARE lets it be smaller, e.g. D/2).
    user_features: pooled features of the user KJT (e.g. "user_id", "user_attr_age"),
        each with its own hashed table of `pooled_dim`.
    candidate_features: pooled (mean) multi-valued features of the candidates KJT
        besides the item id (e.g. "item_category", "item_tag").
    """

    dim: int = 32
    decoupled: bool = False
    attention_dim: int = 16
    item_buckets: int = 1 << 16
    category_buckets: int = 1 << 12
    use_category: bool = True
    use_action: bool = True
    user_features: tuple[str, ...] = ("user_id",)
    user_buckets: int = 1 << 16
    candidate_features: tuple[str, ...] = ()
    candidate_buckets: int = 1 << 12
    pooled_dim: int = 16
    init_std: float = 0.05

    def __post_init__(self) -> None:
        for name in ("dim", "attention_dim", "item_buckets", "category_buckets", "user_buckets",
                     "candidate_buckets", "pooled_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"embedding.{name} must be positive, got {getattr(self, name)}")
        for group in ("user_features", "candidate_features"):
            names = getattr(self, group)
            if len(set(names)) != len(names):
                raise ValueError(f"embedding.{group} has duplicates: {list(names)}")
        if "item_id" in self.candidate_features:
            raise ValueError("embedding.candidate_features must not list item_id (the item tables embed it)")
        if self.init_std <= 0:
            raise ValueError(f"embedding.init_std must be positive, got {self.init_std}")

    @property
    def query_dim(self) -> int:
        """Dimension of attention queries and keys."""
        return self.attention_dim if self.decoupled else self.dim


@dataclass(frozen=True)
class SequenceArchConfig:
    """Behavior-sequence modules.

    short_len: DIN-style target attention over the last `short_len` behaviors (0: off).
    long: the long-term module over the last `long_len` behaviors:
        "none"; "full" softmax target attention over all of them;
        "dare" top-`top_k` search with the attention embeddings, softmax-weighted
        sum of the kept behaviors' representation embeddings (needs
        embedding.decoupled for DARE proper; coupled tables give the TWIN/SIM-style
        top-K baseline); "sdim" SimHash signatures (m = `sdim_hashes`
        functions of tau = `sdim_bits` bits) of the behaviors' and the candidate's
        item embeddings and aggregation by signature collision (no softmax).
    """

    short_len: int = 50
    long: LongModule = "none"
    long_len: int = 1000
    top_k: int = 32
    sdim_hashes: int = 8
    sdim_bits: int = 3
    sdim_seed: int = 0

    def __post_init__(self) -> None:
        if self.short_len < 0:
            raise ValueError(f"sequence.short_len must be >= 0, got {self.short_len}")
        if self.long not in ("none", "full", "dare", "sdim"):
            raise ValueError(f"sequence.long must be one of none/full/dare/sdim, got {self.long!r}")
        if self.long != "none" and self.long_len <= 0:
            raise ValueError(f"sequence.long_len must be positive with a long module, got {self.long_len}")
        if self.top_k <= 0:
            raise ValueError(f"sequence.top_k must be positive, got {self.top_k}")
        if self.sdim_hashes <= 0 or self.sdim_bits <= 0 or self.sdim_hashes * self.sdim_bits > 63:
            raise ValueError(f"sequence.sdim_hashes * sdim_bits must fit a packed int64 signature (<= 63 bits), "
                             f"got {self.sdim_hashes} x {self.sdim_bits}")
        if self.short_len == 0 and self.long == "none":
            raise ValueError("the ranker needs a behavior module: set sequence.short_len > 0 or sequence.long")

    @property
    def history_len(self) -> int:
        """How many of the latest behaviors the model reads (longer histories are truncated)."""
        return max(self.short_len, self.long_len if self.long != "none" else 0)


@dataclass(frozen=True)
class MoEArchConfig:
    """AW-MoE (Gong et al. 2023): experts over the feature interactions, gated by attention.

    num_experts == 1 is a plain MLP (no gate). With more, each task's gate is

        g = softmax( sum_l a_l * GateUnit(v_l) + W [candidate, user] )          (E,)

    where a_l are the candidate's target-attention weights over the short-term
    behaviors and GateUnit maps a behavior's representation to expert logits.
    """

    num_experts: int = 1
    expert_hidden: tuple[int, ...] = (256, 128)
    gate_hidden: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"moe.num_experts must be positive, got {self.num_experts}")
        if not self.expert_hidden or any(h <= 0 for h in self.expert_hidden):
            raise ValueError(f"moe.expert_hidden must be positive sizes, got {list(self.expert_hidden)}")
        if self.gate_hidden <= 0:
            raise ValueError(f"moe.gate_hidden must be positive, got {self.gate_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"moe.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class HeadsConfig:
    """Task heads sharing the bottom; task 0 is the main task (what serving ranks by)."""

    tasks: tuple[str, ...] = ("click",)

    def __post_init__(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"heads.tasks must be non-empty and unique, got {list(self.tasks)}")


@dataclass(frozen=True)
class ModelConfig:
    """The whole model. user_dense_dim / candidate_dense_dim: -1 = take them from the data.

    residual_column: the second-stage mode. When >= 0, column `residual_column` of
        `candidate_dense` holds the first stage's logit for the candidate (the
        retriever's score over its temperature) and the main task's logit is
        that value plus the model's output, whose last layer starts at zero: an
        untrained ranker reproduces the retriever's order and its softmax, and
        training learns only the correction. -1: a plain CTR ranker.
    retrieval_products: a second stage reading the retriever's vectors: its last
        `retrieval_products` candidate_dense columns are the u_d * v_d terms of the
        retriever's logit (`features.candidate_lists.retrieval_products`; the
        retriever's dimension), which the server computes from its own retriever.
        0: none; -1: take it from the data.
    retrieval_similarity: a second stage reading the retriever-space similarities of each candidate to the
        request's last `retrieval_similarity` behaviors (`features.candidate_lists.retrieval_similarities`,
        3 columns after the products; at most `sequence.history_len`). 0: none; -1: take it from the data.
    """

    embedding: EmbeddingArchConfig = EmbeddingArchConfig()
    sequence: SequenceArchConfig = SequenceArchConfig()
    moe: MoEArchConfig = MoEArchConfig()
    heads: HeadsConfig = HeadsConfig()
    user_dense_dim: int = -1
    candidate_dense_dim: int = -1
    # experts under bf16 autocast where the CPU computes bf16 natively (AVX-512 BF16 / AMX: about 2x); elsewhere
    # fp32, since emulated bf16 is tens of times slower (features/hardware.py)
    bf16_mlp: bool = True
    residual_column: int = -1
    retrieval_products: int = -1
    retrieval_similarity: int = -1

    def __post_init__(self) -> None:
        if (self.retrieval_products > 0 or self.retrieval_similarity > 0) and self.residual_column < 0:
            raise ValueError("retrieval_products and retrieval_similarity need a second-stage ranker "
                             "(residual_column >= 0)")
        if self.retrieval_similarity > self.sequence.history_len:
            raise ValueError(f"retrieval_similarity {self.retrieval_similarity} exceeds the "
                             f"{self.sequence.history_len} behaviors the ranker reads (sequence.history_len)")
        if self.resolved and self.retrieval_products > self.candidate_dense_dim:
            raise ValueError(f"retrieval_products {self.retrieval_products} exceeds the {self.candidate_dense_dim} "
                             f"candidate_dense columns")
        if self.sequence.short_len == 0 and self.moe.num_experts > 1:
            raise ValueError("moe.num_experts > 1 needs the short-term sequence (sequence.short_len > 0): "
                             "the AW-MoE gate attends over it")
        if self.residual_column < -1:
            raise ValueError(f"residual_column must be -1 (off) or a candidate_dense column, got {self.residual_column}")
        if self.resolved and self.residual_column >= self.candidate_dense_dim:
            raise ValueError(f"residual_column {self.residual_column} is not a candidate_dense column "
                             f"(the data has {self.candidate_dense_dim})")

    @property
    def resolved(self) -> bool:
        return self.user_dense_dim >= 0 and self.candidate_dense_dim >= 0


@dataclass(frozen=True)
class LossConfig:
    """BCE per task (weighted by the samples' weights) + the AW-MoE contrastive gate loss.

    kind: "pointwise" = BCE on every task; "listwise" = the main task is trained
        with a softmax cross-entropy over each request's candidate list (the
        retriever's top-N; the labels of a list are the target distribution,
        lists without a positive are left out), the other tasks keep BCE.

    contrastive_weight: lambda of the InfoNCE loss between the gate outputs of two
        randomly masked views of the short-term sequence (each behavior dropped
        with `mask_prob`); 0 turns it off. Needs moe.num_experts > 1.
    contrastive_rows: at most this many samples (drawn at random among those with
        behaviors) enter the InfoNCE matrix of a batch, which is quadratic in it.
    """

    task_weights: tuple[float, ...] = ()  # () = 1 for every task
    kind: Literal["pointwise", "listwise"] = "pointwise"
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.2
    mask_prob: float = 0.3
    contrastive_rows: int = 512

    def __post_init__(self) -> None:
        if self.contrastive_weight < 0:
            raise ValueError(f"loss.contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"loss.contrastive_temperature must be positive, got {self.contrastive_temperature}")
        if self.contrastive_rows < 2:
            raise ValueError(f"loss.contrastive_rows must be >= 2, got {self.contrastive_rows}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"loss.mask_prob must be in (0, 1), got {self.mask_prob}")
        if any(w < 0 for w in self.task_weights):
            raise ValueError(f"loss.task_weights must be >= 0, got {list(self.task_weights)}")
        if self.kind not in ("pointwise", "listwise"):
            raise ValueError(f"loss.kind must be pointwise or listwise, got {self.kind!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from: a `cascade build-features` output directory (read by features.reader).

    Which events are samples (e.g. the ML-1M CTR protocol keeps the "rating" events
    of users 1-2999) is decided when the features are built
    (``ranking.event_types`` of `cascade build-features`), not here. The reader
    slices each sample's history to the last `model.sequence.history_len`
    behaviors (what the model reads) or the build's cap, whichever is smaller.
    """

    features_dir: str = ""
    batch_size: int = 2048
    eval_batch_size: int = 4096
    shuffle_seed: int = 0
    shuffle_buffer_rows: int = 131_072
    validate: bool = True  # features.batch.validate_batch on every batch

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ValueError("data.batch_size and data.eval_batch_size must be positive")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: epochs, optimizers (fused row-wise Adagrad for tables, AdamW dense), checkpoints.

    select_metric: the valid metric that picks the best epoch (its test metrics are reported);
        "hr@10" / "ndcg@10" rank each request's list (listwise second stage: the
        target's position among the retrieved candidates, a miss when the
        retriever did not retrieve it).
    max_steps_per_epoch: 0 = a full pass over the training split; with a smaller number every "epoch" is
        that many steps and an evaluation (a listwise ranker peaks within a fraction of a pass).
    patience: stop after that many evaluations without a valid `select_metric` improvement; the best
        evaluation is the one exported either way.
    lr_schedule: the dense rate over the run's steps (epochs x steps per epoch): "constant", or "cosine"
        down to `min_lr_ratio * dense_lr` at the last step; `warmup_steps` of linear warmup either way
        (`features.train.loop.scheduled_lr`, the retriever's schedule). The tables keep their constant rate.
    """

    epochs: int = 3
    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    sharding: ShardingConfig = field(default_factory=lambda: ShardingConfig(embedding_lr=0.05))
    seed: int = 0
    select_metric: Literal["auc", "gauc", "logloss", "hr@10", "ndcg@10"] = "auc"
    max_steps_per_epoch: int = 0
    max_minutes: float = 0.0  # 0 = no time budget
    patience: int = 0  # evaluations (epochs) without a valid improvement before stopping (0: never)
    log_every: int = 50
    threads: int = 0  # torch threads per rank; 0 = leave as is

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"train.epochs must be positive, got {self.epochs}")
        if self.dense_lr <= 0:
            raise ValueError(f"train.dense_lr must be positive, got {self.dense_lr}")
        if self.max_steps_per_epoch < 0 or self.max_minutes < 0 or self.patience < 0 or self.warmup_steps < 0:
            raise ValueError("train.max_steps_per_epoch, train.max_minutes, train.patience and train.warmup_steps "
                             "must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class ListsConfig:
    """How a second-stage ranker (`model.residual_column` >= 0) gets its training lists (`jobs.second_stage`).

    A second retriever, the same config with ``train.holdout_tail = holdout``, is trained without each
    user's last `holdout` training items; its top `top_n` lists at those positions are the training lists
    (targets it never trained on, so its logit is as sharp in training as at serving). Valid and test lists
    come from the served retriever at the validation / test positions. Every seen item is masked.
    """

    top_n: int = 100  # candidates per list (the ranker's N)
    holdout: int = 5  # training positions per user held out of the lists retriever
    train_width: int = 32  # sampled candidates per training list and step (0: the whole list)
    lists_per_batch: int = 16
    context_window: int = 5  # point-in-time context features over the last N behaviors (0: list features only)
    # the retriever's per-dimension logit terms u_d * v_d as D more candidate features (the correction can then
    # reweight the retriever's own dimensions on its hard candidates); the server computes them from its retriever
    retriever_vectors: bool = False
    # the cosine in the retriever's item space of each candidate to the request's last behavior, and its max and
    # mean over the last `retriever_similarity` behaviors (3 features; 0: off): basis-free, unlike the u_d * v_d terms
    retriever_similarity: int = 0
    # an item-item model (EASE, `features.item_item`) fitted on what each list's retriever trained on: its score of
    # the candidate from the request's last `item_item_history` behaviors and the gap to the list's best (2 features);
    # exported with the ranker (item_item.npz), so the server computes them from its stored sequence (which keeps
    # up to `features.sequence.SequenceConfig.long_cap` behaviors: keep item_item_history at most that)
    item_item: bool = False
    item_item_k: int = 256  # weights kept per candidate (0: all)
    item_item_lambda: float = 500.0  # the ridge weight
    item_item_history: int = 1000
    # with item_item, also train the ranker without the item-item inputs and keep whichever is better on the valid
    # lists' `train.select_metric` (a tie keeps the one without): the inputs lift some catalogs (ML-1M) and not
    # others (Beauty), and validation, not the dataset's name, decides
    item_item_select: bool = False
    max_users: int = 0  # 0: every user (a smaller number: smoke runs)

    def __post_init__(self) -> None:
        if self.top_n < 1 or self.holdout < 1 or self.lists_per_batch < 1:
            raise ValueError(f"lists.top_n, lists.holdout and lists.lists_per_batch must be >= 1, got "
                             f"{self.top_n}, {self.holdout}, {self.lists_per_batch}")
        if not 0 <= self.train_width <= self.top_n:
            raise ValueError(f"lists.train_width must be in [0, lists.top_n={self.top_n}], got {self.train_width}")
        if self.item_item and (self.item_item_k < 0 or not 1 <= self.item_item_history <= ITEM_ITEM_MAX_HISTORY
                               or not self.item_item_lambda > 0):
            raise ValueError(f"lists.item_item_k must be >= 0, lists.item_item_history in [1, {ITEM_ITEM_MAX_HISTORY}] "
                             f"and lists.item_item_lambda > 0, got {self.item_item_k}, {self.item_item_history}, "
                             f"{self.item_item_lambda}")
        if self.context_window < 0 or self.max_users < 0 or self.retriever_similarity < 0:
            raise ValueError(f"lists.context_window, lists.max_users and lists.retriever_similarity must be >= 0, "
                             f"got {self.context_window}, {self.max_users}, {self.retriever_similarity}")


@dataclass(frozen=True)
class RankerConfig:
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lists: ListsConfig = ListsConfig()  # second-stage rankers only

    def __post_init__(self) -> None:
        if self.loss.contrastive_weight > 0 and self.model.moe.num_experts == 1:
            raise ValueError("loss.contrastive_weight > 0 needs the AW-MoE gate (model.moe.num_experts > 1)")
        tw = self.loss.task_weights
        if tw and len(tw) != len(self.model.heads.tasks):
            raise ValueError(f"loss.task_weights has {len(tw)} entries for {len(self.model.heads.tasks)} tasks")
