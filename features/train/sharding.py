"""Sharded embeddings: TorchRec DistributedModelParallel, the plan, fused optimizers.

Shared by the retriever and the ranker (one machinery, not two copies). Model
code builds plain TorchRec modules (`EmbeddingCollection` for sequences,
`EmbeddingBagCollection` for pooled features) and knows nothing of sharding;
`shard_model` wraps the model from the outside:

* the planner picks table-wise / row-wise / data-parallel per table, and
  `ShardingConfig.constraints` overrides it per table (e.g. force row-wise for
  the item table);
* the embeddings' optimizer is fused into the backward (FBGEMM TBE kernels).
  On CPU the fused kernels support SGD, Adagrad and row-wise Adagrad, not Adam
  (STACK.md; fbgemm-gpu-cpu 1.8's TBE asserts it), so the default is row-wise
  Adagrad and the Adam family is offered for CUDA; dense parameters use Adam
  through `make_optimizer`. TorchRec's unfused route to Adam on CPU (tables
  planned data-parallel on the dense compute kernel, stepped by the dense
  optimizer) does not serve sequence lookups: TorchRec 1.8's data-parallel
  EmbeddingCollection returns one row per bag, bag-major (a 3-key probe got
  f1 g1 h1 f2 ... for f1 f2 f3 g1 ...), so the retriever's per-position item
  embeddings would come back pooled and interleaved;
* `embedding_optimizer: sparse_adam` is the CPU route to Adam that works: the
  collections are left unsharded (a full replica on every rank, as data-parallel
  would hold), their lookups emit sparse row gradients, DDP averages them across
  ranks with the dense ones, and `torch.optim.SparseAdam` updates the rows a step
  touched (lazy Adam: moments of untouched rows stay as they were). It suits
  catalogs whose tables fit every rank; the replica costs three tables' memory;
* TorchRec offers ROW_WISE for EmbeddingBagCollection only on CUDA; a sharder
  subclass adds it for CPU (gloo), which works (verified, STACK-DETAILS §2).
"""
from __future__ import annotations

import logging

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

SHARDING_TYPES = ("data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")


@dataclass(frozen=True)
class ShardingConfig:
    """How embedding tables are sharded and optimized.

    constraints: table name -> allowed sharding types (the planner picks among
        them); tables not listed are planned freely.
    """

    constraints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # fused into the backward by FBGEMM. "adam" / "partial_rowwise_adam" (Adam moments per element / the
    # second moment per row) run on CUDA only: fbgemm-gpu-cpu's TBE supports SGD and (row-wise) Adagrad
    # "sparse_adam": unfused, the tables replicated on every rank and stepped by torch.optim.SparseAdam (CPU or CUDA)
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam", "partial_rowwise_adam",
                                 "sparse_adam"] = "rowwise_adagrad"
    embedding_lr: float = 0.05
    embedding_eps: float = 1e-8
    embedding_betas: tuple[float, float] = (0.9, 0.999)  # Adam family only

    def __post_init__(self) -> None:
        for table, types in self.constraints.items():
            bad = [t for t in types if t not in SHARDING_TYPES]
            if bad or not types:
                raise ValueError(f"sharding constraints for table {table!r}: {list(types)} (allowed: {SHARDING_TYPES})")


