"""Exact inner products of queries with chosen rows, by FAISS's kernel: the one home of the
scoring every re-ranking path uses (faiss_index scoring fetched candidates, store.vectors scoring
a large file read in order), so that their scores agree bit for bit."""

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
