"""The candidate features the server builds from the catalog equal the reader's for the same items
(category, tags and every hashed ``item_attr_<key>``), on real ML-100K features built by Spark."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_catalog_candidate_features_equal_the_readers(ml100k_features, ml100k_dataset):
    from features.reader import FeatureStore
    from serving.catalog import load_catalog

    store = FeatureStore(ml100k_features)
    catalog = load_catalog(ml100k_dataset)
    ids = np.concatenate([catalog.item_ids, [10_000_000]])  # every item + one the catalog lacks
    want = store.candidate_features(ids)
    got = catalog.candidate_features(ids)
    assert set(got) == set(want)
    assert any(k.startswith("item_attr_") for k in got)
    for key, (values, lengths) in got.items():
        assert np.array_equal(lengths, want[key][1]), f"{key}: lengths"
        assert np.array_equal(values, want[key][0]), f"{key}: values"
