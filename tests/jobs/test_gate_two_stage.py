"""The gate's cascade evaluation on real exports and real ML-100K features: a second-stage ranker that only
reproduces its retriever (zero-initialised correction) is measured equal to it and refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.integration


def test_the_gate_refuses_a_ranker_that_does_not_beat_its_retriever(retrieval_features, tmp_path):
    from features.candidate_lists import LIST_FEATURE_NAMES
    from features.config import load_config
    from features.reader import FeatureStore
    from jobs.gate import evaluate_bundle_parts, gate_decision
    from jobs.pipeline import GateConfig
    from jobs.train_ranker import load_ranker_config
    from ranking.export import export_ranker
    from ranking.model import RankerModel
    from retrieval.config import RetrieverConfig
    from retrieval.data import build_catalog
    from retrieval.export import export_retriever
    from retrieval.model import TwoTowerRetriever
    from tests.serving.conftest import REPO, RANKER_SMALL, RETRIEVER_SMALL

    torch.manual_seed(0)
    rcfg = load_config(RetrieverConfig, REPO / "retrieval/configs/ml-100k.yaml", RETRIEVER_SMALL)
    export_retriever(TwoTowerRetriever(rcfg.model, "cpu"), rcfg, build_catalog(FeatureStore(retrieval_features)),
                     tmp_path / "retriever")
    kcfg = load_ranker_config([REPO / "ranking/configs/ml-100k.yaml", REPO / "ranking/configs/two-stage.yaml"],
                              RANKER_SMALL)
    mc = dataclasses.replace(kcfg.model, user_dense_dim=0, candidate_dense_dim=len(LIST_FEATURE_NAMES))
    export_ranker(RankerModel(mc, embedding_device="cpu"), tmp_path / "ranker")  # heads at zero: the retriever

    cand = evaluate_bundle_parts(tmp_path / "retriever", tmp_path / "ranker", retrieval_features)
    assert "ranker" not in cand and cand["two_stage"]["n"] == cand["retriever_valid"]["n"] > 900
    assert cand["two_stage"]["ndcg@10"] == pytest.approx(cand["retriever_valid"]["ndcg@10"])
    d = gate_decision(GateConfig(), cand, None, None)
    assert not d["passed"] and "does not beat its own retriever" in d["reasons"][0]
