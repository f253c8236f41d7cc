"""FAISS near-duplicate index over L2-normalised float32 descriptors, searched by inner product.

Two layouts, picked by :func:`choose_params` from the collection size:

* ``flat``  - ``IndexIDMap2(IndexFlatIP)``: exact, used while the collection is too small to train
  IVF/PQ codebooks sensibly (and while brute force is cheap anyway).
* ``sq8`` / ``ivfsq8`` - 8-bit scalar quantisation, exact scan or inverted lists: for the local
  descriptors of cbir.votes (many short vectors per picture, searched without re-ranking), picked
  by :func:`choose_sq8_params`.
* ``ivfpq`` - ``[OPQ rotation ->] IndexIVFPQ`` (inner-product metric, 8-bit codes, int64 ids held by
  the inverted lists). The in-memory index only keeps ``m``-byte PQ codes plus 8-byte ids, so with
  the default 64-byte budget a vector costs ~72 B plus the shared tables (coarse centroids, PQ
  codebooks, OPQ matrix), i.e. < 80 B/vector at 1M x 512.

Why not ``IndexRefineFlat``: it keeps every full float vector in RAM (4*d bytes: 2048 B/vector at
d=512), 25x over the memory budget. Instead the approximate search returns ``k * k_factor``
candidates and :func:`search` re-scores them *exactly* from vectors that live outside the index (the
embeddings on disk, memory-mapped, or a caller-supplied lookup). Re-ranking only touches
``k * k_factor`` rows per query, so it costs a few hundred KB of reads per query, not a scan.

``build_index`` tunes ``nprobe`` (and, if PQ precision is the bottleneck, ``k_factor``) on held-out
queries sampled from the data until re-ranked recall@k reaches the target, then halves
``k_factor`` for twice ``nprobe`` while the target holds (fewer vectors to read and re-score),
and records the measured recall in :class:`IndexInfo`. ``save_index``/``load_index`` persist the
index plus a JSON sidecar that doubles as the commit marker and carries a checksum, so a torn or
stale pair is detected on load.

Everything is deterministic under ``seed`` for a given machine and thread count (numpy Generator
for sampling, FAISS k-means seeds for the coarse quantiser and PQ codebooks). FAISS uses all cores
(its OpenMP default); this module never changes the thread count.

Longer than 400 lines: building, tuning, updating and searching (with exact re-ranking) one index
family.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import faiss
import numpy as np

from .arrays import all_distinct, unique_sorted
from .errors import CbirError
from .probes import NearLists, Own, list_ids, lists_of
from .scoring import inner_products_by_idx, top_k

log = logging.getLogger(__name__)

#: Below this many vectors the index is exact (flat). FAISS wants >= 39 training points per
#: centroid, and each PQ sub-quantiser has 256 centroids (8 bits): 39 * 256 = 9984 points. Under
#: that the codebooks are under-trained, and brute force over < 10k vectors costs < 1 ms/query.
FLAT_MAX_N = 39 * 256

#: How many candidates per wanted result the approximate stage returns for exact re-ranking.
DEFAULT_K_FACTOR = 10
#: Lower bound when build-time tuning trades candidates for probed lists: at least twice the
#: candidates wanted, so that re-ranking still corrects the PQ ranking.
MIN_K_FACTOR = 2
#: Upper bound when build-time tuning raises k_factor (PQ precision is the bottleneck).
MAX_K_FACTOR = 64
#: Held-out queries used to tune nprobe at build time.
N_TUNE_QUERIES = 1000
#: Most vectors sampled to train an IVF index: the sample is the one thing index building holds
#: in memory whole (see choose_params).
MAX_TRAIN = 1 << 20
#: Vectors added per FAISS call: bounds the temporary copies (OPQ-rotated batch, assignments).
ADD_CHUNK = 65536

#: Vectors for re-ranking: an array whose row ``i`` is the vector with id ``i`` (a memmap is fine),
#: or a callable that maps a sorted 1-D int64 array of unique ids to a ``(len(ids), dim)`` array.
VectorSource = np.ndarray | Callable[[np.ndarray], np.ndarray]
#: Re-ranking with a callable source: a batch whose distinct candidates are at most RERANK_DISTINCT
#: is fetched at once (256 MiB of float32 at d=512), a larger one a block of queries at a time,
#: RERANK_ROWS candidates a block (32 MiB). Measured with knn_pairs (110 candidates per query,
#: batches of 4096, CPU time per query): at 10^6 vectors blocks of 2^14 took 444 us, the whole
#: batch 714 us (2^13-2^15 alike, 2^16 and up slower); at 10^5, 354 us and 241 us.
RERANK_DISTINCT = 1 << 17
RERANK_ROWS = 1 << 14


class Scorer(Protocol):
    """A callable vector source that can also score candidates itself (cbir.store.vectors reads
    a large file in order rather than a row at a time): the inner products of each query with
    its candidate ids (nq, nc; -1 = none: -inf), or None where it would only fetch them."""

    def __call__(self, ids: np.ndarray) -> np.ndarray: ...

    def inner_products(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray | None: ...


class Rows(Protocol):
    """Vectors that are read a slice or a set of rows at a time (an array, or
    cbir.store.vectors.Vectors: a memory-mapped file never loaded whole)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any) -> np.ndarray: ...


