"""The inverted lists a stored vector's search probes, chosen around the list it lies in.

An all-pairs search's queries are the indexed vectors themselves, and each already lies in the
list of its nearest centroid (found when it was added). Its probed lists are the best, by exact
inner product, among that list's NEAR_LISTS nearest lists (itself included): NEAR_LISTS
products a query instead of one with every centroid, which at 10^7 images (8,192 centroids of
512 dimensions) was about a third of the all-pairs search's time.

Every product here is FAISS's per-pair kernel and every choice cbir.scoring's top_k (equal
scores ranked by list number), so a vector's probed lists depend on it and the index alone: not
on the other queries of its batch, the batch's size or the thread count (a Dask worker searching
a shard probes what one process searching everything probes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import cached_property

import faiss
import numpy as np

from .arrays import unique_sorted
from .scoring import inner_products_by_idx, top_k

#: Lists near a list among which a vector lying in it chooses its probed lists. At 10^7 images
#: (8,192 lists, 2 probed, 39,066 queries) 32, 64 and 128 found the pairs comparing every
#: centroid finds, every one; 64 searched fastest (5,536-5,584 queries a second, against
#: 2,904-4,496 comparing every centroid, in alternating rounds).
NEAR_LISTS = 64
#: Centroid products computed at a time while finding near lists (with their ids: 192 MiB).
_BLOCK_PRODUCTS = 1 << 24


def list_ids(ivf: faiss.IndexIVF) -> Iterator[tuple[int, np.ndarray]]:
    """(list, the ids it holds) for every non-empty list; the ids are a view, valid until the
    next list is read (a layered index's lists are built for the reader and freed after)."""
    inv = ivf.invlists
    assert inv is not None, "an IVF index always has inverted lists"
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n:
            held = inv.get_ids(lst)
            try:
                yield lst, faiss.rev_swig_ptr(held, n)
            finally:
                inv.release_ids(lst, held)  # type: ignore[attr-defined]  # not in stubs


def stored_lists(
    ivf: faiss.IndexIVF, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lists): every stored id, sorted, and the list holding it; with `ids`, those ids
    (sorted, distinct), each with its list or -1 where the index does not hold it. Either way
    every list's ids are read once (at 10^7 images, 80 MB)."""
    want = None if ids is None else unique_sorted(np.asarray(ids, np.int64))
    if want is not None and not len(want):
        return want, np.zeros(0, np.int64)
    found: list[np.ndarray] = []
    where: list[np.ndarray] = []
    for lst, held in list_ids(ivf):
        if want is not None:
            held = held[want[np.minimum(np.searchsorted(want, held), len(want) - 1)] == held]
        found.append(np.array(held, np.int64))
        where.append(np.full(len(held), lst, np.int32))  # 10^7 of them: half the memory
    held_ids = np.concatenate(found) if found else np.zeros(0, np.int64)
    lists = np.concatenate(where) if where else np.zeros(0, np.int32)
    if want is not None:
        out = np.full(len(want), -1, np.int64)
        out[np.searchsorted(want, held_ids)] = lists
        return want, out
    order = np.argsort(held_ids, kind="stable")
    return held_ids[order], lists[order]


def lists_of(ivf: faiss.IndexIVF, ids: np.ndarray) -> np.ndarray:
    """The list holding each of `ids` (any order, repeats allowed), -1 where none does."""
    ids = np.asarray(ids, np.int64)
    want, lists = stored_lists(ivf, ids)
    return lists[np.searchsorted(want, ids)] if len(ids) else np.zeros(0, np.int64)


class NearLists:
    """Each list's NEAR_LISTS nearest lists (by their centroids' inner product), computed for a
    list the first time a query lying in it is searched, or all restored from a table kept for
    the same centroids (`digest`), and the probed lists of such queries."""

    def __init__(self, ivf: faiss.IndexIVF, near: int = NEAR_LISTS) -> None:
        self.centroids = np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), np.float32)
        self.nlist = ivf.nlist
        self.m = min(near, ivf.nlist)
        self._near = np.full((ivf.nlist, self.m), -1, np.int64)
        self._known = np.zeros(ivf.nlist, bool)

    @cached_property
    def digest(self) -> str:
        """What the near lists follow from (the centroids and m): a table kept under this
        digest is these near lists."""
        h = hashlib.sha256(f"near lists m={self.m} nlist={self.nlist}:".encode())
        h.update(self.centroids.tobytes())
        return h.hexdigest()

    @property
    def complete(self) -> bool:
        """Whether every list's near lists are known (computed or restored)."""
        return bool(self._known.all())

    def table(self) -> np.ndarray:
        """Every list's near lists, shape (nlist, m), computing those not known yet."""
        return self.near(np.arange(self.nlist, dtype=np.int64))

    def restore(self, table: np.ndarray) -> None:
        """Take every list's near lists from `table` (what `table()` gave for this digest)."""
        table = np.asarray(table)
        if table.shape != self._near.shape or (
            len(table) and (table.min() < 0 or table.max() >= self.nlist)
        ):
            raise ValueError(f"near lists of shape {self._near.shape} wanted, got {table.shape}")
        self._near[:] = table
        self._known[:] = True

    def near(self, lists: np.ndarray) -> np.ndarray:
        """The nearest lists of each of `lists`, shape (len(lists), m), nearest first."""
        lists = np.asarray(lists, np.int64)
        todo = unique_sorted(lists[~self._known[lists]])
        everyone = np.arange(self.nlist, dtype=np.int64)
        step = max(1, _BLOCK_PRODUCTS // self.nlist)
        for at in range(0, len(todo), step):
            part = todo[at : at + step]
            ids = np.ascontiguousarray(np.broadcast_to(everyone, (len(part), self.nlist)))
            scores = inner_products_by_idx(self.centroids[part], self.centroids, ids)
            self._near[part] = top_k(scores, ids, self.m)[1]
            self._known[part] = True
        return self._near[lists]

    def probes(
        self, queries: np.ndarray, own: np.ndarray, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(inner products, lists) of each query's `nprobe` probed lists, best first: the best
        among the lists nearest to `own`, the list each query lies in."""
        cand = self.near(own)
        scores = inner_products_by_idx(queries, self.centroids, cand)
        return top_k(scores, cand, min(nprobe, self.m))


#: What a search needs to probe around each query's own list: the index's near lists and the
#: list each query lies in (-1: not a stored vector, whose lists are found among all centroids).
Own = tuple[NearLists, np.ndarray]
