"""The inference module serving loads: the batch built from online state -> probabilities.

It wraps the same `RankerModel` the train task trains (eval mode, no dropout,
no masked views), so scores equal the training forward's (tests check it).

History the model reads (also in the export's config.json, ``history``):

* ``long_len``  the long-term module reads the last `long_len` behaviors;
* ``short_len`` the short-term attention and the AW-MoE gate read the last `short_len`;
* longer histories are truncated by the model itself (the server may send up
  to its long cap, e.g. 10k; anything beyond ``history_len`` is ignored).

With an SDIM module (`SdimRankerInference`) `behavior_signatures(item_ids)`
gives each item's packed SimHash signature (`kernels.pack_codes`): the server
computes it when an event arrives and stores it beside the sequence
(``hist_sdim_sig`` in the batch), so a request only gathers. Signatures depend
on the model version: recompute them when a new model is loaded.

It also gives SDIM's bucket sums (`bucket_sums`: m x 2**tau x D float32 per
user, 8 x 8 x 32 x 4 B = 8 KB with the default config) of the behaviors
the long-term module attends (the last `long_len`), from the same
`EmbeddingArch.behavior_values` the model embeds behaviors with. The server
keeps them beside the sequence (adding an entering behavior, subtracting one
that leaves the window) and sends them as ``Batch.sdim_sums``: the forward
then gathers each candidate's m buckets instead of scanning the L behaviors.
Like the signatures, sums belong to one model version.
"""
from __future__ import annotations

import numpy as np
import torch

from features.batch import HISTORY_KEYS, ITEM_CATEGORY, ITEM_ID, USER_ID, Batch, BatchSpec, BatchValidationError
from features.item_item import ItemItem
from features.list_context import ContextCounts
from kernels import pack_codes, unpack_codes
from ranking.model import RankerModel


class RankerInference:
    """forward(batch) -> (N,) probabilities of the main task (task 0); predict(batch) -> (N, T).

    Example::

        ranker = ranking.export.load_ranker("artifacts/ranker")
        probs = ranker.forward(batch)          # (N,)
    """

    def __init__(self, model: RankerModel, context: ContextCounts | None = None, item_item: ItemItem | None = None,
                 item_item_history: int = 0) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.context = context  # second stage: the point-in-time counts its context features read
        # second stage: the item-item model its item-item features read, over the last `item_item_history` behaviors
        self.item_item = item_item
        self.item_item_history = item_item_history if item_item is not None else 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.cfg.heads.tasks

    @property
    def short_len(self) -> int:
        return self.cfg.sequence.short_len

    @property
    def long_len(self) -> int:
        """Behaviors the long-term module reads (0 without one)."""
        return self.cfg.sequence.long_len if self.cfg.sequence.long != "none" else 0

    @property
    def history_len(self) -> int:
        """The most behaviors any module reads; longer histories are truncated."""
        return self.cfg.sequence.history_len

    @property
    def second_stage(self) -> bool:
        """A residual on the retriever's logit: its candidate_dense is `features.candidate_lists.list_features`
        of the retrieved list (best first) and it is sorted by `logits`, not probabilities."""
        return self.cfg.residual_column >= 0

    def batch_spec(self) -> BatchSpec:
        """What a request batch must hold (for `features.batch.validate_batch` at the server's edge)."""
        e = self.cfg.embedding
        cand = (ITEM_ID,) + ((ITEM_CATEGORY,) if e.use_category else ()) + tuple(e.candidate_features)
        return BatchSpec(user_keys=tuple(dict.fromkeys((USER_ID,) + tuple(e.user_features))),
                         history_keys=HISTORY_KEYS, candidate_keys=cand,
                         user_dense_dim=self.cfg.user_dense_dim, candidate_dense_dim=self.cfg.candidate_dense_dim)

    def _check(self, batch: Batch) -> None:
        """Cheap structural checks (keys, dense widths) so a wrong batch fails with a clear message."""
        spec = self.batch_spec()
        for name, kjt, keys in (("user", batch.user, spec.user_keys), ("history", batch.history, spec.history_keys),
                                ("candidates", batch.candidates, spec.candidate_keys)):
            missing = [k for k in keys if k not in kjt.keys()]
            if missing:
                raise BatchValidationError(f"ranker: batch.{name} lacks feature(s) {missing} (has {kjt.keys()})")
        for name, t, dim in (("user_dense", batch.user_dense, spec.user_dense_dim),
                             ("candidate_dense", batch.candidate_dense, spec.candidate_dense_dim)):
            if t.dim() != 2 or t.shape[1] != dim:
                raise BatchValidationError(f"ranker: batch.{name} has shape {tuple(t.shape)}, the model expects "
                                           f"(rows, {dim})")

    @torch.inference_mode()
    def predict(self, batch: Batch) -> torch.Tensor:
        """(N, T) probabilities of every task."""
        self._check(batch)
        return torch.sigmoid(self.model(batch).logits)

    def forward(self, batch: Batch) -> torch.Tensor:
        """(N,) probabilities of the main task."""
        return self.predict(batch)[:, 0]

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """(N,) main-task logits: what to sort by. A second-stage ranker's logits sit on the retriever's scale
        (cosine / temperature, about +-20), where float32 probabilities saturate to ties."""
        self._check(batch)
        return self.model(batch).logits[:, 0].float()

    __call__ = forward