#: Rows compared at a time by exact_search (512 MiB of float32 at d=512).
EXACT_CHUNK = 1 << 18


@dataclass
class IndexParams:
    """How the index is laid out. JSON-serialisable via :meth:`to_dict` / :meth:`from_dict`."""

    kind: Literal["flat", "ivfpq", "sq8", "ivfsq8"]
    nlist: int = 0  # inverted lists (coarse centroids); 0 for flat
    m: int = 0  # PQ sub-quantisers = bytes per code at 8 bits; 0 for flat
    nbits: int = 0  # bits per sub-quantiser code; 0 for flat
    nprobe: int = 1  # starting point; build_index stores the tuned value in IndexInfo
    refine: bool = False  # candidates are re-ranked exactly from externally stored vectors
    k_factor: int = 1  # candidates fetched per wanted result when refining
    opq: bool = False  # OPQ rotation before the IVF (better PQ codes at the same byte budget)
    train_size: int = 0  # vectors sampled to train the coarse quantiser and codebooks
    metric: str = "inner_product"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def code_bytes(self, dim: int) -> int:
        """Bytes the index stores per vector for its code, ids excluded."""
        if self.kind in ("sq8", "ivfsq8"):
            return dim
        return 4 * dim if self.kind == "flat" else math.ceil(self.m * self.nbits / 8)


@dataclass
class IndexInfo:
    """What was built and how well it does; written to the JSON sidecar."""

    params: IndexParams
    n_vectors: int
    dim: int
    trained_size: int  # collection size the quantiser was sized and trained for
    recall_at_k: float  # measured at build time against exact search (re-ranked if refine)
    nprobe: int  # tuned nprobe that search() applies
    build_seconds: float
    k: int = 10  # the k recall was measured at
    k_factor: int = 1  # tuned candidates-per-result for re-ranking
    model_fingerprint: str = ""  # set by the caller: which embedding model produced the vectors
    faiss_version: str = field(default_factory=lambda: faiss.__version__)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["params"] = self.params.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["params"] = IndexParams.from_dict(d["params"])
        return cls(**kw)


# --------------------------------------------------------------------------- parameter choice


def _pow2_floor(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1.0))))


