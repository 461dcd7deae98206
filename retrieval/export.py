"""Export for serving: towers, item embedding matrix, faiss index, manifest with checksums.

An export directory::

    config.json           model config (the module is rebuilt from it + this code), index config,
                          the batch keys the towers read, hash spec and schema versions
    model.pt              both towers' state_dict (torch.save; loaded with weights_only=True). The
                          item-id table keeps only the rows the catalog uses (CompactEmbeddingCollection)
    item_ids.npy          (N,) int64 catalog ids; row i of the matrix and of the index is item_ids[i]
    item_embeddings.npy   (N, D) float32 L2-normalized item vectors
    index.faiss           the ANN index (HNSW or IVF, inner product); exact search is rebuilt from the matrix
    manifest.json         format, loader, sha256 of every file above, ANN recall@k vs exact, metrics

Sharded tables are gathered by DCP-loading the training checkpoint into an
unsharded model at world size 1 (`load_unsharded`), whatever world size wrote it;
`export_from_checkpoint` does that and exports, measuring the index on the test users.

    export_from_checkpoint("runs/ml1m/checkpoints/best", cfg, open_data(features, cfg), "runs/ml1m/export")
    # or step by step:
    model = load_unsharded("runs/ml1m/checkpoints/best", cfg)
    export_retriever(model, cfg, catalog, "runs/ml1m/export", queries=user_vectors)
    r = load_retriever("runs/ml1m/export")            # -> RetrieverInference (retrieval/inference.py)
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import faiss
import numpy as np
import torch

from features.config import from_mapping, to_dict
from features.datasets.common import sha256_file
from features.hashing import HASH_SPEC_VERSION
from features.layout import CATEGORY_FEATURE
from features.schema import SCHEMA_VERSION
from features.train.checkpoint import load_checkpoint
from retrieval.catalog import Catalog
from retrieval.config import CATEGORY_TABLE, ITEM_ID_TABLE, IndexConfig, ModelConfig, RetrieverConfig
from retrieval.evaluate import item_matrix, last_queries
from retrieval.index import build_index, configure_search, exact_index, recall_vs_exact, search
from retrieval.inference import HISTORY_KEYS, CompactEmbeddingCollection, RetrieverInference
from retrieval.model import TwoTowerRetriever
from retrieval.task import RetrievalTask, item_keys
from kernels import bucketize

if TYPE_CHECKING:
    from retrieval.train import RetrievalData

EXPORT_FORMAT = "cascade.retriever/1"
LOADER = "retrieval.export"
MANIFEST = "manifest.json"  # format, loader, every file's sha256, ANN recall; written last
FILES = ("config.json", "model.pt", "item_ids.npy", "item_embeddings.npy", "index.faiss")


class ExportError(ValueError):
    """An export directory is incomplete, corrupted or of another format; names the file."""


def load_unsharded(checkpoint: Path, cfg: RetrieverConfig) -> TwoTowerRetriever:
    """The model of a DCP training checkpoint (any world size) as one unsharded CPU module."""
    task = RetrievalTask(TwoTowerRetriever(cfg.model, "cpu"), cfg.loss)
    load_checkpoint(Path(checkpoint), task, None, restore_rng=False)
    return task.model.eval()


def export_from_checkpoint(checkpoint: Path | str, cfg: RetrieverConfig, data: RetrievalData, out_dir: Path | str,
                           extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Gathers a (sharded) DCP training checkpoint into an unsharded model and exports it to `out_dir` (replacing
    an earlier export there); returns the manifest.

    data: the run's data (`retrieval.data.open_data`): its catalog is exported, and its test users' query
    vectors measure the ANN index's recall against exact search. Runs in one process (no collectives).
    """
    model = load_unsharded(Path(checkpoint), cfg)
    queries = np.concatenate([last_queries(model, eb.batch).numpy() for eb in data.eval_batches("test", 0, 1)])
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    return export_retriever(model, cfg, data.catalog, out, queries=queries, extra=extra)


def _feature_tables(model: TwoTowerRetriever) -> dict[str, str]:
    m = {f: ITEM_ID_TABLE for f in model.id_features}
    if model.use_category:
        m[CATEGORY_FEATURE] = CATEGORY_TABLE
    return m


