"""A serving bundle written by the real exporters over randomly initialised real models.

For what exercises the plumbing, not the quality: the serving tests, the load and consumer benchmarks
(their cost per request or event does not depend on trained weights). The models are the ones the
pipeline trains (`retrieval.model.TwoTowerRetriever`, `ranking.model.RankerModel`, from the same config
files), exported by `retrieval.export` / `ranking.export` and packed by `serving.models.write_bundle`,
so the server loads and verifies them exactly as it does a trained version.

    write_random_bundle(catalog, out, "v1", seed=0)                          # ML-100K configs
    write_random_bundle(catalog, out, "v1", 0, RandomBundleSpec.ml1m_sdim())  # the serving bench's ML-1M shape
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RandomBundleSpec:
    """Which configs (layered, relative to the repo) and overrides build the two models."""

    retriever_config: str = "retrieval/configs/ml-100k.yaml"
    retriever_overrides: tuple[str, ...] = ()
    ranker_configs: tuple[str, ...] = ("ranking/configs/ml-100k.yaml", "ranking/configs/ablations/full.yaml")
    ranker_overrides: tuple[str, ...] = ()
    second_stage: bool = False  # the ranker is two-stage.yaml's residual on the retriever logit
    randomize_heads_std: float = 0.0  # >0: the (zero-initialised) residual heads drawn N(0, std) so they reorder
    retriever_vectors: bool = False  # the second stage also reads the retriever's u_d * v_d terms
    retriever_similarity: int = 0  # and the retriever-space similarities to the last K behaviors (0: not)
    item_item_history: int = 10  # with an item-item model: the behaviors its features read

    @classmethod
    def ml1m_sdim(cls) -> "RandomBundleSpec":
        """The serving benchmark's default bundle's architecture (ML-1M configs, two-stage ranker, SDIM)."""
        return cls("retrieval/configs/ml-1m.yaml", ("index.kind=flat",),
                   ("ranking/configs/ml-1m.yaml", "ranking/configs/two-stage.yaml"), ("model.sequence.long=sdim",),
                   second_stage=True)


def write_random_bundle(catalog, out: Path, version: str, seed: int, spec: RandomBundleSpec | None = None,
                        context=None, item_item=None) -> tuple[Path, str]:
    """Exports both models under `out` and the bundle at `out/version`; returns (bundle dir, manifest sha256).

    `catalog`: the served `serving.catalog.Catalog`; `context` (features.list_context.ContextCounts): the
    two-stage ranker also reads the list's context features and exports the counts; `item_item`
    (features.item_item.ItemItem): it also reads the item-item features (over `spec.item_item_history` behaviors)
    and exports the model. Different seeds give
    different weights, so different answers."""
    import torch

    from features.batch import ITEM_ID, make_kjt
    from features.config import load_config
    from features.list_context import second_stage_dense_dim
    from features.transforms import DenseLayout, StatsConfig
    from jobs.train_ranker import load_ranker_config
    from ranking.export import export_ranker
    from ranking.model import RankerModel
    from retrieval.catalog import Catalog as RetrievalCatalog
    from retrieval.config import RetrieverConfig
    from retrieval.export import export_retriever
    from retrieval.model import TwoTowerRetriever
    from retrieval.task import item_keys
    from serving.models import write_bundle

    spec = spec or RandomBundleSpec()
    rcfg = load_config(RetrieverConfig, REPO / spec.retriever_config, list(spec.retriever_overrides))
    feats = catalog.candidate_features(catalog.item_ids)
    kjt = make_kjt({ITEM_ID: (catalog.item_ids, np.ones(len(catalog), np.int64)),
                    **{k: feats[k] for k in item_keys(rcfg.model) if k != ITEM_ID}})
    rcat = RetrievalCatalog(catalog.item_ids.copy(), kjt, torch.zeros(len(catalog)))
    torch.manual_seed(seed)
    export_retriever(TwoTowerRetriever(rcfg.model, "cpu"), rcfg, rcat, out / f"retriever-{version}")

    layout = DenseLayout(StatsConfig(), 0.55, ("year",))
    kcfg = load_ranker_config([REPO / c for c in spec.ranker_configs], list(spec.ranker_overrides))
    if spec.second_stage:
        products = rcfg.model.dim if spec.retriever_vectors else 0
        mc = dataclasses.replace(kcfg.model, user_dense_dim=0,
                                 candidate_dense_dim=second_stage_dense_dim(context is not None, products,
                                                                            spec.retriever_similarity,
                                                                            item_item is not None),
                                 retrieval_products=products, retrieval_similarity=spec.retriever_similarity)
    else:
        mc = dataclasses.replace(kcfg.model, user_dense_dim=len(layout.user_names()),
                                 candidate_dense_dim=len(layout.candidate_names()), retrieval_products=0,
                                 retrieval_similarity=0)
    torch.manual_seed(seed)
    ranker = RankerModel(mc, embedding_device="cpu")
    if spec.randomize_heads_std > 0:
        torch.nn.init.normal_(ranker.heads.weight, std=spec.randomize_heads_std)
    export_ranker(ranker, out / f"ranker-{version}", context=context, item_item=item_item,
                  item_item_history=spec.item_item_history if item_item is not None else 0)
    path = out / version
    checksum = write_bundle(path, version, ("retrieval.export", out / f"retriever-{version}"),
                            ("ranking.export", out / f"ranker-{version}"), layout)
    return path, checksum
