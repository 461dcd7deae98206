"""The bundle boundary with the project's real models: `retrieval.export` + `ranking.export` exports
(randomly initialized: this checks the serving contract, not model quality) load, pass the smoke
inference and serve through the runtime against a real Redis, SDIM signatures included."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_bundle(catalog, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from features.batch import ITEM_CATEGORY, ITEM_ID, make_kjt
    from features.transforms import DenseLayout, StatsConfig
    from ranking.config import ModelConfig as RankerModelConfig
    from ranking.export import export_ranker
    from ranking.model import RankerModel
    from retrieval.catalog import Catalog as RetrievalCatalog
    from retrieval.config import IndexConfig, ItemTowerConfig, ModelConfig, RetrieverConfig, UserTowerConfig
    from retrieval.export import export_retriever
    from retrieval.model import TwoTowerRetriever
    from serving.models import write_bundle
    from serving.standin import features_block

    out = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    cv, cl = catalog.jagged(np.arange(len(catalog)), "category")
    rcat = RetrievalCatalog(catalog.item_ids.copy(),
                            make_kjt({ITEM_ID: (catalog.item_ids, np.ones(len(catalog), np.int64)), ITEM_CATEGORY: (cv, cl)}),
                            torch.zeros(len(catalog)))
    rcfg = RetrieverConfig(model=ModelConfig(dim=16, item=ItemTowerConfig(id_buckets=1 << 12),
                                             user=UserTowerConfig(max_len=20, num_heads=2, num_layers=1)),
                           index=IndexConfig(kind="flat"))
    export_retriever(TwoTowerRetriever(rcfg.model, "cpu"), rcfg, rcat, out / "retriever")
    layout = DenseLayout(StatsConfig(), 0.55, ("year",))
    mc = RankerModelConfig()
    mc = dataclasses.replace(mc, user_dense_dim=len(layout.user_names()), candidate_dense_dim=len(layout.candidate_names()),
                             sequence=dataclasses.replace(mc.sequence, long="sdim", long_len=200))
    export_ranker(RankerModel(mc, embedding_device="cpu"), out / "ranker")
    path = out / "bundle" / "real-v1"
    checksum = write_bundle(path, "real-v1", ("retrieval.export", out / "retriever"), ("ranking.export", out / "ranker"),
                            features_block(layout))
    return path, checksum


def test_real_retriever_and_sdim_ranker_serve_through_the_runtime(real_bundle, catalog, ml100k_dataset, redis_server):
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import Availability, CatalogRef, Popularity, RankQuery, Runtime
    from serving.bootstrap import bootstrap_dataset
    from features.config import load_config
    from serving.state.redis_store import RedisOnlineStore

    cfg = load_config(ServingConfig, None, [f"redis.url={redis_server.address}"])
    metrics, holder, cat = ServingMetrics(), ModelHolder(), CatalogRef(catalog)
    bundle = ModelManager(holder, cat, cfg.state, cfg.models, metrics).load(real_bundle[0], "real-v1", real_bundle[1])
    assert bundle.sig_spec != 0  # SdimRankerInference: behavior signatures are computed at ingest
    assert bundle.manifest["retriever"]["loader"] == "retrieval.export" and bundle.manifest["ranker"]["loader"] == "ranking.export"
    store = RedisOnlineStore(cfg.redis)
    try:
        bootstrap_dataset(store, ml100k_dataset, cfg.state, catalog, bundle=bundle)
        rec = store.read_user(1)
        assert rec.sig_spec == bundle.sig_spec and np.array_equal(rec.sigs, bundle.signatures(rec.seq.item_ids))
        rt = Runtime(cfg.limits, cfg.runtime, store, holder, cat, Popularity(*store.top_items(100)), Availability(), metrics)
        r = rt.rank(RankQuery(user_id=1, k=10, exclude_seen=True))
        assert r.model_version == "real-v1" and r.fallback_reason == "" and len(r.item_ids) == 10
        assert np.all(np.diff(r.scores) <= 0) and np.isfinite(r.scores).all()
        assert not set(r.item_ids.tolist()) & set(rec.seq.item_ids.tolist())
        assert metrics.registry.get_sample_value("cascade_sdim_signature_recomputes_total") == 0  # stored ones used
        cold = rt.rank(RankQuery(user_id=123_456_789, k=5))
        assert cold.fallback_reason == "cold_start" and len(cold.item_ids) == 5
    finally:
        store.close()
