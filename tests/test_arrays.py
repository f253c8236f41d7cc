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


def test_found_at_is_the_position_of_each_value_or_minus_one():
    """arrays.found_at: where each needle sits in a sorted haystack (the first of a repeated
    value), -1 where it is not there, in the needles' shape; the same as a search one by one,
    with np.searchsorted or a search that sorts its needles first."""
    from cbir.arrays import found_at

    rng = np.random.default_rng(3)
    hay = np.sort(rng.integers(0, 500, 300)).astype(np.uint64)
    needles = rng.integers(0, 520, (40, 7)).astype(np.uint64)
    first = {int(v): i for i, v in reversed(list(enumerate(hay)))}
    want = np.vectorize(lambda v: first.get(int(v), -1))(needles)

    def sorting_first(h, n):
        flat = n.reshape(-1)
        order = np.argsort(flat)
        out = np.empty(flat.shape, np.int64)
        out[order] = np.searchsorted(h, flat[order])
        return out.reshape(n.shape)

    np.testing.assert_array_equal(found_at(hay, needles), want)
    np.testing.assert_array_equal(found_at(hay, needles, sorting_first), want)
    assert (want >= 0).any() and (want < 0).any()
    assert found_at(hay[:0], needles).shape == (40, 7) and (found_at(hay[:0], needles) < 0).all()
    assert found_at(hay, needles[:0]).shape == (0, 7)
