"""The pipeline's evaluation gate: score exported models on one held-out split, compare, decide.

Both the candidate and the published bundle are evaluated here, by the same
code, on the candidate's features (its test split): the ranker's AUC / GAUC /
logloss over every test sample, the retriever's HR / NDCG / recall over every
test user (full-catalog ranking, history masked, the training loop's metric).
Training-time numbers are not compared: they may come from other data.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np


def evaluate_ranker_export(export: Path, features: Path, split: str = "test") -> dict[str, float]:
    """Main-task AUC / GAUC / logloss of an exported ranker on a features directory's split."""
    import torch

    from ranking.config import DataConfig
    from ranking.data import open_ranking_data
    from ranking.export import load_ranker
    from ranking.task import ranking_metrics

    ranker = load_ranker(export)
    data = open_ranking_data(DataConfig(features_dir=str(features)), ranker.cfg)
    probs, labels, users = [], [], []
    with torch.inference_mode():
        for batch in data.eval_batches(split, 0, 1):
            probs.append(ranker.forward(batch).float().numpy())
            labels.append(batch.labels[:, 0].numpy())
            users.append(batch.user_ids()[batch.candidate_user_index()].numpy())
    if not probs:
        raise ValueError(f"{features}: the {split} split has no ranking samples")
    m = ranking_metrics(np.concatenate(probs), np.concatenate(labels), np.concatenate(users))
    return {**{k: float(v) for k, v in m.items()}, "n": int(sum(len(p) for p in probs))}


def evaluate_retriever_export(export: Path, features: Path, split: str = "test") -> dict[str, float]:
    """HR / NDCG / recall@K of an exported retriever over a features directory's split (full catalog)."""
    from features.config import from_mapping
    from retrieval.config import EvalConfig, RetrieverConfig
    from retrieval.data import open_data
    from retrieval.evaluate import evaluate
    from retrieval.export import load_retriever
    from retrieval.task import item_keys

    r = load_retriever(export)
    config = json.loads((Path(export) / "config.json").read_text())
    cfg = dataclasses.replace(RetrieverConfig(), model=r.model.cfg,
                              eval=from_mapping(EvalConfig, config["eval"], "eval") if "eval" in config else EvalConfig())
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_users=0))  # every user
    data = open_data(features, cfg)
    m = evaluate(r.model, data.catalog, item_keys(cfg.model), data.eval_batches(split, 0, 1), cfg.eval,
                 desc=f"eval {Path(export).name}", progress=False)
    return {k: float(v) for k, v in m.items()}


def evaluate_two_stage(retriever_export: Path, ranker_export: Path, features: Path, split: str = "valid",
                       top_n: int = 100) -> dict[str, dict[str, float]]:
    """The cascade on a held-out split: the retriever alone and retriever -> second-stage ranker, on the same
    users and the same lists (the retriever's top `top_n` unseen items, every seen item masked).

    -> {"retriever": {hr@10, ndcg@10, ...}, "two_stage": {...}}. A target the retriever did not retrieve is a
    miss for both. `split` "valid" (what the gate decides on) or "test" (reported once)."""
    from features.reader import FeatureStore
    from features.train.metrics import topk_metrics
    from ranking.export import load_ranker
    from ranking.lists import ListRankingData
    from retrieval.export import load_retriever
    from retrieval.lists import retrieve_lists

    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    ranker = load_ranker(ranker_export)
    if not ranker.second_stage:
        raise ValueError(f"{ranker_export} is not a second-stage ranker (model.residual_column < 0)")
    store = FeatureStore(features)
    ok = np.flatnonzero(store.retrieval_train_len >= 1)
    hist = store.retrieval_train_len[ok] + (1 if split == "test" else 0)
    lists = retrieve_lists(load_retriever(retriever_export), store, store.timeline_users.ids[ok], hist, top_n)
    data = ListRankingData.for_ranker(store, lists, ranker)
    retr = np.where(lists.hit(), (lists.items == lists.target[:, None]).argmax(1), np.inf)
    ks = (10, 50)
    return {"retriever": topk_metrics(retr, ks=ks, recall_ks=(top_n,)),
            "two_stage": topk_metrics(data.ranks(ranker, "valid"), ks=ks, recall_ks=(top_n,))}


