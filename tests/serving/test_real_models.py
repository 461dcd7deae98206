"""The bundle boundary with the project's real models: `retrieval.export` + `ranking.export` exports
(randomly initialized, `model_bundles` in conftest: this checks the serving contract, not model quality)
load, pass the smoke inference and serve through the runtime, SDIM signatures included. The state is in memory
(`memory_store`: the store contract suite holds it to Redis's semantics); the server tests run them on Redis."""
from __future__ import annotations

import numpy as np


def test_real_retriever_and_sdim_ranker_serve_through_the_runtime(model_bundles, catalog, ml100k_dataset, memory_store):
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import Availability, CatalogRef, Popularity, RankQuery, Runtime
    from serving.bootstrap import bootstrap_dataset
    from features.config import load_config

    cfg = load_config(ServingConfig, None, [])
    metrics, holder, cat = ServingMetrics(), ModelHolder(), CatalogRef(catalog)
    path, checksum = model_bundles["v1"]
    bundle = ModelManager(holder, cat, cfg.state, cfg.models, metrics).load(path, "v1", checksum)
    assert bundle.sig_spec != 0  # SdimRankerInference: behavior signatures are computed at ingest
    assert bundle.manifest["retriever"]["loader"] == "retrieval.export" and bundle.manifest["ranker"]["loader"] == "ranking.export"
    bootstrap_dataset(memory_store, ml100k_dataset, cfg.state, catalog, bundle=bundle)
    rec = memory_store.read_user(1)
    assert rec.sig_spec == bundle.sig_spec and np.array_equal(rec.sigs, bundle.signatures(rec.seq.item_ids))
    rt = Runtime(cfg.limits, cfg.runtime, memory_store, holder, cat, Popularity(*memory_store.top_items(100)),
                 Availability(), metrics)
    r = rt.rank(RankQuery(user_id=1, k=10, exclude_seen=True))
    assert r.model_version == "v1" and r.fallback_reason == "" and len(r.item_ids) == 10
    assert np.all(np.diff(r.scores) <= 0) and np.isfinite(r.scores).all()
    assert not set(r.item_ids.tolist()) & set(rec.seq.item_ids.tolist())
    assert metrics.registry.get_sample_value("cascade_sdim_signature_recomputes_total") == 0  # stored ones used
    cold = rt.rank(RankQuery(user_id=123_456_789, k=5))
    assert cold.fallback_reason == "cold_start" and len(cold.item_ids) == 5


def test_the_two_test_bundles_are_the_full_ranker_and_answer_differently(model_bundles, catalog, ml100k_dataset,
                                                                          memory_store):
    """v1 and v2 (other seeds) give other top-k lists, so a hot swap is visible in the answers; both carry the
    full ranker: DARE's decoupled tables, SDIM, a 4-expert AW-MoE."""
    import json

    from features.config import load_config
    from serving.bootstrap import bootstrap_dataset
    from serving.config import ServingConfig
    from serving.lifecycle import ModelManager
    from serving.metrics import ServingMetrics
    from serving.models import ModelHolder
    from serving.runtime import Availability, CatalogRef, Popularity, RankQuery, Runtime

    cfg = load_config(ServingConfig, None, [])
    metrics, cat = ServingMetrics(), CatalogRef(catalog)
    bootstrap_dataset(memory_store, ml100k_dataset, cfg.state, catalog)
    tops = {}
    for version, (path, checksum) in model_bundles.items():
        model = json.loads((path / "ranker" / "config.json").read_text())["model"]
        assert model["embedding"]["decoupled"] and model["sequence"]["long"] == "sdim"
        assert model["moe"]["num_experts"] > 1
        holder = ModelHolder()
        ModelManager(holder, cat, cfg.state, cfg.models, metrics).load(path, version, checksum)
        rt = Runtime(cfg.limits, cfg.runtime, memory_store, holder, cat, Popularity(*memory_store.top_items(100)),
                     Availability(), metrics)
        tops[version] = rt.rank(RankQuery(user_id=1, k=10, exclude_seen=True)).item_ids.tolist()
    assert tops["v1"] != tops["v2"]
