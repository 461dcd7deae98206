"""The reader turns Spark-built features into Batches that validate, slice histories point-in-time,
split across ranks deterministically and shuffle per epoch."""
import json
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features import layout
from features.batch import HIST_ACTION, HIST_CATEGORY, HIST_ITEM_ID, HIST_TS, ITEM_CATEGORY, ITEM_ID, ITEM_TAG, validate_batch
from features.reader import FeatureStore, FeatureStoreError, ReaderConfig
from features.transforms import counter_columns

pytestmark = pytest.mark.integration  # the features directories are built by Spark


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Batches are small: with 2 intra-op threads on a busy 2-core machine torch.cat waits on thread
    # barriers (~10 ms per call). One thread here; restored for the other tests.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ml100k_store(ml100k_features):
    return FeatureStore(ml100k_features)


@pytest.fixture(scope="module")
def small_store(small_features):
    return FeatureStore(small_features)


def _keys(b):
    """(user, item, ts) of every candidate of a ranking batch."""
    return list(zip(b.user_ids().tolist(), b.candidate_item_ids().tolist(), b.request_ts.tolist()))


def test_ranking_batches_cover_the_split_and_validate(ml100k_store, ml100k_features):
    t = pq.read_table(ml100k_features / layout.split_dir(layout.RANKING_SAMPLES, "valid"))
    want = Counter(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), t["ts_ms"].to_pylist()))
    got = Counter()
    spec = ml100k_store.ranking_spec()
    for b in ml100k_store.ranking_batches("valid", ReaderConfig(batch_size=700)):
        validate_batch(b, spec)
        assert b.batch_size <= 700 and b.labels.shape == (b.batch_size, 1)
        assert b.user_dense.shape[1] == len(ml100k_store.user_dense_names) == 8
        assert b.candidate_dense.shape[1] == len(ml100k_store.candidate_dense_names) == 9  # + item_num_year
        got.update(_keys(b))
    assert got == want


def test_history_is_the_capped_timeline_before_the_sample(ml100k_store):
    cap = 7
    b = next(ml100k_store.ranking_batches("test", ReaderConfig(batch_size=300, long_cap=cap, shuffle=False)))
    lengths = b.history_lengths().tolist()
    offsets = b.history_offsets().tolist()
    assert max(lengths) == cap
    for i, (u, ts) in enumerate(zip(b.user_ids().tolist(), b.request_ts.tolist())):
        tl = ml100k_store.timeline(u)
        h = int(np.searchsorted(tl.ts_ms, ts, side="left"))  # behaviors strictly before the sample
        s = slice(offsets[i], offsets[i + 1])
        lo = max(0, h - cap)
        assert b.history_values(HIST_ITEM_ID)[s].tolist() == tl.item_ids[lo:h].tolist()
        assert b.history_values(HIST_TS)[s].tolist() == tl.ts_ms[lo:h].tolist()
        assert b.history_values(HIST_ACTION)[s].tolist() == tl.actions[lo:h].tolist()
        assert b.history_values(HIST_CATEGORY)[s].tolist() == tl.categories[lo:h].tolist()