def choose_params(
    n: int,
    dim: int,
    *,
    bytes_per_vector: int = 64,
    min_points_per_centroid: int = 30,
    max_points_per_centroid: int = 256,
    opq: bool = False,
) -> IndexParams:
    """Pick the index layout for ``n`` vectors of dimension ``dim`` (autofaiss-style rules).

    * ``n < FLAT_MAX_N`` (9984): exact flat search.
    * ``nlist`` = 4*sqrt(n) rounded *down* to a power of two (autofaiss rounds to the nearest;
      rounding down keeps the coarse centroids <= 16*dim/sqrt(n) bytes per vector - 8 B at
      1M x 512 - which is what lets the whole index stay within 80 B/vector, and halves k-means
      time on small machines), then lowered so every centroid gets >= ``min_points_per_centroid``.
    * training sample = min(n, ``max_points_per_centroid`` * nlist, MAX_TRAIN), so k-means sees
      30-256 points per centroid (FAISS would subsample to 256 per centroid itself); MAX_TRAIN
      bounds the sample held in memory (2 GiB of float32 at d=512: 128 points per centroid at
      10^7 vectors, 64 at 3*10^7).
    * PQ: ``m`` = largest divisor of ``dim`` that fits ``bytes_per_vector`` (8 bits per code).
    * ``opq``: learn an OPQ rotation first (only when sub-quantisers span >= 2 dimensions). Off by
      default: on the benchmark data it did not change recall, while training it at d=512 costs
      ~80 s on 2 cores and 4*d*d bytes; worth trying on real embeddings with uneven variance.
    """
    if n < 0 or dim <= 0:
        raise ValueError(f"need n >= 0 and dim > 0, got n={n}, dim={dim}")
    if bytes_per_vector < 1:
        raise ValueError(f"bytes_per_vector must be >= 1, got {bytes_per_vector}")
    if not 1 <= min_points_per_centroid <= max_points_per_centroid:
        raise ValueError("need 1 <= min_points_per_centroid <= max_points_per_centroid")
    if n < max(FLAT_MAX_N, min_points_per_centroid):
        return IndexParams(kind="flat", k_factor=1)

    nlist = min(_pow2_floor(4.0 * math.sqrt(n)), _pow2_floor(n / min_points_per_centroid))
    train_size = min(n, max_points_per_centroid * nlist, MAX_TRAIN)
    m = max(d for d in range(1, min(bytes_per_vector, dim) + 1) if dim % d == 0)
    return IndexParams(
        kind="ivfpq",
        nlist=nlist,
        m=m,
        nbits=8,
        nprobe=max(1, nlist // 64),
        refine=True,
        k_factor=DEFAULT_K_FACTOR,
        opq=opq and dim // m >= 2,
        train_size=train_size,
    )


def choose_sq8_params(n: int, *, min_points_per_centroid: int = 30) -> IndexParams:
    """8-bit scalar-quantised codes (a byte a dimension: RootSIFT is the square root of whole
    numbers <= 255, so 8 bits lose next to nothing), scanned whole below FLAT_MAX_N vectors,
    else in inverted lists sized as :func:`choose_params` sizes them, a 32nd of them probed
    (on benchmarks/partial.py's local descriptors that found the same votes as exact search)."""
    if n < FLAT_MAX_N:
        return IndexParams(kind="sq8", train_size=n)
    nlist = min(_pow2_floor(4.0 * math.sqrt(n)), _pow2_floor(n / min_points_per_centroid))
    return IndexParams(
        kind="ivfsq8",
        nlist=nlist,
        nbits=8,
        nprobe=max(1, nlist // 32),
        train_size=min(n, 256 * nlist),
    )


def estimate_bytes_per_vector(params: IndexParams, n: int, dim: int) -> float:
    """Expected index size per vector: code + 8-byte id + shared tables spread over ``n``.

    Shared tables: IVF-PQ keeps nlist coarse centroids (4*dim*nlist), PQ codebooks
    (4*dim*2**nbits) and, with OPQ, a dim x dim rotation; inverted lists add ~16 bytes each.
    """
    per_vector = params.code_bytes(dim) + 8
    if params.kind in ("flat", "sq8"):
        shared = 0.0
    else:
        shared = 4.0 * dim * params.nlist + 4.0 * dim * (1 << params.nbits) + 16.0 * params.nlist
        if params.opq:
            shared += 4.0 * dim * dim
    return per_vector + shared / max(n, 1)


# --------------------------------------------------------------------------- helpers


def _as_vectors(x: np.ndarray, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise CbirError(f"{what} have dimension {x.shape[1]} but the index has dimension {dim}")
    return x


def _as_ids(ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"got {ids.shape[0]} ids for {n} vectors")
    if n and ids.min() < 0:
        raise ValueError("ids must be >= 0 (-1 marks a missing result)")
    if n and not all_distinct(ids):
        raise ValueError("ids must be unique")
    return ids


def _check_normalised(x: Rows, sample: int = 10_000) -> None:
    """Inner product is only cosine similarity for unit vectors; check a sample (cheap at 1M)."""
    if x.shape[0] == 0:
        return
    rows = np.asarray(x[:: max(1, x.shape[0] // sample)], np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    if not np.allclose(norms, 1.0, atol=1e-2):  # loose: float16-stored embeddings pass
        raise CbirError(
            f"descriptors must be L2-normalised (norms range {norms.min():.4f}..{norms.max():.4f})"
        )


def ivf_part(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index (flat)
        return None


def probed_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF part whose lists a stored vector's search probes around its own (cbir.probes):
    None for a flat index, and for one that rotates its queries first (OPQ), whose lists are
    found among all centroids in the rotated space."""
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        return None
    return ivf_part(index)


# ---------------------------------------------------------------------- a main index and a delta


def empty_like(index: faiss.Index) -> faiss.Index:
    """A copy of a trained IVF index holding no vectors: its quantiser, codebooks and rotation,
    copied without reading its lists (a memory-mapped index's stay on disk)."""
    ivf = ivf_part(index)
    if ivf is None:
        raise ValueError("only an IVF index has an empty copy to add a delta to")
    held, n, owned = ivf.invlists, index.ntotal, ivf.own_invlists
    assert held is not None, "an IVF index always has inverted lists"
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # Python's: freed by Python
    ivf.own_invlists = False  # swapped out for the copy, not deleted
    ivf.replace_invlists(empty, False)
    _set_ntotal(index, 0)
    try:
        return faiss.clone_index(index)
    finally:
        ivf.replace_invlists(held, owned)
        _set_ntotal(index, n)


def layered(main: faiss.Index, delta: faiss.Index) -> faiss.Index:
    """One index searching `main` and `delta` (an empty_like of main, and what was added to it
    since): each list is main's entries then delta's (HStackInvertedLists), main's not copied,
    so main may stay memory-mapped. :func:`add_vectors` adds to the delta (`delta_of`); nothing
    can be removed. A search copies each probed list (FAISS's stacked lists): 0.75 s against 0.5
    for 5,000 raw PQ queries at 10^6 - for the nightly's few queries, not an all-pairs search."""
    shell = faiss.clone_index(delta)
    parts = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # not in stubs
    for part in (main, delta):
        ivf = ivf_part(part)
        assert ivf is not None
        parts.push_back(ivf.invlists)
    stacked = faiss.HStackInvertedLists(parts.size(), parts.data())
    shell_ivf = ivf_part(shell)
    assert shell_ivf is not None
    shell_ivf.replace_invlists(stacked, False)  # the clone's own lists deleted, stacked Python's
    # kept alive as long as the shell (FAISS's own attribute for it; others are refused)
    shell.referenced_objects = [_Layers(main, delta, (parts, stacked))]  # type: ignore[attr-defined]
    _set_ntotal(shell, main.ntotal + delta.ntotal)
    return shell


@dataclass(frozen=True)
class _Layers:
    main: faiss.Index
    delta: faiss.Index
    stack: object  # the stacked lists and their vector of pointers


def delta_of(index: faiss.Index) -> faiss.Index | None:
    """The delta of a :func:`layered` index (None for any other)."""
    refs = getattr(index, "referenced_objects", None)
    layers = refs[0] if isinstance(refs, list) and refs else None
    return layers.delta if isinstance(layers, _Layers) else None


def lists_holding(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The list of `index`'s IVF part holding each of `ids` (-1: none). A layered index's delta
    is looked in first: a night's new images were just added to it, and its lists are a small
    part of the index's (the main's hold 80 MB of ids at 10^7 images, 0.3 s to read); the ids
    it lacks are looked for in the whole. Its lists are numbered as the main's (empty_like)."""
    ivf = ivf_part(index)
    assert ivf is not None, "a flat index has no lists"
    ids = np.asarray(ids, np.int64)
    delta = delta_of(index)
    d_ivf = ivf_part(delta) if delta is not None else None
    if d_ivf is None:
        return lists_of(ivf, ids)
    out = lists_of(d_ivf, ids)
    if (missing := out < 0).any():
        out[missing] = lists_of(ivf, ids[missing])
    return out


def merged(main: faiss.Index, delta: faiss.Index) -> faiss.Index:
    """`main` (read into memory) with `delta`'s entries moved into its lists: a plain index."""
    ivf, d_ivf = ivf_part(main), ivf_part(delta)
    assert ivf is not None and d_ivf is not None
    ivf.merge_from(d_ivf, 0)
    _set_ntotal(main, ivf.ntotal)
    return main


def _set_ntotal(index: faiss.Index, n: int) -> None:
    ivf = ivf_part(index)
    index.ntotal = n  # an OPQ-rotated index counts in its wrapper and its IVF part
    if ivf is not None:
        ivf.ntotal = n


def add_rows(index: faiss.Index, x: Rows, ids: np.ndarray) -> None:
    """Add `x` with `ids`, ADD_CHUNK rows a FAISS call (the calls cbir.steps.index_dask makes
    are the same ones: it splits the rows at multiples of ADD_CHUNK)."""
    for s in range(0, x.shape[0], ADD_CHUNK):
        index.add_with_ids(_as_vectors(x[s : s + ADD_CHUNK]), ids[s : s + ADD_CHUNK])


def _rerank_rows(
    queries: np.ndarray, rows: np.ndarray, base: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``queries`` among candidate ``rows`` of ``base`` (-1 = no candidate).

    FAISS scores each query with its candidate rows, multithreaded, straight from the (possibly
    memory-mapped) float32 array: no copies; other arrays are scored by numpy. The best are then
    chosen as every re-ranking path chooses them (`top_k`). Returns (scores, rows) with -inf / -1
    where fewer than k candidates exist.
    """
    nq, nc = rows.shape
    if base.dtype == np.float32 and base.ndim == 2 and base.flags.c_contiguous:
        scores = inner_products_by_idx(queries, base, rows)  # -inf where a row is -1
    else:
        valid = rows >= 0
        uniq, inv = np.unique(rows[valid], return_inverse=True)
        vecs = np.asarray(base[uniq], dtype=np.float32)
        scores = np.full((nq, nc), -np.inf, dtype=np.float32)
        qi = np.nonzero(valid)[0]
        scores[valid] = np.einsum("ij,ij->i", queries[qi], vecs[inv])
    out_s, out_r = top_k(scores, rows, k)
    if out_s.shape[1] < k:  # fewer candidates than k
        pad = k - out_s.shape[1]
        out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_r = np.pad(out_r, ((0, 0), (0, pad)), constant_values=-1)
    return out_s, out_r


def _rerank(
    queries: np.ndarray, cand: np.ndarray, vectors: VectorSource, k: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate ids exactly from ``vectors`` (array indexed by id, or id lookup)."""
    if isinstance(vectors, np.ndarray):
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise CbirError(f"re-ranking vectors have shape {vectors.shape}, expected (*, {dim})")
        if cand.size and cand.max() >= vectors.shape[0]:
            raise CbirError(
                f"index holds id {int(cand.max())} but only {vectors.shape[0]} vectors were given "
                "for re-ranking; the index and the embeddings are out of sync"
            )
        return _rerank_rows(queries, cand, vectors, k)
    scorer = getattr(vectors, "inner_products", None)
    scores = scorer(queries, cand) if scorer is not None else None
    if scores is not None:
        return top_k(scores, cand, k)
    # Callable lookup: fetch each distinct candidate once, then re-rank by position in the fetch.
    # Where a batch's candidates are mostly distinct (10^6 vectors and more), a block of queries
    # at a time: the float32 copy stays small while it is scored (a whole batch's would be close
    # to 1 GB at 10^7) and that is faster; where they repeat (10^5: each row about five times),
    # the whole batch at once, each row fetched and converted once.
    valid = cand >= 0
    uniq, inv = np.unique(cand[valid], return_inverse=True)
    if len(uniq) <= RERANK_DISTINCT:
        rows = np.full(cand.shape, -1, dtype=np.int64)
        rows[valid] = inv
        return _rerank_fetched(queries, rows, uniq, vectors, k, dim)
    step = max(1, RERANK_ROWS // max(1, cand.shape[1]))
    out_s = np.empty((cand.shape[0], k), np.float32)
    out_i = np.empty((cand.shape[0], k), np.int64)
    for at in range(0, cand.shape[0], step):
        block = cand[at : at + step]
        ok = block >= 0
        uniq, inv = np.unique(block[ok], return_inverse=True)
        rows = np.full(block.shape, -1, dtype=np.int64)
        rows[ok] = inv
        s = slice(at, at + step)
        out_s[s], out_i[s] = _rerank_fetched(queries[s], rows, uniq, vectors, k, dim)
    return out_s, out_i


def _rerank_fetched(
    queries: np.ndarray,
    rows: np.ndarray,
    uniq: np.ndarray,
    vectors: Callable[[np.ndarray], np.ndarray],
    k: int,
    dim: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidates given as positions (``rows``, -1 = none) in ``uniq``, the sorted
    distinct ids that ``vectors`` is asked for once."""
    fetched = _as_vectors(np.asarray(vectors(uniq)), dim, "re-ranking vectors")
    if fetched.shape[0] != uniq.shape[0]:
        raise CbirError(f"vector lookup returned {fetched.shape[0]} rows for {uniq.shape[0]} ids")
    scores, pos = _rerank_rows(queries, rows, fetched, k)
    ids = np.where(pos >= 0, uniq[np.maximum(pos, 0)] if uniq.size else -1, -1)
    return scores, ids.astype(np.int64)


def _search_raw(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    nprobe: int,
    k_factor: int,
    vectors: VectorSource | None,
    own: Own | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    nq = queries.shape[0]
    k = min(k, index.ntotal)
    if k <= 0 or nq == 0:
        return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)
    ivf = ivf_part(index)
    if ivf is None and vectors is not None:
        # An exact index scores a batch by one matrix product whose last bits depend on the
        # batch's shape (BLAS blocking): a pair would score an ulp apart in a full run, a night
        # and a Dask part, and one at the threshold be kept one way only. Its candidates are
        # re-scored a pair at a time, as re-ranking scores them, the same in every batch.
        _, cand = index.search(queries, min(index.ntotal, k * MIN_K_FACTOR))
        return _rerank(queries, cand, vectors, k, index.d)
    if ivf is None:
        return index.search(queries, k)
    ivf.nprobe = max(1, min(nprobe, ivf.nlist))
    if vectors is None:
        return _probed(index, ivf, queries, k, own)
    n_cand = min(index.ntotal, k * max(1, k_factor))
    _, cand = _probed(index, ivf, queries, n_cand, own)
    return _rerank(queries, cand, vectors, k, index.d)


def _probed(
    index: faiss.Index, ivf: faiss.IndexIVF, queries: np.ndarray, k: int, own: Own | None
) -> tuple[np.ndarray, np.ndarray]:
    """The IVF search of `queries`: those lying in a known list (`own`, cbir.probes, made for
    the index probed_ivf returns) probe the best lists near it, the others the best of all."""
    if own is None or ivf.nprobe > own[0].m:
        return index.search(queries, k)
    near, lists = own
    known = lists >= 0
    if not known.all():
        scores = np.empty((len(queries), k), np.float32)
        found = np.empty((len(queries), k), np.int64)
        if (~known).any():
            scores[~known], found[~known] = index.search(queries[~known], k)
        if known.any():
            scores[known], found[known] = _probed(
                index, ivf, queries[known], k, (near, lists[known])
            )
        return scores, found
    dq, iq = near.probes(queries, lists, ivf.nprobe)
    # FAISS shares out search_preassigned's queries among its threads only in parallel mode 3
    # (its search() shares them out itself, then calls it a thread's share at a time); a query's
    # answer is the same in every mode. At 10^7 images, 39,066 queries: 2.1 s, not 4.1 s.
    mode = ivf.parallel_mode
    ivf.parallel_mode = 3
    try:
        # faiss's Python wrapper (queries, k, lists, their products); the stubs list the C++ one
        scores, found = cast(Any, ivf).search_preassigned(queries, k, iq, dq)
    finally:
        ivf.parallel_mode = mode
    return scores, found


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k ids (``truth``, shape (nq, k)) present in ``found``."""
    if truth.size == 0:
        return 1.0
    hits = sum(
        len(np.intersect1d(f[f >= 0], t[t >= 0], assume_unique=False))
        for f, t in zip(found, truth, strict=True)
    )
    return hits / float(np.count_nonzero(truth >= 0) or 1)


def exact_search(vectors: Rows, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k over ``vectors``; returns (scores, row indices). An array
    of at most EXACT_CHUNK rows is searched in place; more rows, a chunk at a time."""
    n = vectors.shape[0]
    k = min(k, n)
    if isinstance(vectors, np.ndarray) and n <= EXACT_CHUNK:
        return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, n, EXACT_CHUNK):
        chunk = _as_vectors(vectors[start : start + EXACT_CHUNK])
        s, i = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        both_s = np.concatenate([best_s, s], axis=1)
        both_i = np.concatenate([best_i, i + start], axis=1)
        top = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(both_s, top, axis=1)
        best_i = np.take_along_axis(both_i, top, axis=1)
    return best_s, best_i


# --------------------------------------------------------------------------- build / update


def _new_index(params: IndexParams, dim: int, seed: int) -> faiss.Index:
    if params.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    sq8 = faiss.ScalarQuantizer.QT_8bit
    if params.kind == "sq8":
        return faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dim, sq8, faiss.METRIC_INNER_PRODUCT))
    if params.kind == "ivfsq8":
        coarse = faiss.IndexFlatIP(dim)
        ivfsq = faiss.IndexIVFScalarQuantizer(
            coarse, dim, params.nlist, sq8, faiss.METRIC_INNER_PRODUCT
        )
        ivfsq.own_fields = True
        coarse.this.disown()  # type: ignore[attr-defined]  # SWIG proxy attribute
        ivfsq.cp.seed = seed
        return ivfsq
    if params.kind != "ivfpq":
        raise CbirError(f"unknown index kind {params.kind!r}")
    if dim % params.m:
        raise CbirError(f"PQ sub-quantisers m={params.m} must divide the dimension {dim}")
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFPQ(
        quantizer, dim, params.nlist, params.m, params.nbits, faiss.METRIC_INNER_PRODUCT
    )
    ivf.own_fields = True
    # the IVF owns (and frees) its quantiser
    quantizer.this.disown()  # type: ignore[attr-defined]  # SWIG proxy attribute, not in faiss's stubs
    # Spherical k-means: centroids stay unit-norm, so inner product to a centroid is a cosine.
    ivf.cp.spherical = True
    ivf.cp.seed = seed
    ivf.cp.min_points_per_centroid = 1  # choose_params already enforced the bounds; no warnings
    ivf.cp.max_points_per_centroid = 1 << 30  # we pass the sample we want; no re-sampling
    ivf.pq.cp.seed = seed + 1
    if not params.opq:
        return ivf
    opq = faiss.OPQMatrix(dim, params.m)
    opq.niter = 25  # default 50; the gain flattens well before and it dominates train time at d=512
    index = faiss.IndexPreTransform(opq, ivf)
    index.own_fields = True
    opq.this.disown()  # type: ignore[attr-defined]  # SWIG proxy attribute, not in faiss's stubs
    ivf.this.disown()  # type: ignore[attr-defined]  # SWIG proxy attribute, not in faiss's stubs
    return index


def build_index(
    vectors: Rows,
    ids: np.ndarray,
    params: IndexParams | None = None,
    *,
    target_recall: float | None = 0.95,
    k: int = 10,
    seed: int = 0,
) -> tuple[faiss.Index, IndexInfo]:
    """Train on a sample, add all vectors with their int64 ids, tune nprobe; return (index, info).

    ``vectors`` are L2-normalised float32 rows; ``ids`` unique non-negative int64. Tuning uses up to
    1000 query vectors sampled from the data (leave-one-out: a query's own entry is ignored), exact
    top-k by brute force as ground truth, and the same exact re-ranking :func:`search` applies
    (re-scored from ``vectors``): nprobe doubles from 1 until recall@k >= ``target_recall``; when
    doubling nprobe stops helping (PQ ranking is the bottleneck), k_factor doubles instead; then
    k_factor halves and nprobe doubles while the target holds. ``target_recall=None`` skips
    tuning (recall is then recorded as NaN).
    """
    t0 = time.perf_counter()
    x, ids = build_input(vectors, ids)
    n, dim = x.shape
    if params is None:
        params = choose_params(n, dim)
    rng = np.random.default_rng(seed)

    if params.kind == "flat":
        index = _new_index(params, dim, seed)
    else:
        index = trained_index(x, params, seed, training_rows(n, params, rng))
    add_rows(index, x, ids)
    return index, finish_build(index, x, ids, params, rng, target_recall, k, t0)


def build_input(vectors: Rows, ids: np.ndarray) -> tuple[Rows, np.ndarray]:
    """build_index's vectors and ids, checked (an array is converted once; other rows, a
    memory-mapped file, are read a chunk at a time later)."""
    x: Rows = _as_vectors(vectors) if isinstance(vectors, np.ndarray) else vectors
    if len(x.shape) != 2:
        raise ValueError(f"vectors must be a 2-D array, got shape {x.shape}")
    ids = _as_ids(ids, x.shape[0])
    _check_normalised(x)
    return x, ids


def training_rows(n: int, params: IndexParams, rng: np.random.Generator) -> np.ndarray | None:
    """The rows build_index trains on (sorted; None: all of them), drawn from `rng` as it
    draws them: its tuning draws next, from the generator as this leaves it."""
    train_n = min(n, params.train_size or n)
    return np.sort(rng.choice(n, size=train_n, replace=False)) if train_n < n else None


def trained_index(x: Rows, params: IndexParams, seed: int, rows: np.ndarray | None) -> faiss.Index:
    """The empty index of `params`, trained on `rows` of `x` (training_rows) as build_index
    trains it (cbir.steps.index_dask trains it in one process and adds in others)."""
    if params.kind in ("ivfpq", "ivfsq8") and x.shape[0] < params.nlist:
        raise CbirError(f"cannot train {params.nlist} inverted lists on {x.shape[0]} vectors")
    index = _new_index(params, x.shape[1], seed)
    index.train(_as_vectors(x[rows] if rows is not None else x[:]))
    return index


def finish_build(
    index: faiss.Index,
    x: Rows,
    ids: np.ndarray,
    params: IndexParams,
    rng: np.random.Generator,
    target_recall: float | None,
    k: int,
    t0: float,
) -> IndexInfo:
    """build_index's last part, once every vector is added: its IndexInfo, nprobe and k_factor
    tuned (`rng`: as training_rows left it; `t0`: when the build began)."""
    n, dim = x.shape
    info = IndexInfo(
        params=params,
        n_vectors=int(index.ntotal),
        dim=dim,
        trained_size=n,
        recall_at_k=1.0,
        nprobe=0,
        build_seconds=0.0,
        k=k,
        k_factor=params.k_factor if params.refine else 1,
    )
    if params.kind in ("ivfpq", "ivfsq8"):
        info.nprobe = params.nprobe
        if target_recall is None:
            info.recall_at_k = float("nan")
        else:
            _tune(index, info, x, ids, rng, target_recall, k)
    info.build_seconds = time.perf_counter() - t0
    return info


def _drop_self(found: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """First k entries of each row that are not the row's own id (order kept)."""
    order = np.argsort(found == self_ids[:, None], axis=1, kind="stable")
    return np.take_along_axis(found, order, axis=1)[:, :k]


def _tune(
    index: faiss.Index,
    info: IndexInfo,
    x: Rows,
    ids: np.ndarray,
    rng: np.random.Generator,
    target: float,
    k: int,
) -> None:
    """Smallest nprobe (then k_factor) reaching ``target`` re-ranked recall@k on sampled queries,
    then the fewest candidates (k_factor halved, nprobe doubled) that still reach it."""
    n = x.shape[0]
    nq = min(N_TUNE_QUERIES, n)
    q_rows = np.sort(rng.choice(n, size=nq, replace=False))
    q = _as_vectors(x[q_rows])
    # Leave-one-out: each query's own entry is dropped from both truth and results, so the recall
    # estimates that of new photos rather than getting a free hit per query.
    self_ids = ids[q_rows]
    _, truth_rows = exact_search(x, q, k + 1)
    truth = _drop_self(ids[truth_rows], self_ids, k)
    # Re-rank from `x` by row: ids -> rows (identity when ids are 0..n-1, the usual case).
    if isinstance(x, np.ndarray) and np.array_equal(ids, np.arange(n)):
        source: VectorSource = x
    else:
        order = np.argsort(ids)
        sorted_ids = ids[order]

        def source(wanted: np.ndarray) -> np.ndarray:
            return x[order[np.searchsorted(sorted_ids, wanted)]]

    nlist = info.params.nlist
    refine = info.params.refine
    nprobe, kf = 1, max(1, info.k_factor)
    best = (-1.0, nprobe, kf)
    prev = -1.0

    # The re-ranked (image) index is tuned as its all-pairs search runs: each query, a stored
    # vector, probing around the list it lies in (cbir.probes).
    ivf = probed_ivf(index)
    own = (NearLists(ivf), lists_of(ivf, self_ids)) if refine and ivf is not None else None

    def recall(nprobe: int, kf: int) -> float:
        _, found = _search_raw(index, q, k + 1, nprobe, kf, source if refine else None, own)
        r = recall_at_k(_drop_self(found, self_ids, k), truth)
        log.debug("tune nprobe=%d k_factor=%d recall@%d=%.4f", nprobe, kf, k, r)
        return r

    while True:
        r = recall(nprobe, kf)
        if r > best[0]:
            best = (r, nprobe, kf)
        if r >= target:
            break
        plateau = prev >= 0 and r - prev < 0.005  # more probes barely help: PQ ranking limits
        if refine and kf < MAX_K_FACTOR and (plateau or nprobe >= nlist):
            kf *= 2
            prev = -1.0
        elif nprobe < nlist:
            nprobe *= 2
            prev = r
        else:
            log.warning(
                "recall@%d target %.3f not reached; best %.4f at nprobe=%d k_factor=%d",
                k,
                target,
                *best,
            )
            r, nprobe, kf = best
            break
    # Then half the candidates for twice the lists while the target holds: re-ranking reads
    # each candidate's vector (at 10^7 from a 10 GB file), probing scans 64-byte codes. At 10^7
    # nprobe 2 with 5 candidates a neighbour searched 1.3-1.8 times the queries a second of
    # nprobe 1 with 10, and recalled more (0.969 against 0.958); at 10^6 in RAM, as fast.
    while refine and r >= target and kf >= 2 * MIN_K_FACTOR and 2 * nprobe <= nlist:
        fewer = recall(2 * nprobe, kf // 2)
        if fewer < target:
            break
        r, nprobe, kf = fewer, 2 * nprobe, kf // 2
    info.recall_at_k, info.nprobe, info.k_factor = float(r), nprobe, kf


def add_vectors(
    index: faiss.Index,
    info: IndexInfo,
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    rebuild_factor: float = 4.0,
) -> bool:
    """Add vectors with their ids without retraining; updates ``info.n_vectors``.

    Returns False and adds nothing when an IVF index would exceed ``rebuild_factor`` times the size
    it was trained for (its lists would grow long and nprobe stale): the caller should rebuild.
    Flat indexes always accept. Ids already in the index are not checked for (IVF lists keep no id
    map, it would cost memory): call :func:`remove_ids` first when replacing a vector.
    """
    x = _as_vectors(vectors, index.d)
    ids = _as_ids(ids, x.shape[0])
    if x.shape[0] == 0:
        return True
    if not fits(index, info, x.shape[0], rebuild_factor):
        return False
    _check_normalised(x)
    delta = delta_of(index)
    if delta is None:
        add_rows(index, x, ids)
    else:  # a layered index grows in its delta
        add_rows(delta, x, ids)
        _set_ntotal(index, index.ntotal + x.shape[0])
    info.n_vectors = int(index.ntotal)
    return True


def fits(index: faiss.Index, info: IndexInfo, n_new: int, rebuild_factor: float) -> bool:
    """Whether `n_new` more vectors keep an IVF index within `rebuild_factor` times the size it
    was trained for (a flat index always fits): add_vectors' rule."""
    n_after = index.ntotal + n_new
    return info.params.kind == "flat" or n_after <= rebuild_factor * info.trained_size


def remove_ids(index: faiss.Index, info: IndexInfo, ids: np.ndarray) -> int:
    """Remove the given ids (absent ones are ignored); returns how many vectors were removed."""
    ids = unique_sorted(np.asarray(ids, dtype=np.int64))
    if ids.size == 0:
        return 0
    if delta_of(index) is not None:
        raise ValueError("a layered index cannot remove: read it whole (store.index.load_index)")
    # faiss's Python wrapper wraps an id array in an IDSelectorBatch
    removed = int(index.remove_ids(ids))  # type: ignore[arg-type]  # stubs omit the id-array form
    info.n_vectors = int(index.ntotal)
    return removed


def search(
    index: faiss.Index,
    info: IndexInfo,
    queries: np.ndarray,
    k: int,
    *,
    vectors: VectorSource | None = None,
    own: Own | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product with the tuned nprobe; returns (scores, ids), shape (nq, k').

    ``k' = min(k, ntotal)``; slots with no result hold id -1 (score -inf when re-ranked), which
    callers filter. For IVF-PQ indexes pass ``vectors`` (array indexed by id - a memmap is fine - or
    an id lookup callable): ``k * info.k_factor`` candidates are then re-scored exactly and the
    returned scores are true inner products. Without it, scores are PQ approximations and recall is
    lower than ``info.recall_at_k``. An exact (flat) index given ``vectors`` re-scores its
    ``k * MIN_K_FACTOR`` best a pair at a time, so that a pair's score is the same in any batch.
    ``own`` (cbir.probes): the queries that are stored vectors probe the best lists near the one
    each lies in (an all-pairs search; build_index tunes the re-ranked index that way), the
    others the best of all.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    q = _as_vectors(queries, index.d, "queries")
    use = vectors if info.params.refine or info.params.kind == "flat" else None
    return _search_raw(index, q, k, info.nprobe, info.k_factor, use, own)


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in the index (flat: its id map; IVF: the ids of its inverted lists)."""
    ivf = ivf_part(index)
    if ivf is None:
        idmap = cast(faiss.IndexIDMap, faiss.downcast_index(index))
        return faiss.vector_to_array(idmap.id_map).astype(np.int64)
    parts = [held.copy() for _, held in list_ids(ivf)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


_ID_MASK = (1 << 63) - 1  # FAISS ids are non-negative int64; -1 means "no result"


def faiss_ids(image_ids: Sequence[str]) -> np.ndarray:
    """int64 FAISS ids from image ids (63 bits of the content hash; a lookup maps them back).
    Ids that know their own 64-bit keys (store.manifest.ImageIds) are masked, not parsed."""
    keys = getattr(image_ids, "hex_keys", None)
    packed = keys() if callable(keys) else None
    if packed is not None:
        # one new array, viewed as int64 (the top bit masked off, the values are the same)
        return (np.asarray(packed, np.uint64) & np.uint64(_ID_MASK)).view(np.int64)
    if not isinstance(image_ids, list):
        image_ids = list(image_ids)
    if image_ids and set(map(len, image_ids)) == {16}:  # cbir's ids: parsed at once (10^7: 1 s)
        with contextlib.suppress(ValueError):  # not hex: one at a time, which says which
            raw = np.frombuffer(bytes.fromhex("".join(image_ids)), ">u8")
            return (raw & np.uint64(_ID_MASK)).astype(np.int64)
    return np.array([int(i, 16) & _ID_MASK for i in image_ids], dtype=np.int64)


#: Regions per picture that region_ids can number (the low bits of a region's id).
MAX_REGIONS = 256


def region_ids(owners: list[str]) -> np.ndarray:
    """FAISS ids of regions listed grouped by owner (cbir.regions): the owner's id with its low
    8 bits replaced by the region's number within the owner, so a picture's regions are added
    and removed with it and no table of ids has to be kept."""
    return numbered_ids(owners, MAX_REGIONS, "regions")


#: Local descriptors per picture that an id can number in its low bits (cbir.votes;
#: verify.MAX_KEYPOINTS): `owner_key` of a local descriptor's id is its picture's.
MAX_LOCAL = 1024


def owner_key(ids: np.ndarray | list[str], per_owner: int) -> np.ndarray:
    """What the ids numbered with `per_owner` slots (a power of two) share with their owner's:
    for FAISS ids (int64) their high bits; for image ids (str), the same of faiss_ids."""
    base = faiss_ids(ids) if isinstance(ids, list) else np.asarray(ids, np.int64)
    return base & ~np.int64(per_owner - 1)


def numbered_ids(owners: list[str], per_owner: int, what: str) -> np.ndarray:
    """The owner's FAISS id with its low bits (`per_owner` slots, a power of two) replaced by
    the item's number within its owner (items listed grouped by owner)."""
    base = faiss_ids(owners)
    at = np.arange(len(owners), dtype=np.int64)
    first = np.r_[True, base[1:] != base[:-1]] if len(owners) else np.zeros(0, bool)
    number = at - np.maximum.accumulate(np.where(first, at, 0))
    if len(owners) and number.max() > per_owner - 1:
        raise ValueError(f"more than {per_owner} {what} in one picture")
    return (base & ~np.int64(per_owner - 1)) | number
