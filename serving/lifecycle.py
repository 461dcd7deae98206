"""Changing what is served: new model versions (validate, then swap) and new items (into the index).

`ModelManager.load` is the only way a bundle becomes the served one:
verify (checksums, schema) -> load (restricted loaders) -> smoke inference
through the request path -> under the catalog lock: embed the catalog items
the new retriever's index lacks, swap. Any failure leaves the served bundle
untouched and is counted by reason. `ItemUpdater.add` puts new items into the
catalog and the served index under the same lock, so an item arriving during
a swap lands in the new bundle's index too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from features.schema import Item
from features.sequence import SequenceState
from serving.batching import build_request_batch, candidate_dense, user_view
from serving.catalog import ItemCatalog
from serving.config import ModelsConfig, StateConfig
from serving.errors import ArtifactError
from serving.metrics import ServingMetrics
from serving.models import (ModelBundle, ModelHolder, check_unchanged, describe_error, evict_fetched, load_bundle, locate_bundle,
                            verify_bundle)
from serving.runtime import CatalogRef, list_dense
from serving.state.codec import CounterLog, UserRecord

log = logging.getLogger(__name__)


def _embed_items(bundle: ModelBundle, catalog: ItemCatalog, ids: np.ndarray) -> np.ndarray:
    view = user_view(0, None, 1, bundle.dense)
    batch = build_request_batch(view, catalog, ids, np.zeros((len(ids), 0), np.float32), 1, None, bundle.user_keys)
    vecs = bundle.retriever.item_embedding(batch.candidates).detach().float().numpy()
    if vecs.shape != (len(ids), bundle.index.dim) or not np.isfinite(vecs).all():
        raise ArtifactError("smoke_failed", f"item_embedding returned shape {vecs.shape} (expected "
                                            f"({len(ids)}, {bundle.index.dim})) or non-finite values")
    return vecs


def smoke_test(bundle: ModelBundle, catalog: ItemCatalog, num_candidates: int) -> None:
    """One synthetic request through user tower, ANN and ranker; raises ArtifactError on a bad output."""
    ids = bundle.retriever.item_ids
    if len(ids) == 0:
        raise ArtifactError("smoke_failed", "the retriever's index is empty")
    hist = np.asarray(ids[: min(20, len(ids))], np.int64)
    ts = np.arange(1, len(hist) + 1, dtype=np.int64) * 1000
    rec = UserRecord(SequenceState(hist, ts, np.full(len(hist), 9, np.int64), catalog.primary_categories(hist)),
                     CounterLog(ts, np.ones(len(ts), np.uint8), len(ts), len(ts)))
    as_of = int(ts[-1]) + 1
    view = user_view(-1, rec, as_of, bundle.dense)
    sigs = bundle.signatures(view.seq.item_ids) if bundle.sig_spec else None
    try:
        uvec = bundle.retriever.user_embedding(
            build_request_batch(view, catalog, np.empty(0, np.int64), None, as_of, sigs, bundle.user_keys))
        uvec = uvec.detach().float().numpy()
        if uvec.shape != (1, bundle.index.dim) or not np.isfinite(uvec).all():
            raise ArtifactError("smoke_failed", f"user_embedding returned shape {uvec.shape} or non-finite values")
        cands, scores = bundle.retriever.search(uvec, min(num_candidates, len(ids)))
        cands, scores = cands[0][cands[0] >= 0], scores[0][cands[0] >= 0]
        if len(cands) == 0:
            raise ArtifactError("smoke_failed", "ANN search returned no candidates")
        second = bundle.ranker.second_stage
        if second:  # the runtime's second-stage inputs: the list's features, no user dense features
            dense = list_dense(bundle, scores, cands, view.seq.item_ids, as_of, uvec[0])
        else:
            dense = candidate_dense(catalog, cands, None, as_of, bundle.dense)
        batch = build_request_batch(view, catalog, cands, dense, as_of, sigs, bundle.user_keys)
        if second:
            batch = dataclasses.replace(batch, user_dense=batch.user_dense[:, :0])
            probs = torch.sigmoid(bundle.ranker.logits(batch))
        else:
            probs = bundle.ranker.forward(batch)
        probs = torch.as_tensor(probs).detach().float()
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError("smoke_failed", f"inference raised {describe_error(e)}") from e
    if tuple(probs.shape) != (len(cands),):
        raise ArtifactError("smoke_failed", f"ranker returned shape {tuple(probs.shape)}, expected ({len(cands)},)")
    if not bool(torch.isfinite(probs).all()) or float(probs.min()) < 0 or float(probs.max()) > 1:
        raise ArtifactError("smoke_failed", "ranker returned non-finite scores or scores outside [0, 1]")
    if bundle.sig_spec:
        s = bundle.ranker.behavior_signatures(hist)
        if np.asarray(s).shape != hist.shape:
            raise ArtifactError("smoke_failed", f"behavior_signatures returned shape {np.asarray(s).shape}")


@contextlib.contextmanager
def _rejected_as(reason: str) -> Iterator[None]:
    """Any exception of a hostile or broken artifact (ValueError, KeyError, pickle/torch/faiss errors, MemoryError,
    RecursionError...) becomes a rejection with a reason; only ArtifactError and non-Exceptions pass unchanged."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(reason, describe_error(e)) from e


