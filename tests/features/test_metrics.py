import numpy as np
import pytest

from features.train.metrics import auc, gauc, logloss, topk_metrics


def _auc_bruteforce(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = rng.integers(0, 2, 200)
    assert auc(s, y) == pytest.approx(_auc_bruteforce(s, y))
    assert np.isnan(auc(s, np.ones(200)))


def test_gauc_weights_users_by_samples_and_skips_one_class_users():
    s = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.4, 0.3])
    y = np.array([1, 0, 1, 0, 1, 1, 1])
    g = np.array([1, 1, 2, 2, 3, 3, 3])  # user 3 has only positives
    assert gauc(s, y, g) == pytest.approx((1.0 * 2 + 0.0 * 2) / 4)


def test_logloss_and_topk():
    assert logloss(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(np.log(2))
    m = topk_metrics(np.array([0, 9, 10, 499, 1000]), ks=(10,), recall_ks=(500,))
    assert m["hr@10"] == pytest.approx(2 / 5)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(11)) / 5)
    assert m["recall@500"] == pytest.approx(4 / 5)
