"""The one batch type every stage uses (training, evaluation and serving).

A `Batch` holds B users ("queries"), each with a behavior history and a jagged
list of candidates; N is the total number of candidates in the batch.

* ranking training: one sample = (user history as of t, one candidate) -> N == B
  (or several candidates per user when a request's impressions are grouped);
* retrieval training: the candidates of user b are the next items at every
  position of its history prefix (every-prefix next-item training);
* serving: B == 1, the candidates are the retrieved items.

Sparse and sequence features are TorchRec `KeyedJaggedTensor`s (KJT):

    user        stride B   keys: "user_id" (1 per user) + user attributes (0..k each)
    history     stride B   *parallel* keys with identical lengths per user:
                           "hist_item_id", "hist_ts" (ms), "hist_event_type",
                           "hist_category", optionally "hist_sdim_sig" (packed
                           SimHash codes computed when the event arrived)
    candidates  stride N   keys: "item_id" (1 per candidate) + item attributes
                           (multi-valued, e.g. "item_category", "item_tag")

plus dense tensors: `num_candidates` (B,), `request_ts` (B,), `user_dense`
(B, Du), `candidate_dense` (N, Dc), `labels` (N, T) and `weights` (N,).

Serving may add each user's SDIM bucket sums, kept at ingest (`sdim_sums`
(B, m, 2**tau, D) float32 over the last `long_len` behaviors, `sdim_lengths`
(B,) how many behaviors they cover): a ranker with an SDIM module then gathers
from them instead of scanning the history, which need only hold the behaviors
the short-term modules read. Training batches leave both None.

Ids are the canonical int64 ids of the data contract; mapping them to
embedding rows (`features.hashing`) is the model's first step, so the batch
built offline by the reader and online from Redis is the same thing.

Construction only assigns; `validate_batch` checks a batch where data enters a
stage (reader, request decoding) and names the feature and sizes on error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

USER_ID = "user_id"
ITEM_ID = "item_id"
HIST_ITEM_ID = "hist_item_id"
HIST_TS = "hist_ts"
HIST_ACTION = "hist_action"  # features.sequence.action_code(event_type, label)
HIST_CATEGORY = "hist_category"
HIST_SDIM_SIG = "hist_sdim_sig"
HISTORY_KEYS: tuple[str, ...] = (HIST_ITEM_ID, HIST_TS, HIST_ACTION, HIST_CATEGORY)
ITEM_CATEGORY = "item_category"
ITEM_TAG = "item_tag"

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]


class BatchValidationError(ValueError):
    """A batch does not have the shape its stage expects; names the feature and sizes."""


def _as_long(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.int64)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.int64)))


def _as_float(x: np.ndarray | torch.Tensor, ndim: int) -> torch.Tensor:
    t = x.to(torch.float32) if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))
    return t


def make_kjt(features: Mapping[str, tuple[ArrayLike, ArrayLike]], stride: int | None = None) -> KeyedJaggedTensor:
    """{key: (values, lengths)} -> KeyedJaggedTensor (values int64, lengths int32).

    Keys keep their insertion order. `stride` is needed only when there are no keys.
    """
    keys = list(features)
    if not keys:
        return KeyedJaggedTensor(
            keys=[], values=torch.empty(0, dtype=torch.int64),
            lengths=torch.empty(0, dtype=torch.int32), stride=stride or 0,
        )
    values = torch.cat([_as_long(features[k][0]) for k in keys])
    lengths = torch.cat([_as_long(features[k][1]).to(torch.int32) for k in keys])
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=stride)


def kjt_columns(kjt: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{key: (values, (stride,) int64 lengths)} of a KeyedJaggedTensor, split in one pass.

    `kjt[key]` recomputes the per-key offsets and builds a JaggedTensor on every call (~70 µs each on this
    CPU); a served request reads five to ten keys per forward, a micro-batch stacks them per request. Equal
    to ``kjt[key].values()`` / ``kjt[key].lengths()`` for every key (a test checks it)."""
    keys = kjt.keys()
    if not keys:
        return {}
    lengths = kjt.lengths().to(torch.int64)
    values = kjt.values()
    stride = kjt.stride()
    if lengths.numel() != len(keys) * stride:  # variable stride per key: the KJT's own split
        return {k: (kjt[k].values(), kjt[k].lengths().to(torch.int64)) for k in keys}
    per_key = lengths.view(len(keys), stride)
    counts = per_key.sum(1).tolist()
    return dict(zip(keys, zip(torch.split(values[:sum(counts)], counts), per_key.unbind(0))))