class ModelManager:
    def __init__(self, holder: ModelHolder, catalog: CatalogRef, state: StateConfig, cfg: ModelsConfig,
                 metrics: ServingMetrics) -> None:
        self.holder = holder
        self.catalog = catalog
        self.state = state
        self.cfg = cfg
        self.metrics = metrics

    def load(self, uri: str | Path, version: str | None = None, checksum: str | None = None) -> ModelBundle:
        """Validates and swaps in a bundle; raises ArtifactError (the served bundle is unchanged)."""
        t0 = time.perf_counter()
        try:
            with _rejected_as("unsupported_uri"):  # an object-store URI: fetched into the cache, verified below
                path = locate_bundle(str(uri), self.cfg.allowed_roots, self.cfg.cache_dir, checksum)
            cur = self.holder.current
            if cur is not None and version is not None and cur.version == version and cur.checksum == checksum:
                return cur  # a redelivered announcement of what is served
            fingerprints: dict[Path, tuple[int, ...]] = {}
            with _rejected_as("invalid_bundle"):
                try:
                    manifest, digest, dense = verify_bundle(path, checksum, version, self.state.stats,
                                                            self.state.retention_ms(), fingerprints)
                except ArtifactError:
                    evict_fetched(str(uri), path, self.cfg.cache_dir)  # a bad fetched copy is downloaded anew next time
                    raise
            with _rejected_as("load_failed"):
                bundle = load_bundle(path, manifest, digest, dense)
            with _rejected_as("smoke_failed"):
                smoke_test(bundle, self.catalog.current, self.cfg.smoke_candidates)
                bundle.warm_signatures(self.catalog.current.item_ids)
            with _rejected_as("invalid_bundle"):
                check_unchanged(path, manifest, fingerprints)  # what was loaded is what was checksummed
            with self.catalog.lock:
                catalog = self.catalog.current
                with _rejected_as("smoke_failed"):
                    missing = catalog.item_ids[~bundle.index.contains(catalog.item_ids)]
                    if len(missing):
                        bundle.index.add(missing, _embed_items(bundle, catalog, missing))
                old = self.holder.swap(bundle)
        except ArtifactError as e:
            self.metrics.model_rejections.labels(reason=e.reason).inc()
            log.error("model %s from %s rejected (%s); still serving %s", version or "?", uri, e,
                      self.holder.current.version if self.holder.current else "nothing")
            raise
        self.metrics.set_model(bundle.version)
        self.metrics.model_swaps.inc()
        self.metrics.index_items.set(len(bundle.index))
        log.info("serving model %s (was %s): %d items searchable, loaded and checked in %.2fs", bundle.version,
                 old.version if old else "nothing", len(bundle.index), time.perf_counter() - t0)
        return bundle


class ItemUpdater:
    def __init__(self, holder: ModelHolder, catalog: CatalogRef, metrics: ServingMetrics) -> None:
        self.holder = holder
        self.catalog = catalog
        self.metrics = metrics

    def add(self, items: Sequence[Item]) -> int:
        """Adds/replaces items in the catalog and the served index; returns how many were indexed."""
        if not items:
            return 0
        with self.catalog.lock:
            catalog = self.catalog.current.with_items(items)
            self.catalog.current = catalog
            bundle = self.holder.current
            if bundle is None:
                return 0
            ids = np.fromiter((it.item_id for it in items), np.int64, len(items))
            ids = np.unique(ids)
            try:
                vecs = _embed_items(bundle, catalog, ids)
            except ArtifactError as e:
                self.metrics.items_rejected.labels(reason="embedding_failed").inc(len(ids))
                log.error("could not embed %d new items: %s", len(ids), e)
                return 0
            bundle.index.add(ids, vecs)
            if bundle.sig_spec:
                bundle.signatures(ids)
        self.metrics.items_added.inc(len(ids))
        self.metrics.index_items.set(len(bundle.index))
        return len(ids)