def test_dense_features_come_from_the_transforms(ml100k_store, ml100k_features):
    stats = ml100k_store.dense.stats
    t = pq.read_table(ml100k_features / layout.split_dir(layout.RANKING_SAMPLES, "train"))
    first = pq.ParquetFile(sorted((ml100k_features / layout.split_dir(layout.RANKING_SAMPLES, "train")).glob("*.parquet"))[0])
    rg = first.read_row_group(0).slice(0, 64)
    b = next(ml100k_store.ranking_batches("train", ReaderConfig(batch_size=64, shuffle=False)))
    assert b.candidate_item_ids().tolist() == rg["item_id"].to_pylist()
    cols = {c: rg[c].to_numpy() for c in counter_columns("user", stats) + counter_columns("item", stats)}
    assert torch.equal(b.user_dense, torch.from_numpy(ml100k_store.dense.user_dense(cols)))
    years = ml100k_store.item_numeric["year"][ml100k_store.items.rows(rg["item_id"].to_numpy())[0]]
    want = ml100k_store.dense.candidate_dense(cols, {"year": years})
    assert torch.equal(b.candidate_dense, torch.from_numpy(want))
    assert t.num_rows == ml100k_store.num_ranking_rows("train")


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_shares(ml100k_store, world_size):
    cfg = ReaderConfig(batch_size=256, seed=3)
    per_rank = [list(ml100k_store.ranking_batches("train", cfg, epoch=1, rank=r, world_size=world_size))
                for r in range(world_size)]
    assert len({len(bs) for bs in per_rank}) == 1 and len(per_rank[0]) > 10
    assert all(b.batch_size == 256 for bs in per_rank for b in bs)
    seen = [set(k for b in bs for k in _keys(b)) for bs in per_rank]
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not seen[i] & seen[j]
    total = sum(len(s) for s in seen)
    assert total >= ml100k_store.num_ranking_rows("train") - world_size * 256  # only the last partial batches


def test_more_ranks_than_row_groups_still_split_rows(small_store, small_features):
    t = pq.read_table(small_features / layout.split_dir(layout.RANKING_SAMPLES, "test"))
    rows = Counter(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), t["ts_ms"].to_pylist()))
    per_rank = [list(small_store.ranking_batches("test", ReaderConfig(batch_size=16), rank=r, world_size=8))
                for r in range(8)]
    n = {len(bs) for bs in per_rank}
    assert len(n) == 1 and (n := n.pop()) == (t.num_rows // 8) // 16 and n >= 1
    keys = Counter(k for bs in per_rank for b in bs for k in _keys(b))
    assert sum(keys.values()) == 8 * n * 16 and not keys - rows  # disjoint shares of the split's rows


def test_shuffle_is_seeded_per_epoch(ml100k_store):
    def order(epoch, seed=0, shuffle=True):
        cfg = ReaderConfig(batch_size=512, seed=seed, shuffle=shuffle, shuffle_buffer_rows=4096)
        return [k for b in ml100k_store.ranking_batches("valid", cfg, epoch=epoch) for k in _keys(b)]

    a = order(0)
    assert a == order(0) and a != order(1) and a != order(0, seed=1)
    assert sorted(a) == sorted(order(1))
    assert order(0, shuffle=False) == order(5, shuffle=False)


def test_retrieval_train_batches_are_every_prefix(small_store):
    max_len = 5
    batches = list(small_store.retrieval_batches("train", ReaderConfig(batch_size=32, shuffle=False), max_len=max_len))
    users = [u for b in batches for u in b.user_ids().tolist()]
    assert len(users) == len(set(users)) == int((small_store.retrieval_train_len >= 2).sum())
    b = batches[0]
    validate_batch(b, small_store.retrieval_spec(max_len))
    offs, coffs = b.history_offsets().tolist(), [0, *np.cumsum(b.num_candidates.tolist()).tolist()]
    cand = b.candidate_item_ids().tolist()
    for i, u in enumerate(b.user_ids().tolist()):
        tl = small_store.timeline(u)
        n_train = int(small_store.retrieval_train_len[small_store.timeline_users.rows(np.array([u]))[0][0]])
        seq = tl.item_ids[max(0, n_train - max_len - 1):n_train].tolist()
        assert b.history_values(HIST_ITEM_ID)[offs[i]:offs[i + 1]].tolist() == seq[:-1]
        assert cand[coffs[i]:coffs[i + 1]] == seq[1:]
        assert int(b.request_ts[i]) == int(tl.ts_ms[n_train - 1])
    assert torch.allclose(b.candidate_dense[:, 0].double(), torch.from_numpy(small_store.logq(np.array(cand))))


@pytest.mark.parametrize("split", ["valid", "test"])
def test_retrieval_eval_batches_hold_out_the_last_items(small_store, small_features, split):
    t = pq.read_table(small_features / layout.split_dir(layout.RETRIEVAL_SAMPLES, split))
    target = dict(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist()))
    n = 0
    for b in small_store.retrieval_batches(split, ReaderConfig(batch_size=50), max_len=None):
        validate_batch(b, small_store.retrieval_spec(None))
        offs = b.history_offsets().tolist()
        for i, (u, item) in enumerate(zip(b.user_ids().tolist(), b.candidate_item_ids().tolist())):
            assert target[u] == item
            tl = small_store.timeline(u).item_ids.tolist()
            k = len(tl) - (2 if split == "valid" else 1)
            assert tl[k] == item and b.history_values(HIST_ITEM_ID)[offs[i]:offs[i + 1]].tolist() == tl[:k]
            n += 1
        seen, lens = small_store.items_before(b.user_ids().numpy(), b.history_lengths().numpy())
        assert lens.tolist() == b.history_lengths().tolist() and seen.tolist() == b.history_values(HIST_ITEM_ID).tolist()
        capped = next(small_store.retrieval_batches(split, ReaderConfig(batch_size=50, shuffle=False), max_len=2))
        seen, lens = small_store.seen_items(capped.user_ids().numpy(), split)  # uncapped, unlike the history
        want = [small_store.timeline(u).item_ids.tolist() for u in capped.user_ids().tolist()]
        want = [tl[:len(tl) - (2 if split == "valid" else 1)] for tl in want]
        assert lens.tolist() == [len(w) for w in want] and seen.tolist() == [i for w in want for i in w]
        assert max(capped.history_lengths().tolist()) <= 2
    assert n == len(target)
    users = np.array(sorted(target))
    vals, lens = small_store.train_items(users)
    assert lens.tolist() == [len(small_store.timeline(u)) - 2 for u in users.tolist()]


