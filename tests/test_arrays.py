"""cbir.arrays: distinct values by sorting give what np.unique gives."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.arrays import all_distinct, unique_sorted
from cbir.faiss_index import _as_ids


@pytest.mark.parametrize("high", [5, 2**62])
def test_unique_sorted_is_np_unique(high):
    rng = np.random.default_rng(0)
    values = rng.integers(-high, high, size=(300, 7))
    got = unique_sorted(values)
    assert got.dtype == values.dtype
    np.testing.assert_array_equal(got, np.unique(values))
    assert unique_sorted(np.zeros(0, np.int64)).shape == (0,)


def test_all_distinct():
    assert all_distinct(np.arange(10)[::-1])
    assert all_distinct(np.zeros(0, np.int64))
    assert not all_distinct(np.array([3, 1, 2, 1]))
    with pytest.raises(ValueError, match="unique"):  # the index's ids: checked by it
        _as_ids(np.array([4, 9, 4]), 3)