def concat_rows(kjts: Sequence[KeyedJaggedTensor], keys: Sequence[str]) -> KeyedJaggedTensor:
    """Stacks the rows of several KJTs (each must have every key in `keys`), in order."""
    values, lengths = [], []
    cols = [kjt_columns(k) for k in kjts]
    for key in keys:
        for c in cols:
            v, n = c[key]
            values.append(v)
            lengths.append(n)
    stride = sum(k.stride() for k in kjts)
    return KeyedJaggedTensor(keys=list(keys), values=torch.cat(values), lengths=torch.cat(lengths), stride=stride)


def build_candidate_features(
    item_ids: np.ndarray,  # (N,) int64
    categories: tuple[np.ndarray, np.ndarray],  # (values, (N,) lengths): hashed ids of all categories
    tags: tuple[np.ndarray, np.ndarray],  # (values, (N,) lengths): hashed tag ids
    attrs: Mapping[str, tuple[np.ndarray, np.ndarray]],  # item_attr_<key> -> ((N,) hashed ids, (N,) bool present)
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The candidates KJT's {key: (values, lengths)} for N items, the one builder of it (the reader from Spark's
    items table, the server from its in-memory catalog): item_id (one each), item_category and item_tag (jagged),
    then one value per item attribute where present and none where missing, in `attrs`' order."""
    out = {ITEM_ID: (item_ids, np.ones(len(item_ids), dtype=np.int64)), ITEM_CATEGORY: categories, ITEM_TAG: tags}
    for key, (ids, present) in attrs.items():
        out[key] = (ids[present], present.astype(np.int64))
    return out


@dataclass
class Batch(Pipelineable):
    """See the module docstring for the layout. Shapes: B users, N candidates, T tasks."""

    user: KeyedJaggedTensor
    history: KeyedJaggedTensor
    candidates: KeyedJaggedTensor
    num_candidates: torch.Tensor  # (B,) int64
    request_ts: torch.Tensor  # (B,) int64, ms
    user_dense: torch.Tensor  # (B, Du) float32
    candidate_dense: torch.Tensor  # (N, Dc) float32
    labels: torch.Tensor  # (N, T) float32; T may be 0 at serving time
    weights: torch.Tensor  # (N,) float32 sample weights
    meta: dict[str, str] = field(default_factory=dict)  # provenance (shard, split); never tensors
    sdim_sums: torch.Tensor | None = None  # (B, m, 2**tau, D) float32 SDIM bucket sums kept at ingest (serving)
    sdim_lengths: torch.Tensor | None = None  # (B,) int64 behaviors the sums cover (min(history, long_len))

    @property
    def batch_size(self) -> int:
        return int(self.num_candidates.numel())

    @property
    def total_candidates(self) -> int:
        return int(self.candidate_dense.shape[0])

    def user_ids(self) -> torch.Tensor:  # (B,)
        return self.user[USER_ID].values()

    def candidate_item_ids(self) -> torch.Tensor:  # (N,)
        return self.candidates[ITEM_ID].values()

    def candidate_user_index(self) -> torch.Tensor:  # (N,) row of each candidate's user
        return torch.repeat_interleave(torch.arange(self.batch_size, device=self.num_candidates.device), self.num_candidates)

    def history_lengths(self) -> torch.Tensor:  # (B,) int64
        return self.history[HIST_ITEM_ID].lengths().to(torch.int64)

    def history_offsets(self) -> torch.Tensor:  # (B+1,) int64
        return self.history[HIST_ITEM_ID].offsets().to(torch.int64)

    def history_values(self, key: str) -> torch.Tensor:  # (sum L,)
        return self.history[key].values()

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            user=self.user.to(device, non_blocking=non_blocking),
            history=self.history.to(device, non_blocking=non_blocking),
            candidates=self.candidates.to(device, non_blocking=non_blocking),
            num_candidates=self.num_candidates.to(device, non_blocking=non_blocking),
            request_ts=self.request_ts.to(device, non_blocking=non_blocking),
            user_dense=self.user_dense.to(device, non_blocking=non_blocking),
            candidate_dense=self.candidate_dense.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            weights=self.weights.to(device, non_blocking=non_blocking),
            meta=dict(self.meta),
            sdim_sums=None if self.sdim_sums is None else self.sdim_sums.to(device, non_blocking=non_blocking),
            sdim_lengths=None if self.sdim_lengths is None else self.sdim_lengths.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for kjt in (self.user, self.history, self.candidates):
            kjt.record_stream(stream)
        for t in (self.num_candidates, self.request_ts, self.user_dense, self.candidate_dense, self.labels, self.weights,
                  self.sdim_sums, self.sdim_lengths):
            if t is not None:
                t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            user=self.user.pin_memory(),
            history=self.history.pin_memory(),
            candidates=self.candidates.pin_memory(),
            num_candidates=self.num_candidates.pin_memory(),
            request_ts=self.request_ts.pin_memory(),
            user_dense=self.user_dense.pin_memory(),
            candidate_dense=self.candidate_dense.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
            meta=dict(self.meta),
            sdim_sums=None if self.sdim_sums is None else self.sdim_sums.pin_memory(),
            sdim_lengths=None if self.sdim_lengths is None else self.sdim_lengths.pin_memory(),
        )


