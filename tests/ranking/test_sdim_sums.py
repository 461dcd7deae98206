"""SDIM from bucket sums kept at ingest: the served path (gather) scores like the full scan (collision_gather)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, BatchValidationError, build_batch, validate_batch
from ranking.inference import make_inference
from ranking.model import RankerModel
from tests.ranking.batches import tiny_config

# gather_buckets normalizes whole-bucket sums, collision_gather the sums of the asked buckets: the same fp32
# additions in another order, then an MLP.
TOL = dict(rtol=1e-4, atol=1e-5)


def sdim_ranker(decoupled: bool = False, experts: int = 3, seed: int = 0, short_len: int = 6, long_len: int = 40):
    torch.manual_seed(seed)
    cfg = tiny_config(decoupled, "sdim", experts, short_len=short_len, long_len=long_len)
    return make_inference(RankerModel(cfg, embedding_device="cpu"))


def user_sums(ranker, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Every user's stored sums as the server builds them (`bucket_sums` of the user's whole history)."""
    off = batch.history_offsets().tolist()
    cols = [batch.history_values(k).numpy() for k in (HIST_ITEM_ID, HIST_CATEGORY, HIST_ACTION)]
    sums, covered = [], []
    for b in range(batch.batch_size):
        items, cats, acts = (c[off[b]:off[b + 1]] for c in cols)
        s, counts = ranker.bucket_sums(items, cats, acts, ranker.behavior_signatures(items).numpy())
        sums.append(torch.from_numpy(s))
        covered.append(int(counts[0].sum()))
    return torch.stack(sums), torch.tensor(covered, dtype=torch.int64)


def with_sums(batch, sums, covered):
    return dataclasses.replace(batch, sdim_sums=sums, sdim_lengths=covered)


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
def test_scores_from_stored_sums_equal_the_full_scan(decoupled, make_batch):
    """Random users, histories shorter and longer than the window (40), empty ones included."""
    ranker = sdim_ranker(decoupled)
    batch = make_batch(11, [0, 3, 39, 40, 41, 130], [3, 4, 2, 5, 3, 6])
    sums, covered = user_sums(ranker, batch)
    assert covered.tolist() == [0, 3, 39, 40, 40, 40]
    torch.testing.assert_close(ranker.forward(with_sums(batch, sums, covered)), ranker.forward(batch), **TOL)


def test_the_sums_path_reads_only_the_short_term_behaviors(make_batch):
    """With sums the batch may hold just the last short_len behaviors (what the server sends): same scores."""
    ranker = sdim_ranker(short_len=6, long_len=40)
    batch = make_batch(12, [75], [5])
    sums, covered = user_sums(ranker, batch)
    full = ranker.forward(batch)
    keep = slice(75 - 6, 75)
    short = build_batch(
        user={k: (batch.user[k].values(), batch.user[k].lengths()) for k in batch.user.keys()},
        history={k: batch.history_values(k)[keep] for k in batch.history.keys()}, history_lengths=[6],
        candidates={k: (batch.candidates[k].values(), batch.candidates[k].lengths()) for k in batch.candidates.keys()},
        num_candidates=batch.num_candidates, request_ts=batch.request_ts, user_dense=batch.user_dense,
        candidate_dense=batch.candidate_dense)
    torch.testing.assert_close(ranker.forward(with_sums(short, sums, covered)), full, **TOL)


def test_sums_cover_exactly_the_window(make_batch):
    """Behaviors older than the last long_len do not count: adding one in front changes nothing."""
    ranker = sdim_ranker(long_len=10)
    rng = np.random.default_rng(0)
    items = rng.integers(1, 200, 30)
    cats, acts = items % 7 + 100, rng.integers(0, 3, 30)
    sig = ranker.behavior_signatures(items).numpy()
    s30, c30 = ranker.bucket_sums(items, cats, acts, sig)
    s10, c10 = ranker.bucket_sums(items[-10:], cats[-10:], acts[-10:], sig[-10:])
    np.testing.assert_array_equal(c30, c10)
    np.testing.assert_allclose(s30, s10, rtol=1e-6, atol=1e-7)
    assert (c10.sum(axis=1) == 10).all()  # every behavior is in exactly one bucket per hash function


def test_sums_are_additive_so_ingest_can_add_and_subtract():
    """sums(window after) == sums(window before) + sums(entering) - sums(leaving), counts likewise."""
    ranker = sdim_ranker(long_len=12)
    rng = np.random.default_rng(1)
    items = rng.integers(1, 200, 20)
    cats, acts = items % 7 + 100, rng.integers(0, 3, 20)
    sig = ranker.behavior_signatures(items).numpy()

    def part(a, b):
        return ranker.bucket_sums(items[a:b], cats[a:b], acts[a:b], sig[a:b])

    before, after, enter, leave = part(3, 15), part(8, 20), part(15, 20), part(3, 8)
    np.testing.assert_allclose(before[0] + enter[0] - leave[0], after[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(before[1] + enter[1] - leave[1], after[1])


def test_behavior_values_are_the_values_forward_embeds(make_batch):
    """One formula (compose_behaviors): the sums' values are bit-identical to the model's."""
    ranker = sdim_ranker(long_len=40)
    batch = make_batch(13, [25], [2])
    emb = ranker.model.embedding(batch)
    vals = ranker.model.embedding.behavior_values(*(batch.history_values(k) for k in
                                                    (HIST_ITEM_ID, HIST_CATEGORY, HIST_ACTION)))
    assert torch.equal(vals, emb.values)


def test_a_model_without_sdim_ignores_sums(make_batch):
    torch.manual_seed(0)
    model = RankerModel(tiny_config(False, "full", 1), embedding_device="cpu").eval()
    batch = make_batch(14, [20], [3])
    fake = with_sums(batch, torch.ones(1, 4, 4, 16), torch.tensor([20]))
    with torch.no_grad():
        torch.testing.assert_close(model(fake).logits, model(batch).logits)


def test_validate_batch_names_bad_sums(make_batch):
    batch = make_batch(15, [5, 6], [1, 1])
    with pytest.raises(BatchValidationError, match="sdim_sums: shape"):
        validate_batch(with_sums(batch, torch.zeros(3, 4, 4, 16), torch.tensor([5, 6])))
    with pytest.raises(BatchValidationError, match="go together"):
        validate_batch(dataclasses.replace(batch, sdim_sums=torch.zeros(2, 4, 4, 16)))
    with pytest.raises(BatchValidationError, match="sdim_lengths"):
        validate_batch(with_sums(batch, torch.zeros(2, 4, 4, 16), torch.tensor([5])))


def test_bucket_sums_rejects_ragged_columns():
    ranker = sdim_ranker()
    with pytest.raises(ValueError, match="parallel 1-D"):
        ranker.bucket_sums(np.arange(3), np.arange(3), np.arange(2), np.arange(3))


def test_signature_codes_unpack_like_the_kernel():
    from kernels import unpack_codes

    ranker = sdim_ranker()
    sigs = ranker.behavior_signatures(np.arange(1, 300)).numpy()
    m, tau = ranker.signature_bits
    np.testing.assert_array_equal(ranker.signature_codes(sigs), unpack_codes(torch.from_numpy(sigs), m, tau).numpy())
