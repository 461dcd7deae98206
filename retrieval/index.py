"""ANN index over the item embedding matrix (faiss, inner product = cosine on L2-normalized vectors).

`build_index` makes the configured index (HNSW, IVF-Flat or IVF-PQ; "flat" is
exact; "auto" picks per catalog size from `IndexConfig.tiers`);
`exact_index` is the brute-force reference (`IndexFlatIP`) the ANN index is
measured against: `recall_vs_exact` = mean over queries of
|ANN top-k  ∩  exact top-k| / k.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import faiss
import numpy as np

from retrieval.config import IndexConfig


def _as_f32(x: np.ndarray, what: str) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, D), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or inf")
    return a


def exact_index(vectors: np.ndarray) -> faiss.Index:
    v = _as_f32(vectors, "item vectors")
    index = faiss.IndexFlatIP(v.shape[1])
    index.add(v)
    return index


def build_index(vectors: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """The configured ANN index over `vectors` (N, D); row i of the index is item i (kind "auto": the
    catalog-size tier of `cfg.for_catalog(N)`)."""
    v = _as_f32(vectors, "item vectors")
    n, d = v.shape
    cfg = cfg.for_catalog(n)
    if cfg.kind == "flat":
        return exact_index(v)
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.add(v)
        index.hnsw.efSearch = cfg.hnsw_ef_search
        return index
    if cfg.kind in ("ivf", "ivf_pq"):
        nlist = cfg.ivf_nlist or max(1, int(4 * math.sqrt(n)))
        if n < nlist:
            raise ValueError(f"index: ivf_nlist={nlist} needs at least as many items, have {n}")
        if cfg.kind == "ivf_pq" and d % cfg.pq_m:
            raise ValueError(f"index: pq_m={cfg.pq_m} must divide the dimension {d}")
        quantizer = faiss.IndexFlatIP(d)
        if cfg.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = 64  # k-means on at most 64 x nlist vectors: bounded build time
        index.train(v)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
        if cfg.kind == "ivf_pq" and cfg.refine_factor > 0:
            index = faiss.IndexRefineFlat(index)  # adds go to both: PQ codes to search, exact vectors to re-rank
            index.k_factor = float(cfg.refine_factor)
        index.add(v)
        return index
    raise ValueError(f"index.kind must be auto, flat, hnsw, ivf or ivf_pq, got {cfg.kind!r}")


def configure_search(index: faiss.Index, cfg: IndexConfig) -> faiss.Index:
    """Re-applies the search-time parameters (after `faiss.read_index`)."""
    cfg = cfg.for_catalog(index.ntotal)
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = float(max(cfg.refine_factor, 1))
        configure_search(faiss.downcast_index(index.base_index), cfg)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(cfg.ivf_nprobe, index.nlist)
    return index


def choose_index(points: Sequence[Mapping[str, Any]], min_recall: float, max_ms: float) -> Mapping[str, Any] | None:
    """The fastest of `points` (each with "recall" and "ms" per query, e.g. ann_bench's sweep) that has
    recall >= min_recall and ms <= max_ms; None when none does. Ties go to the higher recall."""
    ok = [p for p in points if p["recall"] >= min_recall and p["ms"] <= max_ms]
    return min(ok, key=lambda p: (p["ms"], -p["recall"])) if ok else None


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) -> (rows (B, k) int64, -1 where fewer than k; scores (B, k) float32), best first."""
    q = _as_f32(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index {index.d}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    scores, rows = index.search(q, min(k, index.ntotal))
    if rows.shape[1] < k:  # fewer items than k: pad like faiss does for missing results
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return rows.astype(np.int64), scores


def recall_vs_exact(ann_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |ANN top-k ∩ exact top-k| / |exact top-k| (missing results = -1 ignored)."""
    if ann_rows.shape[0] != exact_rows.shape[0]:
        raise ValueError(f"recall: {ann_rows.shape[0]} ANN result rows vs {exact_rows.shape[0]} exact")
    hits = 0
    total = 0
    for a, e in zip(ann_rows, exact_rows):
        e = e[e >= 0]
        hits += np.intersect1d(a[a >= 0], e, assume_unique=True).size
        total += e.size
    return hits / max(total, 1)