def build_batch(
    *,
    user: Mapping[str, tuple[ArrayLike, ArrayLike]],
    history: Mapping[str, ArrayLike],
    history_lengths: ArrayLike,
    candidates: Mapping[str, tuple[ArrayLike, ArrayLike]],
    num_candidates: ArrayLike,
    request_ts: ArrayLike,
    user_dense: np.ndarray | torch.Tensor | None = None,
    candidate_dense: np.ndarray | torch.Tensor | None = None,
    labels: np.ndarray | torch.Tensor | None = None,
    weights: np.ndarray | torch.Tensor | None = None,
    meta: Mapping[str, str] | None = None,
) -> Batch:
    """Assembles a Batch from flat arrays (the reader's and serving's common path).

    `history` holds the values of each parallel key; they share `history_lengths`.
    Missing dense parts become empty (B, 0) / (N, 0) tensors, missing labels (N, 0),
    missing weights ones. No validation here: call `validate_batch`.
    """
    num_c = _as_long(num_candidates)
    b = int(num_c.numel())
    n = int(num_c.sum()) if b else 0
    hl = _as_long(history_lengths)
    hist = make_kjt({k: (v, hl) for k, v in history.items()}, stride=b)
    return Batch(
        user=make_kjt(user, stride=b),
        history=hist,
        candidates=make_kjt(candidates, stride=n),
        num_candidates=num_c,
        request_ts=_as_long(request_ts),
        user_dense=_as_float(user_dense, 2) if user_dense is not None else torch.zeros(b, 0),
        candidate_dense=_as_float(candidate_dense, 2) if candidate_dense is not None else torch.zeros(n, 0),
        labels=_as_float(labels, 2) if labels is not None else torch.zeros(n, 0),
        weights=_as_float(weights, 1) if weights is not None else torch.ones(n),
        meta=dict(meta or {}),
    )


@dataclass(frozen=True)
class BatchSpec:
    """What a stage expects of a batch; `validate_batch` checks a batch against it."""

    user_keys: tuple[str, ...] = (USER_ID,)
    history_keys: tuple[str, ...] = HISTORY_KEYS
    candidate_keys: tuple[str, ...] = (ITEM_ID,)
    user_dense_dim: int | None = None  # None: any
    candidate_dense_dim: int | None = None
    num_tasks: int | None = None
    max_history: int | None = None
    max_candidates_per_user: int | None = None
    history_before_request: bool = True  # every behavior strictly before request_ts


def _fail(msg: str) -> None:
    raise BatchValidationError(msg)


