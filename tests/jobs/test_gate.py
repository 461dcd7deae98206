"""The evaluation gate's decision and the pipeline's input checks (pure logic; the real run is in
test_pipeline_e2e.py)."""
from __future__ import annotations

import pytest

from jobs.pipeline import GateConfig, GateRule, PipelineConfig, Run, config_path, load_pipeline_config
from jobs.gate import gate_decision

PUBLISHED = {"ranker": {"auc": 0.80, "logloss": 0.50}, "retriever": {"ndcg@10": 0.10, "recall@100": 0.40}}


def _cand(**changes):
    out = {m: dict(v) for m, v in PUBLISHED.items()}
    for key, value in changes.items():
        model, metric = key.split("__")
        out[model][metric.replace("_at_", "@")] = value
    return out


def test_a_candidate_within_every_tolerance_passes():
    d = gate_decision(GateConfig(), _cand(ranker__auc=0.799, retriever__ndcg_at_10=0.0995), PUBLISHED, "v1")
    assert d["passed"] and all(c["passed"] for c in d["checks"])
    assert "no gated metric regresses" in d["reasons"][0]


def test_an_auc_drop_beyond_tolerance_is_refused_and_named():
    d = gate_decision(GateConfig(), _cand(ranker__auc=0.79), PUBLISHED, "v1")
    assert not d["passed"]
    assert d["reasons"] == ["ranker auc 0.7900 vs published v1 0.8000: regresses by 0.0100 > tolerance 0.002 "
                            "(higher is better)"]


def test_logloss_is_lower_is_better():
    assert gate_decision(GateConfig(), _cand(ranker__logloss=0.40), PUBLISHED, "v1")["passed"]
    d = gate_decision(GateConfig(), _cand(ranker__logloss=0.52), PUBLISHED, "v1")
    assert not d["passed"] and "ranker logloss" in d["reasons"][0] and "lower is better" in d["reasons"][0]


def test_the_first_version_needs_the_minimum_auc():
    assert gate_decision(GateConfig(min_auc=0.6), _cand(), None, None)["passed"]
    d = gate_decision(GateConfig(min_auc=0.9), _cand(), None, None)
    assert not d["passed"] and "nothing published yet" in d["reasons"][0]


def test_a_rule_on_a_metric_the_evaluation_lacks_is_a_clear_error():
    cfg = GateConfig(rules=(GateRule("ranker", "ndcg@10"),))
    with pytest.raises(ValueError, match=r"gate rule ranker.ndcg@10: the evaluation has no such metric"):
        gate_decision(cfg, _cand(), PUBLISHED, "v1")


def test_gate_rules_are_validated():
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        GateRule("ranker", "auc", -1)
    with pytest.raises(ValueError, match="'retriever', 'ranker' or 'two_stage'"):
        GateRule("ranking", "auc")


def test_config_without_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dataset is not set"):
        load_pipeline_config(None, [])
    with pytest.raises(ValueError, match="unknown key"):
        load_pipeline_config(None, ["dataset=x", "gate.min_aux=1"])


def test_relative_config_paths_resolve_from_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_path("ranking/configs/ml-100k.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="config file nope.yaml does not exist"):
        config_path("nope.yaml")


def test_a_version_name_must_be_a_plain_directory_name(tmp_path):
    with pytest.raises(ValueError, match="not a valid directory name"):
        Run(PipelineConfig(dataset="d", artifacts=str(tmp_path)), "../escape")


def test_a_finished_stage_with_other_inputs_is_refused(tmp_path):
    run = Run(PipelineConfig(dataset="d", artifacts=str(tmp_path)), "v1", say=lambda s: None)
    run._stage("features", "aaa", lambda: {"dir": "x"})
    assert run._stage("features", "aaa", lambda: pytest.fail("must be skipped"))["dir"] == "x"
    again = Run(PipelineConfig(dataset="d", artifacts=str(tmp_path)), "v1", say=lambda s: None)
    with pytest.raises(ValueError, match="already ran with other inputs"):
        again._stage("features", "bbb", lambda: {})


TWO_STAGE = {"retriever": {"ndcg@10": 0.10, "recall@100": 0.40},
             "retriever_valid": {"hr@10": 0.20, "ndcg@10": 0.10}, "two_stage": {"hr@10": 0.22, "ndcg@10": 0.11}}


def test_a_second_stage_ranker_that_beats_its_retriever_is_published_first():
    d = gate_decision(GateConfig(), TWO_STAGE, None, None)
    assert d["passed"] and {c["metric"] for c in d["checks"]} == {"hr@10", "ndcg@10"}


def test_a_second_stage_ranker_that_does_not_beat_its_retriever_is_refused_with_the_numbers():
    same = {**TWO_STAGE, "two_stage": dict(TWO_STAGE["retriever_valid"])}  # reproduces the retriever's order
    d = gate_decision(GateConfig(), same, None, None)
    assert not d["passed"]
    assert d["reasons"] == ["the ranker does not beat its own retriever on the validation lists: two-stage ndcg@10 "
                            "0.1000 vs retriever alone 0.1000 (needs > 1.0 x)"]
    published = {k: dict(v) for k, v in TWO_STAGE.items()}
    assert not gate_decision(GateConfig(), same, published, "v1")["passed"]  # also when something is published


def test_second_stage_lift_and_published_rules_both_apply():
    cfg = GateConfig(rules=(GateRule("two_stage", "ndcg@10", 0.001),), min_two_stage_lift=1.05)
    worse = {**TWO_STAGE, "two_stage": {"hr@10": 0.22, "ndcg@10": 0.106}}
    d = gate_decision(cfg, worse, TWO_STAGE, "v1")
    assert not d["passed"]
    assert any("two_stage ndcg@10 0.1060 vs published v1 0.1100" in r for r in d["reasons"])
    lift = [c for c in d["checks"] if "minimum_lift" in c]
    assert len(lift) == 2 and all(c["passed"] for c in lift)  # 0.106 > 1.05 x 0.10: the lift alone would pass


def test_a_second_stage_ranker_that_beats_its_retriever_and_the_published_cascade_passes_with_the_numbers():
    """The default rules compare the cascade with the published one; the lift checks sit beside them."""
    better = {**TWO_STAGE, "two_stage": {"hr@10": 0.23, "ndcg@10": 0.112}}
    d = gate_decision(GateConfig(), better, TWO_STAGE, "v1")
    assert d["passed"], d["reasons"]
    assert {(c["model"], c["metric"]) for c in d["checks"] if "published" in c} == {
        ("two_stage", "ndcg@10"), ("two_stage", "hr@10"), ("retriever", "ndcg@10"), ("retriever", "recall@100")}
    assert "two_stage ndcg@10 0.1120 vs 0.1100" in d["reasons"][-1]
