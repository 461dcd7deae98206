"""Fixtures of the ranker tests (helpers live in tests/ranking/batches.py)."""
from __future__ import annotations

import pytest

from tests.ranking.batches import random_batch, select


@pytest.fixture()
def make_batch():
    return random_batch


@pytest.fixture()
def select_batch():
    return select