def _check_kjt(name: str, kjt: KeyedJaggedTensor, keys: Sequence[str], stride: int) -> None:
    missing = [k for k in keys if k not in kjt.keys()]
    if missing:
        _fail(f"{name}: missing keys {missing} (have {kjt.keys()})")
    lengths = kjt.lengths()
    n_keys = len(kjt.keys())
    if lengths.numel() != n_keys * stride:
        _fail(f"{name}: lengths has {lengths.numel()} entries, expected {n_keys} keys x stride {stride} = {n_keys * stride}")
    if lengths.numel() and int(lengths.min()) < 0:
        _fail(f"{name}: negative lengths")
    total = int(lengths.sum()) if lengths.numel() else 0
    if kjt.values().numel() != total:
        _fail(f"{name}: values has {kjt.values().numel()} entries but lengths sum to {total}")
    if kjt.values().dtype != torch.int64:
        _fail(f"{name}: values must be int64, got {kjt.values().dtype}")


def validate_batch(batch: Batch, spec: BatchSpec = BatchSpec()) -> Batch:
    """Checks shapes, dtypes and invariants; raises BatchValidationError naming the feature.

    Runs where data enters a stage (reader, request decoding), never inside forward.
    """
    nc = batch.num_candidates
    if nc.dim() != 1:
        _fail(f"num_candidates must be 1-D (B,), got shape {tuple(nc.shape)}")
    b = int(nc.numel())
    if b and int(nc.min()) < 0:
        _fail("num_candidates has negative entries")
    n = int(nc.sum()) if b else 0

    _check_kjt("user", batch.user, spec.user_keys, b)
    if USER_ID in batch.user.keys():
        ul = kjt_columns(batch.user)[USER_ID][1]
        if b and not bool((ul == 1).all()):
            row = int((ul != 1).nonzero()[0])
            _fail(f"user.{USER_ID}: every user needs exactly one id, row {row} has {int(ul[row])}")

    _check_kjt("history", batch.history, spec.history_keys, b)
    hkeys = batch.history.keys()
    if hkeys:
        hcols = kjt_columns(batch.history)  # one split (the lengths' layout was checked above)
        ref = hcols[hkeys[0]][1]
        for k in hkeys[1:]:
            lk = hcols[k][1]
            if not torch.equal(lk, ref):
                row = int((lk != ref).nonzero()[0])
                _fail(
                    f"history.{k}: lengths differ from history.{hkeys[0]} (parallel keys must match); "
                    f"row {row}: {int(lk[row])} vs {int(ref[row])}"
                )
        if spec.max_history is not None and b and int(ref.max()) > spec.max_history:
            row = int(ref.argmax())
            _fail(f"history.{hkeys[0]}: row {row} has {int(ref[row])} behaviors, max is {spec.max_history}")
        if spec.history_before_request and HIST_TS in hkeys and b:
            ts = hcols[HIST_TS][0]
            owner = torch.repeat_interleave(torch.arange(b), ref.to(torch.int64))
            bad = ts >= batch.request_ts[owner] if batch.request_ts.numel() == b else None
            if bad is not None and bool(bad.any()):
                i = int(bad.nonzero()[0])
                _fail(
                    f"history.{HIST_TS}: behavior at ts={int(ts[i])} is not before request_ts="
                    f"{int(batch.request_ts[owner[i]])} (row {int(owner[i])}): the sample would see the future"
                )

    _check_kjt("candidates", batch.candidates, spec.candidate_keys, n)
    if ITEM_ID in batch.candidates.keys() and n:
        cl = kjt_columns(batch.candidates)[ITEM_ID][1]
        if not bool((cl == 1).all()):
            row = int((cl != 1).nonzero()[0])
            _fail(f"candidates.{ITEM_ID}: every candidate needs exactly one id, candidate {row} has {int(cl[row])}")
    if spec.max_candidates_per_user is not None and b and int(nc.max()) > spec.max_candidates_per_user:
        _fail(f"num_candidates: {int(nc.max())} candidates for one user, max is {spec.max_candidates_per_user}")

    if tuple(batch.request_ts.shape) != (b,):
        _fail(f"request_ts: shape {tuple(batch.request_ts.shape)}, expected ({b},)")
    for name, t, rows, dim in (
        ("user_dense", batch.user_dense, b, spec.user_dense_dim),
        ("candidate_dense", batch.candidate_dense, n, spec.candidate_dense_dim),
        ("labels", batch.labels, n, spec.num_tasks),
    ):
        if t.dim() != 2 or t.shape[0] != rows:
            _fail(f"{name}: shape {tuple(t.shape)}, expected ({rows}, {'D' if dim is None else dim})")
        if dim is not None and t.shape[1] != dim:
            _fail(f"{name}: has {t.shape[1]} columns, expected {dim}")
        if t.dtype != torch.float32:
            _fail(f"{name}: dtype {t.dtype}, expected float32")
        if t.numel() and not bool(torch.isfinite(t).all()):
            idx = (~torch.isfinite(t)).nonzero()[0].tolist()
            _fail(f"{name}: non-finite value at {idx}")
    if tuple(batch.weights.shape) != (n,):
        _fail(f"weights: shape {tuple(batch.weights.shape)}, expected ({n},)")
    if (batch.sdim_sums is None) != (batch.sdim_lengths is None):
        _fail("sdim_sums and sdim_lengths go together: one is set and the other is None")
    if batch.sdim_sums is not None:
        sums, lens = batch.sdim_sums, batch.sdim_lengths
        if sums.dim() != 4 or sums.shape[0] != b:
            _fail(f"sdim_sums: shape {tuple(sums.shape)}, expected ({b}, m, 2**tau, D)")
        if sums.dtype != torch.float32:
            _fail(f"sdim_sums: dtype {sums.dtype}, expected float32")
        if tuple(lens.shape) != (b,) or lens.dtype != torch.int64:
            _fail(f"sdim_lengths: shape {tuple(lens.shape)} dtype {lens.dtype}, expected ({b},) int64")
        if b and int(lens.min()) < 0:
            _fail("sdim_lengths has negative entries")
    return batch


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """One batch holding the users of several, in order (user b of batch i follows every user of batches < i):
    the server's micro-batching runs concurrent requests' rankers as one forward. The batches must have the
    same keys and dense widths, and either all or none carry SDIM bucket sums; raises ValueError naming what
    differs. Labels, weights and meta of the parts are kept (meta: the first batch's)."""
    if not batches:
        raise ValueError("concat_batches: no batches")
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    for i, b in enumerate(batches[1:], 1):
        for name in ("user", "history", "candidates"):
            if getattr(b, name).keys() != getattr(first, name).keys():
                raise ValueError(f"concat_batches: batch {i}'s {name} keys {getattr(b, name).keys()} differ from "
                                 f"batch 0's {getattr(first, name).keys()}")
        for name in ("user_dense", "candidate_dense", "labels"):
            if getattr(b, name).shape[1:] != getattr(first, name).shape[1:]:
                raise ValueError(f"concat_batches: batch {i}'s {name} has shape {tuple(getattr(b, name).shape)}, "
                                 f"batch 0's {tuple(getattr(first, name).shape)}")
        if (b.sdim_sums is None) != (first.sdim_sums is None):
            raise ValueError(f"concat_batches: batch {i} {'lacks' if b.sdim_sums is None else 'has'} SDIM bucket "
                             f"sums, batch 0 {'has' if b.sdim_sums is None else 'lacks'} them")

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(b, name) for b in batches])

    sums = first.sdim_sums is not None
    return Batch(
        user=concat_rows([b.user for b in batches], first.user.keys()),
        history=concat_rows([b.history for b in batches], first.history.keys()),
        candidates=concat_rows([b.candidates for b in batches], first.candidates.keys()),
        num_candidates=cat("num_candidates"), request_ts=cat("request_ts"), user_dense=cat("user_dense"),
        candidate_dense=cat("candidate_dense"), labels=cat("labels"), weights=cat("weights"), meta=dict(first.meta),
        sdim_sums=cat("sdim_sums") if sums else None, sdim_lengths=cat("sdim_lengths") if sums else None,
    )
