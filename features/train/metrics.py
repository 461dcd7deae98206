"""Offline metrics shared by the retriever, the ranker, the pipeline gate and the benchmarks.

CTR: AUC (Mann-Whitney with tied ranks averaged), GAUC (per-user AUC weighted
by the user's number of samples, users with one class skipped — the DIN
paper's definition), logloss. Retrieval: HR@K / NDCG@K / Recall@K from the
0-based rank of the held-out item among all items (leave-one-out, full ranking).
"""
from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1..end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel() > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Per-group AUC weighted by group size, over groups that have both classes."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = (np.asarray(labels).ravel() > 0.5)
    g = np.asarray(groups).ravel()
    order = np.argsort(g, kind="mergesort")
    s, y, g = s[order], y[order], g[order]
    bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
    num = 0.0
    den = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        yy = y[a:b]
        p = int(yy.sum())
        if p == 0 or p == b - a:
            continue
        num += auc(s[a:b], yy) * (b - a)
        den += b - a
    return num / den if den else float("nan")


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64).ravel()
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def ctr_metrics(probs: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    return {"auc": auc(probs, labels), "gauc": gauc(probs, labels, users), "logloss": logloss(probs, labels),
            "n": int(len(labels)), "positive_rate": float(np.mean(np.asarray(labels) > 0.5))}


def topk_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (10, 50, 200), recall_ks: tuple[int, ...] = (100, 500)) -> dict[str, float]:
    """ranks: 0-based rank of each user's held-out item among all candidate items."""
    r = np.asarray(ranks, dtype=np.float64).ravel()
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean())
    for k in recall_ks:
        out[f"recall@{k}"] = float((r < k).mean())  # one relevant item per user: recall == hit rate
    out["n"] = int(len(r))
    return out