def test_missing_timeline_item_and_attributes_are_empty(small_store):
    rows = [(b, i) for b in small_store.ranking_batches("train", ReaderConfig(batch_size=4096, shuffle=False))
            for i in range(b.batch_size)]
    by_user = {}
    for b, i in rows:
        by_user.setdefault(int(b.user_ids()[i]), []).append((b, i))
    b, i = by_user[9004][0]  # impressions only: no timeline
    assert int(b.history_lengths()[i]) == 0
    for b, i in [x for x in rows if int(x[0].candidate_item_ids()[x[1]]) == 90099]:  # not in the items table
        for key in (ITEM_CATEGORY, ITEM_TAG):
            assert int(b.candidates[key].lengths()[i]) == 0
        assert float(b.candidate_dense[i, -1]) == 0.0  # missing numeric attribute -> 0
    b, i = next(x for x in rows if int(x[0].candidate_item_ids()[x[1]]) == 90010)
    assert int(b.candidates[ITEM_CATEGORY].lengths()[i]) == 2 and int(b.candidates[ITEM_TAG].lengths()[i]) == 2
    assert int(b.candidates[ITEM_ID].lengths()[i]) == 1


def test_inconsistent_directory_is_rejected(small_features, tmp_path):
    with pytest.raises(FeatureStoreError, match="no manifest.json"):
        FeatureStore(tmp_path)
    bad = tmp_path / "features"
    shutil.copytree(small_features, bad)
    t = pq.read_table(bad / layout.TIMELINES)
    cut = pa.array([v[:1] for v in t["ts_ms"].to_pylist()], pa.list_(pa.int64()))
    short = t
    for f in layout.TIMELINE_FIELDS:
        short = short.set_column(short.schema.get_field_index(f), f, pa.array([v[:1] for v in t[f].to_pylist()], pa.list_(pa.int64())))
    assert cut is not None
    shutil.rmtree(bad / layout.TIMELINES)
    (bad / layout.TIMELINES).mkdir()
    pq.write_table(short, bad / layout.TIMELINES / "part-0.parquet")
    store = FeatureStore(bad)
    with pytest.raises(FeatureStoreError, match=r"has hist_len \d+ but 1 behaviors"):
        for _ in store.ranking_batches("test", ReaderConfig(batch_size=4096)):
            pass
    m = json.loads((bad / "manifest.json").read_text())
    m["feature_set_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FeatureStoreError, match="feature_set_version 99"):
        FeatureStore(bad)