class SdimRankerInference(RankerInference):
    """A ranker with an SDIM long-term module: also computes behavior signatures at event time."""

    @property
    def signature_bits(self) -> tuple[int, int]:
        """(m hash functions, tau bits) of a packed signature."""
        s = self.cfg.sequence
        return s.sdim_hashes, s.sdim_bits

    @torch.inference_mode()
    def behavior_signatures(self, item_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(K,) canonical item ids -> (K,) int64 packed SimHash signatures (the batch key ``hist_sdim_sig``)."""
        ids = torch.as_tensor(np.asarray(item_ids) if not isinstance(item_ids, torch.Tensor) else item_ids)
        if ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(f"behavior_signatures: item_ids must be a 1-D integer array, got {ids.dtype} "
                             f"shape {tuple(ids.shape)}")
        emb = self.model.embedding
        codes = emb.sdim_codes(emb.item_query_embeddings(ids.to(torch.int64)))  # (K, m)
        return pack_codes(codes, self.cfg.sequence.sdim_bits)

    @property
    def sums_window(self) -> int:
        """How many of the latest behaviors the bucket sums cover (the long-term module's `long_len`)."""
        return self.cfg.sequence.long_len

    @property
    def sums_shape(self) -> tuple[int, int, int]:
        """(m, 2**tau, D) of one user's bucket sums."""
        s = self.cfg.sequence
        return s.sdim_hashes, 1 << s.sdim_bits, self.cfg.embedding.dim

    @torch.inference_mode()
    def behavior_values(self, item_ids: np.ndarray, categories: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(K,) behaviors -> (K, D) float32 their representations (`EmbeddingArch.behavior_values`): what a
        bucket sum adds up."""
        cols = [torch.as_tensor(np.asarray(a, np.int64)) for a in (item_ids, categories, actions)]
        return self.model.embedding.behavior_values(*cols).float().numpy()

    def signature_codes(self, signatures: np.ndarray) -> np.ndarray:
        """(K,) packed signatures -> (K, m) int64 codes in [0, 2**tau): `kernels.unpack_codes`' layout (code j in
        bits [j*tau, (j+1)*tau)) in numpy, because the consumer calls it per user write, where torch's
        per-call overhead is ten times the work (a test pins it to `kernels.unpack_codes`)."""
        s = self.cfg.sequence
        packed = np.asarray(signatures, np.int64)
        return (packed[:, None] >> (np.arange(s.sdim_hashes, dtype=np.int64) * s.sdim_bits)) & ((1 << s.sdim_bits) - 1)

    @torch.inference_mode()
    def bucket_sums(self, item_ids: np.ndarray, categories: np.ndarray, actions: np.ndarray,
                    signatures: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Users' behaviors (oldest first) -> their SDIM bucket sums over the last `sums_window` of them.

        Args:
            item_ids, categories, actions: (L,) int64 canonical ids and action codes (the history keys).
            signatures: (L,) int64 packed signatures of the items (`behavior_signatures`).
            lengths: (B,) behaviors per user, for B users at once (a backfill); None: one user.

        Returns:
            sums (m, 2**tau, D) float32 and counts (m, 2**tau) int32 (behaviors per bucket), or (B, ...)
            of each with `lengths`. With L <= the window these are plain per-bucket sums, which is how the
            server adds and subtracts behaviors.
        """
        cols = [torch.as_tensor(np.asarray(a, np.int64)) for a in (item_ids, categories, actions, signatures)]
        if len({c.shape for c in cols}) != 1 or cols[0].dim() != 1:
            raise ValueError(f"bucket_sums: item_ids, categories, actions, signatures must be parallel 1-D arrays, "
                             f"got shapes {[tuple(c.shape) for c in cols]}")
        items, cats, acts, sigs = cols
        lens = torch.tensor([items.numel()]) if lengths is None else torch.as_tensor(np.asarray(lengths, np.int64))
        if lens.dim() != 1 or int(lens.sum()) != items.numel() or (lens.numel() and int(lens.min()) < 0):
            raise ValueError(f"bucket_sums: lengths must be (B,) non-negative and sum to the {items.numel()} "
                             f"behaviors, got shape {tuple(lens.shape)} summing to {int(lens.sum())}")
        s = self.cfg.sequence
        codes = unpack_codes(sigs, s.sdim_hashes, s.sdim_bits)  # (L, m)
        values = self.model.embedding.behavior_values(items, cats, acts)  # (L, D)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
        assert self.model.long is not None
        # a column of ones counts the behaviors per bucket in the same pass (exact in fp32 below 2**24)
        both = self.model.long.window_bucket_sums(torch.cat([values.float(), values.new_ones(len(values), 1)], 1),
                                                  codes, offsets)  # (B, m, K, D + 1)
        sums, counts = both[..., :-1].contiguous().numpy(), both[..., -1].to(torch.int32).numpy()
        return (sums[0], counts[0]) if lengths is None else (sums, counts)


def make_inference(model: RankerModel, context: ContextCounts | None = None, item_item: ItemItem | None = None,
                   item_item_history: int = 0) -> RankerInference:
    """The right wrapper for the model (with behavior signatures when it has SDIM)."""
    cls = SdimRankerInference if model.cfg.sequence.long == "sdim" else RankerInference
    return cls(model, context, item_item, item_item_history)
