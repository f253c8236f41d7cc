"""Exact inner products of queries with chosen rows, by FAISS's kernel, and the best of them: the
one home of the scoring and choosing every re-ranking path uses (faiss_index scoring fetched
candidates, store.vectors scoring a large file read in order, probes choosing lists), so that
their scores agree bit for bit and equal scores are chosen alike."""

from __future__ import annotations

import faiss
import numpy as np


def inner_products_by_idx(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """x[i] . y[ids[i, j]] for each query i and its j-th row, shape ids.shape; -inf where
    ids[i, j] is -1. `y` is read in place (a memory-mapped file is fine), so it must already be
    float32 and C-contiguous; FAISS multithreads over the queries."""
    if y.dtype != np.float32 or y.ndim != 2 or not y.flags.c_contiguous:
        raise ValueError(f"rows must be a C-contiguous float32 matrix, got {y.dtype} {y.shape}")
    x = np.ascontiguousarray(x, np.float32)
    ids = np.ascontiguousarray(ids, np.int64)
    if x.ndim != 2 or x.shape[1] != y.shape[1] or ids.ndim != 2 or len(ids) != len(x):
        raise ValueError(f"need queries (n, {y.shape[1]}), ids (n, m); got {x.shape}, {ids.shape}")
    out = np.empty(ids.shape, np.float32)
    if out.size:
        faiss.fvec_inner_products_by_idx(  # type: ignore[attr-defined]  # not in faiss's stubs
            faiss.swig_ptr(out),
            faiss.swig_ptr(x),
            faiss.swig_ptr(y),
            faiss.swig_ptr(ids),
            x.shape[1],
            ids.shape[0],
            ids.shape[1],
        )
    return out


def paired_inner_products(rows: np.ndarray, queries: np.ndarray, which: np.ndarray) -> np.ndarray:
    """rows[i] . queries[which[i]] for each row i. The queries are read in place, not gathered
    into a copy a row (at 10^7 images, a batch's 2 million candidates would copy 4 GB of
    query vectors); the scores are bit for bit those of the pairs' own kernel calls."""
    rows = np.ascontiguousarray(rows, np.float32)
    which = np.asarray(which, np.int64)
    if rows.ndim != 2 or which.shape != (len(rows),):
        raise ValueError(
            f"need rows (n, d) and one query index a row, got {rows.shape}, {which.shape}"
        )
    queries = np.ascontiguousarray(queries, np.float32)
    return inner_products_by_idx(rows, queries, which[:, None])[:, 0]


#: grouped_inner_products scores a row with at most this many of its queries in place; a row
#: wanted by more (a hub, near many images) is copied for the others, so that one such row does
#: not widen the table of every row's queries.
GROUP_WIDTH = 16


def grouped_inner_products(
    rows: np.ndarray, group: np.ndarray, queries: np.ndarray, which: np.ndarray
) -> np.ndarray:
    """rows[group[i]] . queries[which[i]] for each i, `group` non-decreasing from 0 (each row's
    pairs together, every row in some): a row wanted by several queries is converted and read
    once for them all, not copied once a pair (an all-pairs batch at 10^7 wants a million of
    its rows twice or more); bit for bit paired_inner_products' scores (the same kernel on the
    same two vectors)."""
    group = np.asarray(group, np.int64)
    which = np.asarray(which, np.int64)
    if not len(group):
        return np.empty(0, np.float32)
    rows = np.ascontiguousarray(rows, np.float32)
    first = np.r_[True, group[1:] != group[:-1]]
    slot = np.arange(len(group)) - np.flatnonzero(first)[group]  # a pair's place in its group
    width = min(int(slot.max()) + 1, GROUP_WIDTH)
    inside = slot < width
    ids = np.full((len(rows), width), -1, np.int64)
    ids[group[inside], slot[inside]] = which[inside]
    queries = np.ascontiguousarray(queries, np.float32)
    out = np.empty(len(group), np.float32)
    out[inside] = inner_products_by_idx(rows, queries, ids)[group[inside], slot[inside]]
    if not inside.all():
        out[~inside] = paired_inner_products(rows[group[~inside]], queries, which[~inside])
    return out


def top_k(scores: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of candidate scores (-inf: none), best first; of equal scores the
    larger id first, so which of two equal candidates is kept depends neither on their order
    among the candidates nor on which way a batch was scored (fetched or read in order)."""
    k = min(k, scores.shape[1])
    if 0 < k < scores.shape[1]:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part = np.take_along_axis(scores, top, axis=1)
        # rows where a candidate left out scores as high as the lowest kept: choose by id
        tied = np.flatnonzero(np.count_nonzero(scores >= part.min(axis=1)[:, None], axis=1) > k)
        if len(tied):
            top[tied] = np.lexsort((-cand[tied], -scores[tied]), axis=1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(k), (scores.shape[0], k))
    part = np.take_along_axis(scores, top, axis=1)
    ids = np.take_along_axis(cand, top, axis=1)
    order = np.lexsort((-ids, -part), axis=1)
    out_s = np.take_along_axis(part, order, axis=1).astype(np.float32, copy=False)
    out_i = np.take_along_axis(ids, order, axis=1)
    missing = ~np.isfinite(out_s)
    out_s[missing] = -np.inf
    out_i = np.where(missing, -1, out_i).astype(np.int64)
    return out_s, out_i