def evaluate_bundle_parts(retriever_export: Path, ranker_export: Path, features: Path) -> dict[str, dict[str, float]]:
    """The retriever on the test split; a CTR ranker on its test samples, or a second-stage ranker as the
    cascade on the validation lists (``two_stage``, beside ``retriever_valid``: the same users and lists)."""
    from ranking.export import read_export_config

    out = {"retriever": evaluate_retriever_export(retriever_export, features)}
    if int(read_export_config(ranker_export)["model"].get("residual_column", -1)) >= 0:
        cascade = evaluate_two_stage(retriever_export, ranker_export, features, "valid")
        out["two_stage"], out["retriever_valid"] = cascade["two_stage"], cascade["retriever"]
    else:
        out["ranker"] = evaluate_ranker_export(ranker_export, features)
    return out


def two_stage_checks(cfg: Any, candidate: dict[str, dict[str, float]]) -> tuple[bool, list[dict], list[str]]:
    """A second-stage ranker must beat its own retriever on the validation lists: two-stage NDCG@10 above
    `cfg.min_two_stage_lift` x the retriever's, HR@10 at least that much."""
    if "two_stage" not in candidate:
        return True, [], []
    ts, rv = candidate["two_stage"], candidate["retriever_valid"]
    checks, reasons, passed = [], [], True
    for metric, strict in (("ndcg@10", True), ("hr@10", False)):
        bar = cfg.min_two_stage_lift * rv[metric]
        ok = ts[metric] > bar if strict else ts[metric] >= bar
        passed &= ok
        checks.append({"model": "two_stage", "metric": metric, "candidate": ts[metric], "retriever_alone": rv[metric],
                       "minimum_lift": cfg.min_two_stage_lift, "passed": ok})
        if not ok:
            reasons.append(f"the ranker does not beat its own retriever on the validation lists: two-stage {metric} "
                           f"{ts[metric]:.4f} vs retriever alone {rv[metric]:.4f} (needs {'>' if strict else '>='} "
                           f"{cfg.min_two_stage_lift} x)")
    return passed, checks, reasons


def gate_decision(cfg: Any, candidate: dict[str, dict[str, float]], published: dict[str, dict[str, float]] | None,
                  published_version: str | None) -> dict[str, Any]:
    """-> {"passed": bool, "reasons": [...], "checks": [...]} for `jobs.pipeline.GateConfig` `cfg`."""
    lift_ok, checks, reasons = two_stage_checks(cfg, candidate)
    if published is None:
        if "ranker" in candidate:
            auc = candidate["ranker"]["auc"]
            ok = auc >= cfg.min_auc
            checks.append({"model": "ranker", "metric": "auc", "candidate": auc, "minimum": cfg.min_auc, "passed": ok})
            reasons.append(f"nothing published yet; ranker auc {auc:.4f} {'>=' if ok else '<'} gate.min_auc "
                           f"{cfg.min_auc}")
        else:
            ok = True
            if lift_ok:
                reasons.append("nothing published yet; the ranker beats its own retriever on the validation lists")
        return {"passed": ok and lift_ok, "reasons": reasons, "checks": checks}
    passed = lift_ok
    for rule in cfg.rules:
        if rule.model not in candidate or rule.model not in published:
            continue  # e.g. CTR ranker rules for a second-stage candidate: its two_stage checks decide
        try:
            c, p = candidate[rule.model][rule.metric], published[rule.model][rule.metric]
        except KeyError:
            have = sorted(candidate.get(rule.model, {}))
            raise ValueError(f"gate rule {rule.model}.{rule.metric}: the evaluation has no such metric "
                             f"(it has {have})") from None
        regression = (c - p) if rule.lower_is_better else (p - c)
        ok = regression <= rule.tolerance
        passed &= ok
        checks.append({"model": rule.model, "metric": rule.metric, "candidate": c, "published": p,
                       "regression": regression, "tolerance": rule.tolerance, "passed": ok})
        word = "lower" if rule.lower_is_better else "higher"
        if not ok:
            reasons.append(f"{rule.model} {rule.metric} {c:.4f} vs published {published_version} {p:.4f}: "
                           f"regresses by {regression:.4f} > tolerance {rule.tolerance} ({word} is better)")
    compared = [x for x in checks if "published" in x]  # the rules' checks (the lift checks name no published)
    if passed and compared:
        reasons.append(f"no gated metric regresses beyond its tolerance vs {published_version} "
                       + ", ".join(f"{x['model']} {x['metric']} {x['candidate']:.4f} vs {x['published']:.4f}"
                                   for x in compared))
    return {"passed": passed, "reasons": reasons, "checks": checks}
