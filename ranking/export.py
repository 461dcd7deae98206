"""Ranker export: a directory the server loads with restricted deserialization only.

    EXPORT/config.json     {"format", "model": ModelConfig, "history": caps, "tasks", "sdim", "metadata"}
    EXPORT/weights.pt      torch.save(model.state_dict()): tensors only, loaded with weights_only=True
    EXPORT/context.npz     second-stage rankers that read point-in-time context (features.list_context):
                           the counts the server looks candidates up in (config.json "context")
    EXPORT/item_item.npz   second-stage rankers that read item-item features (features.item_item): the model the
                           server scores its lists with, from the last `history` behaviors (config.json "item_item")
    EXPORT/manifest.json   {"format", "files": {name: sha256}}

The module is rebuilt from config.json and the code (never unpickled). Sharded
tables are gathered by loading the DCP checkpoint into an unsharded model in
one process (`export_from_checkpoint`; DCP reshards any world size to 1).

    export_from_checkpoint("runs/ml-1m/checkpoints/best", cfg.model, "artifacts/ranker")
    ranker = load_ranker("artifacts/ranker")       # RankerInference (SdimRankerInference with SDIM)
    probs = ranker.forward(batch)                  # (N,)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed.checkpoint as dcp

from features.config import ConfigError, from_mapping, to_dict
from features.datasets.common import sha256_file
from features.item_item import ITEM_ITEM_FEATURE_NAMES, MAX_HISTORY, ItemItem
from features.list_context import CONTEXT_FEATURE_NAMES, ContextCounts
from ranking.config import LossConfig, ModelConfig
from ranking.inference import RankerInference, make_inference
from ranking.model import RankerModel
from ranking.task import RankerTrainTask

FORMAT = "cascade.ranker/v1"
CONFIG = "config.json"
WEIGHTS = "weights.pt"
MANIFEST = "manifest.json"
CONTEXT = "context.npz"
ITEM_ITEM = "item_item.npz"


class RankerExportError(ValueError):
    """An export directory is missing a file, fails its checksum or does not match the code."""



def export_ranker(model: RankerModel, out_dir: str | Path, metadata: Mapping[str, Any] | None = None,
                  context: ContextCounts | None = None, item_item: ItemItem | None = None,
                  item_item_history: int = 0) -> Path:
    """Writes config.json, weights.pt (+ context.npz, + item_item.npz read over the last `item_item_history`
    behaviors) and manifest.json for an unsharded model; returns the directory."""
    if item_item is not None and not 1 <= item_item_history <= MAX_HISTORY:
        raise ValueError(f"export_ranker: an item-item model reads 1..{MAX_HISTORY} behaviors, got {item_item_history}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    s = cfg.sequence
    config = {
        "format": FORMAT,
        "model": to_dict(cfg),
        "tasks": list(cfg.heads.tasks),
        "history": {"short_len": s.short_len, "long_len": s.long_len if s.long != "none" else 0,
                    "reads_last": s.history_len, "long_module": s.long},
        "sdim": {"num_hashes": s.sdim_hashes, "num_bits": s.sdim_bits, "seed": s.sdim_seed,
                 "batch_key": "hist_sdim_sig"} if s.long == "sdim" else None,
        "metadata": dict(metadata or {}),
        "context": {"file": CONTEXT, "features": list(CONTEXT_FEATURE_NAMES), "window": context.window}
        if context is not None else None,
        "item_item": {"file": ITEM_ITEM, "features": list(ITEM_ITEM_FEATURE_NAMES), "history": int(item_item_history),
                      "k": item_item.k, "lambda": item_item.lam} if item_item is not None else None,
    }
    if context is not None:
        context.save(out / CONTEXT)
    if item_item is not None:
        item_item.save(out / ITEM_ITEM)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / WEIGHTS)
    names = (CONFIG, WEIGHTS, *((CONTEXT,) if context is not None else ()),
             *((ITEM_ITEM,) if item_item is not None else ()))
    manifest = {"format": FORMAT, "files": {name: sha256_file(out / name) for name in names}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def export_from_checkpoint(checkpoint: str | Path, model_cfg: ModelConfig, out_dir: str | Path,
                           metadata: Mapping[str, Any] | None = None, context: ContextCounts | None = None,
                           item_item: ItemItem | None = None, item_item_history: int = 0) -> Path:
    """Gathers a (sharded) DCP training checkpoint into an unsharded model and exports it.

    Runs in one process, with or without a process group (no collectives).
    """
    ckpt = Path(checkpoint)
    if not (ckpt / ".metadata").exists():
        raise FileNotFoundError(f"{ckpt} is not a DCP checkpoint (no .metadata)")
    task = RankerTrainTask(RankerModel(model_cfg, embedding_device="cpu"), LossConfig())
    state = {"model": task.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    task.load_state_dict(state["model"])
    return export_ranker(task.model, out_dir, metadata, context, item_item, item_item_history)


def read_export_config(path: str | Path) -> dict[str, Any]:
    """config.json of a verified export."""
    root = Path(path)
    m = root / MANIFEST
    if not m.is_file():
        raise RankerExportError(f"{m} does not exist: not a ranker export")
    manifest = json.loads(m.read_text())
    if manifest.get("format") != FORMAT:
        raise RankerExportError(f"{m}: format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    files = manifest.get("files") or {}
    for name in (CONFIG, WEIGHTS, *(f for f in (CONTEXT, ITEM_ITEM) if f in files)):
        if name not in files:
            raise RankerExportError(f"{m} does not list {name}")
        f = root / name
        if not f.is_file():
            raise RankerExportError(f"{f} is listed in the manifest but missing")
        got = sha256_file(f)
        if got != files[name]:
            raise RankerExportError(f"{f}: sha256 {got}, the manifest says {files[name]}")
    config = json.loads((root / CONFIG).read_text())
    ctx = config.get("context")
    if ctx is not None:
        if CONTEXT not in files:
            raise RankerExportError(f"{m}: config.json reads context features but the manifest does not list {CONTEXT}")
        if list(ctx.get("features") or []) != list(CONTEXT_FEATURE_NAMES):
            raise RankerExportError(f"{root / CONFIG}: context features {ctx.get('features')}, this code computes "
                                    f"{list(CONTEXT_FEATURE_NAMES)}")
    ii = config.get("item_item")
    if ii is not None:
        if ITEM_ITEM not in files:
            raise RankerExportError(f"{m}: config.json reads item-item features but the manifest does not list "
                                    f"{ITEM_ITEM}")
        names = ii.get("features") if isinstance(ii, dict) else ii
        if not isinstance(ii, dict) or list(names or []) != list(ITEM_ITEM_FEATURE_NAMES):
            raise RankerExportError(f"{root / CONFIG}: item-item features {names!r}, this code computes "
                                    f"{list(ITEM_ITEM_FEATURE_NAMES)}")
        h = ii.get("history")
        if not isinstance(h, int) or isinstance(h, bool) or not 1 <= h <= MAX_HISTORY:
            raise RankerExportError(f"{root / CONFIG}: item_item.history must be an integer in [1, {MAX_HISTORY}], "
                                    f"got {h!r}")
    return config


def load_ranker(path: str | Path) -> RankerInference:
    """Verifies checksums, rebuilds the model from config.json + code, loads weights (weights_only=True)."""
    root = Path(path)
    config = read_export_config(root)
    try:
        cfg = from_mapping(ModelConfig, config["model"])
    except (KeyError, ConfigError) as e:
        raise RankerExportError(f"{root / CONFIG}: the model config does not match this code: {e}") from None
    model = RankerModel(cfg, embedding_device="cpu")
    state = torch.load(root / WEIGHTS, weights_only=True, map_location="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RankerExportError(f"{root / WEIGHTS} does not fit the model of {root / CONFIG}: {e}") from None
    context = None
    if config.get("context") is not None:
        try:
            context = ContextCounts.load(root / CONTEXT)
        except (ValueError, KeyError, OSError) as e:
            raise RankerExportError(f"{root / CONTEXT}: {e}") from None
    item_item, history = None, 0
    if config.get("item_item") is not None:
        history = int(config["item_item"]["history"])
        try:
            item_item = ItemItem.load(root / ITEM_ITEM)
        except (ValueError, OSError) as e:
            raise RankerExportError(str(e)) from None
    return make_inference(model, context, item_item, history)