def _compact_state(model: TwoTowerRetriever, catalog: Catalog) -> dict[str, torch.Tensor]:
    """model.state_dict() with the item EC replaced by its used rows."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("item_ec.")}
    weights = {name: emb.weight.detach() for name, emb in model.item_ec.embeddings.items()}
    ids = catalog.ids
    rows = torch.unique(torch.cat([bucketize(ids, f, model.cfg.item.id_buckets) for f in model.id_features]))
    sd[f"item_ec.rows.{ITEM_ID_TABLE}"] = rows
    sd[f"item_ec.weights.{ITEM_ID_TABLE}"] = weights[ITEM_ID_TABLE][rows].clone()
    if model.use_category:
        w = weights[CATEGORY_TABLE]
        sd[f"item_ec.rows.{CATEGORY_TABLE}"] = torch.arange(w.shape[0])
        sd[f"item_ec.weights.{CATEGORY_TABLE}"] = w.clone()
    return sd


def export_retriever(
    model: TwoTowerRetriever, cfg: RetrieverConfig, catalog: Catalog, out: Path,
    queries: np.ndarray | None = None, extra: Mapping[str, Any] | None = None,
    logit_scale: float | None = None,
) -> dict[str, Any]:
    """Writes the export directory (module docstring); returns its manifest.

    queries: (Q, D) user vectors to measure the ANN index's recall@k against exact
    search on (e.g. the test users' vectors); None skips the measurement.
    logit_scale: the softmax logit per unit of score the model trained with (1 / temperature);
    None takes 1 / loss.temperature when the temperature was fixed, else records none. The second
    stage reads the retriever's logits (score x logit_scale) as its base.
    """
    if logit_scale is None and not cfg.loss.learn_temperature:
        logit_scale = 1.0 / cfg.loss.temperature
    out = Path(out)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds an export; exports are immutable, pick a new directory")
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    keys = item_keys(cfg.model)
    vecs = item_matrix(model, catalog, keys).numpy().astype(np.float32)  # (N, D)
    icfg = cfg.index.for_catalog(vecs.shape[0])  # the catalog-size tier, written resolved for the loader
    t0 = time.perf_counter()
    index = build_index(vecs, icfg)
    build_s = time.perf_counter() - t0
    ann: dict[str, Any] = {"kind": icfg.kind, "items": int(vecs.shape[0]), "build_seconds": round(build_s, 3)}
    if queries is not None and len(queries):
        k = cfg.index.recall_k
        ann_rows, _ = search(index, queries, k)
        ex_rows, _ = search(exact_index(vecs), queries, k)
        ann[f"recall@{k}_vs_exact"] = recall_vs_exact(ann_rows, ex_rows)
        ann["queries"] = int(len(queries))

    config = {
        "format": EXPORT_FORMAT,
        "model": to_dict(cfg.model),
        "index": to_dict(icfg),
        "history_keys": list(HISTORY_KEYS),
        "user_keys": ["user_id", *cfg.model.user.user_features],
        "item_keys": keys,
        "feature_tables": _feature_tables(model),
        "logit_scale": logit_scale,
        "hash_spec_version": HASH_SPEC_VERSION,
        "schema_version": SCHEMA_VERSION,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.save(_compact_state(model, catalog), out / "model.pt")
    np.save(out / "item_ids.npy", catalog.item_ids.astype(np.int64), allow_pickle=False)
    np.save(out / "item_embeddings.npy", vecs, allow_pickle=False)
    faiss.write_index(index, str(out / "index.faiss"))
    manifest = {
        "format": EXPORT_FORMAT, "loader": LOADER,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: sha256_file(out / name) for name in FILES},
        "ann": ann, **dict(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_retriever(path: Path | str) -> RetrieverInference:
    """An export directory -> RetrieverInference; verifies every checksum first (restricted loaders only)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ExportError(f"{mpath} does not exist: not a retriever export")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{mpath} is not JSON: {e}") from None
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{mpath}: format {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}")
    for name in FILES:
        want = manifest.get("files", {}).get(name)
        f = path / name
        if want is None or not f.is_file():
            raise ExportError(f"{path}: {name} is missing from the export or its manifest")
        if sha256_file(f) != want:
            raise ExportError(f"{f}: sha256 does not match the manifest (corrupted or modified)")
    config = json.loads((path / "config.json").read_text())
    mcfg = from_mapping(ModelConfig, config["model"], "model")
    icfg = from_mapping(IndexConfig, config["index"], "index")
    state = torch.load(path / "model.pt", weights_only=True, map_location="cpu")
    model = TwoTowerRetriever(mcfg, "meta")
    tables = {}
    for key in [k for k in state if k.startswith("item_ec.rows.")]:
        name = key[len("item_ec.rows."):]
        tables[name] = (state[key], state[f"item_ec.weights.{name}"])
    model.item_ec = CompactEmbeddingCollection(tables, config["feature_tables"])
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    item_ids = np.load(path / "item_ids.npy", allow_pickle=False)
    vecs = np.load(path / "item_embeddings.npy", allow_pickle=False)
    if vecs.shape != (len(item_ids), mcfg.dim):
        raise ExportError(f"{path}: item_embeddings.npy has shape {vecs.shape}, expected ({len(item_ids)}, {mcfg.dim})")
    index = configure_search(faiss.read_index(str(path / "index.faiss")), icfg)
    if index.ntotal != len(item_ids):
        raise ExportError(f"{path}: index.faiss holds {index.ntotal} items, item_ids.npy {len(item_ids)}")
    return RetrieverInference(model, item_ids, vecs, index, exact_index(vecs), {**config, "manifest": manifest})
