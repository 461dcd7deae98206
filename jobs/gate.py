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


def evaluate_bundle_parts(retriever_export: Path, ranker_export: Path, features: Path) -> dict[str, dict[str, float]]:
    return {"retriever": evaluate_retriever_export(retriever_export, features),
            "ranker": evaluate_ranker_export(ranker_export, features)}


def gate_decision(cfg: Any, candidate: dict[str, dict[str, float]], published: dict[str, dict[str, float]] | None,
                  published_version: str | None) -> dict[str, Any]:
    """-> {"passed": bool, "reasons": [...], "checks": [...]} for `jobs.pipeline.GateConfig` `cfg`."""
    checks, reasons = [], []
    if published is None:
        auc = candidate["ranker"]["auc"]
        ok = auc >= cfg.min_auc
        checks.append({"model": "ranker", "metric": "auc", "candidate": auc, "minimum": cfg.min_auc, "passed": ok})
        reasons.append(f"nothing published yet; ranker auc {auc:.4f} {'>=' if ok else '<'} gate.min_auc {cfg.min_auc}")
        return {"passed": ok, "reasons": reasons, "checks": checks}
    passed = True
    for rule in cfg.rules:
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
    if passed:
        reasons.append(f"no gated metric regresses beyond its tolerance vs {published_version} "
                       + ", ".join(f"{x['model']} {x['metric']} {x['candidate']:.4f} vs {x['published']:.4f}"
                                   for x in checks))
    return {"passed": passed, "reasons": reasons, "checks": checks}