class CpuRowWiseEBCSharder(EmbeddingBagCollectionSharder):
    """Offers ROW_WISE / TABLE_ROW_WISE for EmbeddingBagCollection on CPU as well."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types = types + [t for t in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value) if t not in types]
        return types


def default_sharders() -> list[ModuleSharder[nn.Module]]:
    return [CpuRowWiseEBCSharder(), EmbeddingCollectionSharder()]


def sharders_for(cfg: ShardingConfig) -> list[ModuleSharder[nn.Module]]:
    """The sharders DistributedModelParallel gets: none under sparse_adam (the tables stay unsharded replicas)."""
    return [] if cfg.embedding_optimizer == UNFUSED_EMBEDDING_OPTIMIZER else default_sharders()


def embedding_tables(model: nn.Module) -> dict[str, tuple[int, int]]:
    """table name -> (num_embeddings, embedding_dim) for every TorchRec collection in `model`."""
    out: dict[str, tuple[int, int]] = {}
    for m in model.modules():
        if isinstance(m, EmbeddingCollection):
            for c in m.embedding_configs():
                out[c.name] = (c.num_embeddings, c.embedding_dim)
        elif isinstance(m, EmbeddingBagCollection):
            for c in m.embedding_bag_configs():
                out[c.name] = (c.num_embeddings, c.embedding_dim)
    return out


def _embedding_params(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for m in model.modules():
        if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection)):
            params.extend(m.parameters())
    return params


CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "sparse_adam")
UNFUSED_EMBEDDING_OPTIMIZER = "sparse_adam"


def _replicate_tables(model: nn.Module, device: torch.device) -> None:
    """The unsharded tables of sparse_adam: allocated on `device` and initialized by their configs' init_fn
    (TorchRec's reset_parameters skips a collection built on "meta", and DistributedModelParallel only
    initializes what it shards), each lookup emitting a sparse (rows-touched) gradient, the input SparseAdam
    takes. Ranks seeded alike get identical replicas (DDP also broadcasts rank 0's when it wraps)."""
    for m in model.modules():
        if isinstance(m, EmbeddingCollection):
            tables = [(c, m.embeddings[c.name]) for c in m.embedding_configs()]
        elif isinstance(m, EmbeddingBagCollection):
            tables = [(c, m.embedding_bags[c.name]) for c in m.embedding_bag_configs()]
        else:
            continue
        m._device = device  # what its reset_parameters and `device` report from now on
        for c, emb in tables:
            if emb.weight.is_meta or emb.weight.device != device:
                emb.to_empty(device=device)
                with torch.no_grad():
                    c.init_fn(emb.weight) if c.init_fn is not None else emb.reset_parameters()
            emb.sparse = True


def _fuse_embedding_optimizer(model: nn.Module, cfg: ShardingConfig, device: torch.device) -> None:
    params = _embedding_params(model)
    if not params:
        return
    if device.type == "cpu" and cfg.embedding_optimizer not in CPU_EMBEDDING_OPTIMIZERS:
        raise ValueError(f"sharding.embedding_optimizer={cfg.embedding_optimizer!r} has no fused CPU kernel in "
                         f"fbgemm-gpu-cpu (CPU: {', '.join(CPU_EMBEDDING_OPTIMIZERS)}); use it on CUDA")
    if cfg.embedding_optimizer == UNFUSED_EMBEDDING_OPTIMIZER:
        _replicate_tables(model, device)  # stepped by make_optimizer's SparseAdam, not fused
    elif cfg.embedding_optimizer in ("adam", "partial_rowwise_adam"):
        from torchrec.optim import Adam, PartialRowWiseAdam

        cls = Adam if cfg.embedding_optimizer == "adam" else PartialRowWiseAdam
        _apply_optimizer_in_backward(cls, params, {"lr": cfg.embedding_lr, "eps": cfg.embedding_eps,
                                                   "betas": tuple(cfg.embedding_betas)})
    elif cfg.embedding_optimizer == "rowwise_adagrad":
        _apply_optimizer_in_backward(RowWiseAdagrad, params, {"lr": cfg.embedding_lr, "eps": cfg.embedding_eps})
    elif cfg.embedding_optimizer == "adagrad":
        _apply_optimizer_in_backward(torch.optim.Adagrad, params, {"lr": cfg.embedding_lr, "eps": cfg.embedding_eps})
    else:
        _apply_optimizer_in_backward(torch.optim.SGD, params, {"lr": cfg.embedding_lr})


def plan_sharding(
    model: nn.Module, cfg: ShardingConfig, world_size: int, device: torch.device,
    pg: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """The planner's plan under `cfg.constraints` (collective when a process group is given); empty under
    sparse_adam, whose tables are not sharded."""
    tables = embedding_tables(model)
    if cfg.embedding_optimizer == UNFUSED_EMBEDDING_OPTIMIZER:
        if cfg.constraints:
            raise ValueError(f"sharding constraints {dict(cfg.constraints)} with embedding_optimizer=sparse_adam: "
                             "its tables are replicated on every rank, not sharded")
        return ShardingPlan(plan={})
    unknown = sorted(set(cfg.constraints) - set(tables))
    if unknown:
        raise ValueError(f"sharding constraints name unknown tables {unknown}; the model's tables are {sorted(tables)}")
    constraints = {
        name: ParameterConstraints(sharding_types=list(types), compute_kernels=["fused"])
        for name, types in cfg.constraints.items()
    }
    # The planner warns on every plan that the topology was built directly and that dry-run dense sizes are
    # estimates; both are expected on CPU (we size nothing from dense tensors), so only its errors are shown.
    for name in ("torchrec.distributed.planner.types", "torchrec.distributed.planner.storage_reservations"):
        logging.getLogger(name).setLevel(logging.ERROR)
    topology = Topology(world_size=world_size, compute_device=device.type, local_world_size=world_size)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    try:
        if pg is not None:
            return planner.collective_plan(model, sharders_for(cfg), pg)
        return planner.plan(model, sharders_for(cfg))
    except PlannerError as e:
        raise ValueError(f"no sharding plan satisfies the constraints {dict(cfg.constraints)}: {e}") from e


def shard_model(
    model: nn.Module, cfg: ShardingConfig, device: torch.device, pg: dist.ProcessGroup | None = None,
) -> DistributedModelParallel:
    """Fuses the embedding optimizer, plans, and wraps `model` in DistributedModelParallel.

    Requires an initialized default process group (world size 1 is fine: the
    single-process path uses the same code).
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialized (see jobs/launch.py)")
    pg = pg or dist.group.WORLD
    world = dist.get_world_size(pg)
    _fuse_embedding_optimizer(model, cfg, device)
    plan = plan_sharding(model, cfg, world, device, pg)
    return DistributedModelParallel(
        module=model, env=ShardingEnv.from_process_group(pg), device=device, plan=plan,
        sharders=sharders_for(cfg),
    )


def make_optimizer(dmp: DistributedModelParallel, dense_lr: float, weight_decay: float = 0.0,
                   sharding: ShardingConfig | None = None) -> CombinedOptimizer:
    """Fused embedding optimizer + Adam(W) for the dense parameters, stepped together.

    Tables `shard_model` left unfused (sparse_adam) get a SparseAdam of their own at `sharding`'s rate and
    betas (no weight decay), after the AdamW, so the AdamW stays the first wrapped optimizer.
    """
    named = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    table_ids = {id(p) for p in _embedding_params(dmp)}
    tables = {k: p for k, p in named.items() if id(p) in table_ids}
    if tables and (sharding is None or sharding.embedding_optimizer != UNFUSED_EMBEDDING_OPTIMIZER):
        raise ValueError(f"tables {sorted(tables)} are not fused: make_optimizer needs the sparse_adam "
                         "ShardingConfig they were sharded with")
    dense = {k: p for k, p in named.items() if k not in tables}
    opts: list[KeyedOptimizer] = [dmp.fused_optimizer]
    if dense:
        opts.append(KeyedOptimizerWrapper(
            dense, lambda ps: torch.optim.AdamW(ps, lr=dense_lr, weight_decay=weight_decay)
        ))
    if tables:
        cfg = sharding
        opts.append(SparseTableOptimizer(tables, lambda ps: torch.optim.SparseAdam(
            ps, lr=cfg.embedding_lr, betas=tuple(cfg.embedding_betas), eps=cfg.embedding_eps)))
    return CombinedOptimizer(opts)


class SparseTableOptimizer(KeyedOptimizerWrapper):
    """The tables' SparseAdam: its lazily created state is initialized from sparse (empty) gradients, which is
    what SparseAdam accepts, so checkpoints load in place like the dense optimizer's."""

    def init_state(self, sparse_grad_parameter_names: set[str] | None = None) -> None:
        super().init_state(set(self.params) if sparse_grad_parameter_names is None else sparse_grad_parameter_names)


def dense_optimizer(opt: CombinedOptimizer) -> KeyedOptimizerWrapper | None:
    """The AdamW part of `make_optimizer`'s optimizer (the one a dense learning-rate schedule drives)."""
    return next((o for _, o in opt.optimizers
                 if isinstance(o, KeyedOptimizerWrapper) and not isinstance(o, SparseTableOptimizer)), None)


def table_optimizer(opt: CombinedOptimizer) -> SparseTableOptimizer | None:
    """The tables' SparseAdam under sharding.embedding_optimizer=sparse_adam (None with fused tables)."""
    return next((o for _, o in opt.optimizers if isinstance(o, SparseTableOptimizer)), None)


def describe_plan(dmp: DistributedModelParallel) -> dict[str, str]:
    """table name -> sharding type, for logs and manifests."""
    out: dict[str, str] = {}
    for module_plan in dmp.plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (ps.ranks or [])})
            out[table] = f"{ps.sharding_type} on ranks {ranks}"
    for table in embedding_tables(dmp):  # not in the plan: sparse_adam's unsharded replicas
        out.setdefault(table, f"replicated on all {dist.get_world_size()} ranks (sparse_adam: unsharded)")
    return out
