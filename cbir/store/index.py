"""The FAISS index on disk (`data.index_dir`): index.faiss beside its sidecar index.json, saved
so that a kill at any moment leaves a loadable index, and a `Searcher` over the stored index and
the current embeddings (with embed.regions, also over the regional descriptors' index in
`data.index_dir/regions/`: `Searcher.candidates` is the union of both searches)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import faiss
import numpy as np

from .. import faults, regions
from ..arrays import found_at
from ..errors import CbirError
from ..faiss_index import (
    IndexInfo,
    delta_of,
    empty_like,
    faiss_ids,
    index_ids,
    ivf_part,
    layered,
    lists_holding,
    merged,
    probed_ivf,
    region_ids,
)
from ..faiss_index import search as faiss_search
from ..fsutil import Stamp, atomic_path, clean_stale_tmp, file_stamps, write_json
from ..probes import NearLists, Own, stored_lists
from ..regions import Candidate
from . import reuse
from .embeddings import current_regions
from .layout import (
    DELTA_FILE,
    DELTA_STAGED,
    IDS_GLOB,
    IDS_PREFIX,
    INDEX_FILE,
    NEAR_FILE,
    SIDECAR_FILE,
    STAGED_FILE,
    layout,
)
from .manifest import CanonicalPaths, ImageIds, canonical_paths_of, canonical_table
from .vectors import Vectors, current_embeddings

if TYPE_CHECKING:
    from ..config import Settings

INDEX_FORMAT_VERSION = 1


class NoIndex(CbirError):
    """No index has been saved in the folder yet (as opposed to one that is damaged or stale)."""


# --------------------------------------------------------------------------- persistence

_REBUILD = "rebuild with `cbir index`"
# Sidecar values and their types: a sidecar cbir did not write is refused, not half-used.
_SIDECAR_TYPES: dict[str, type | tuple[type, ...]] = {
    "index_file": dict,
    "delta_file": dict,
    "ids_file": dict,
    "params": dict,
    "n_vectors": int,
    "dim": int,
    "trained_size": int,
    "nprobe": int,
    "k": int,
    "k_factor": int,
    "recall_at_k": (int, float),
    "model_fingerprint": str,
    "opened": dict,
}


def _check_sidecar(side: Any) -> None:
    """Raise TypeError when the sidecar does not hold the values (and types) cbir writes."""
    if not isinstance(side, dict):
        raise TypeError(f"it holds a {type(side).__name__}, not a mapping")
    for key, kind in _SIDECAR_TYPES.items():
        value = side.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise TypeError(f"{key} is {value!r}")


def save_index(
    index: faiss.Index,
    info: IndexInfo,
    folder: Path,
    ids: np.ndarray | None = None,
    opened: dict[str, Any] | None = None,
) -> None:
    """Write ``folder/index.faiss`` and ``folder/index.json`` so that a kill at any moment leaves
    a loadable index, the previous one or the new one.

    The new index file is staged beside the old one (``index.faiss.next``), then the sidecar is
    replaced atomically (the commit: it records the new file's size and SHA-256), then the staged
    file is renamed over ``index.faiss``. Until that last rename :func:`load_index` finds the file
    the sidecar describes by its checksum, so a kill between the renames, or a damaged file, is
    never taken for a valid index.

    `ids`: the index's ids, sorted, kept beside it for the next update (sorted_ids).
    `opened`: the embeddings' stamp (store.vectors.Vectors.stamp) where the index holds
    exactly the present images of that opening (recorded_opening).
    """
    folder = Path(folder)
    if index.ntotal != info.n_vectors:
        raise CbirError(f"index holds {index.ntotal} vectors but its info says {info.n_vectors}")
    faults.point("index.save")
    ids_file = _write_ids(folder, index, ids)
    digest = hashlib.sha256()
    size = 0
    failed: list[OSError] = []
    with atomic_path(folder / STAGED_FILE) as tmp, open(tmp, "wb") as fh:

        def sink(chunk: bytes) -> None:
            # FAISS streams the index here a block at a time, hashed as it goes: no copy of it
            # in memory (serialize_index copied 720 MB twice at 10^7: 6.7 s). Written by Python,
            # so a full disk keeps its errno; FAISS would turn it into a RuntimeError.
            nonlocal size
            try:
                fh.write(chunk)
            except OSError as exc:
                failed.append(exc)
                raise
            digest.update(chunk)
            size += len(chunk)

        try:
            writer = faiss.PyCallbackIOWriter(sink)  # type: ignore[attr-defined]  # not in stubs
            faiss.write_index(index, writer)
        except RuntimeError:
            if failed:
                raise failed[0] from None
            raise
    sidecar = {
        "format_version": INDEX_FORMAT_VERSION,
        "index_file": {"name": INDEX_FILE, "bytes": size, "sha256": digest.hexdigest()},
        **({"ids_file": ids_file} if ids_file else {}),
        **({"opened": opened} if opened else {}),
        **info.to_dict(),
    }
    write_json(sidecar, folder / SIDECAR_FILE)
    faults.point("index.commit")
    os.replace(folder / STAGED_FILE, folder / INDEX_FILE)
    _drop_delta(folder)  # in the file just written, or gone
    _drop_ids(folder, ids_file)
    # the next step of a flow run searches what was just written: handed over, not read back
    reuse.put(_KEPT + str(folder), _files_stamp(folder), (index, info))


def save_delta(
    index: faiss.Index,
    info: IndexInfo,
    folder: Path,
    opened: dict[str, Any] | None = None,
) -> None:
    """Write what was added to a layered index (opened by ``reusable_index(mapped=True)``)
    since its main file was written: the delta file alone, so that a night adding 1,000 images
    to 10^7 writes the trained quantiser and codebooks (about 17 MB) and the new codes, not the
    720 MB index. Staged, committed by the sidecar (which keeps the main file's record and
    adds the delta's size and SHA-256), then renamed, as save_index does: a kill at any moment
    leaves the previous state or the new one. `opened`: as for save_index. The ids file
    save_index wrote lists the main file's ids, which a delta does not change: it stays named
    (sorted_ids adds the delta's; a night writes no 80 MB of ids at 10^7)."""
    folder = Path(folder)
    delta = delta_of(index)
    if delta is None:
        raise CbirError("save_delta wants a layered index (reusable_index with mapped=True)")
    if index.ntotal != info.n_vectors:
        raise CbirError(f"index holds {index.ntotal} vectors but its info says {info.n_vectors}")
    try:
        side = json.loads((folder / SIDECAR_FILE).read_text(encoding="utf-8"))
        main_file = side["index_file"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CbirError(f"index sidecar in {folder} is unreadable ({e}); {_REBUILD}") from e
    faults.point("index.save")
    record = side.get("ids_file") if isinstance(side, dict) else None
    main_ids = isinstance(record, dict) and record.get("n") == index.ntotal - delta.ntotal
    ids_file = record if main_ids else None  # (one of all the ids, as saved before: dropped)
    data = faiss.serialize_index(delta).tobytes()  # small: what was added since
    with atomic_path(folder / DELTA_STAGED) as tmp:
        tmp.write_bytes(data)
    sidecar = {
        "format_version": INDEX_FORMAT_VERSION,
        "index_file": main_file,
        "delta_file": {
            "name": DELTA_FILE,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "n_vectors": int(delta.ntotal),
        },
        **({"ids_file": ids_file} if ids_file else {}),
        **({"opened": opened} if opened else {}),
        **info.to_dict(),
    }
    write_json(sidecar, folder / SIDECAR_FILE)
    faults.point("index.commit")
    os.replace(folder / DELTA_STAGED, folder / DELTA_FILE)
    _drop_ids(folder, ids_file)
    reuse.put(_KEPT + str(folder), _files_stamp(folder), (index, info))


def _write_ids(folder: Path, index: faiss.Index, ids: np.ndarray | None) -> dict[str, Any] | None:
    """Write the index's sorted ids under a new name for the sidecar to name (before it: a
    kill leaves a file no sidecar names, removed by the next save); None: none given."""
    if ids is None:
        return None
    if len(ids) != index.ntotal:
        raise CbirError(f"index holds {index.ntotal} vectors but {len(ids)} ids were given")
    name = f"{IDS_PREFIX}{secrets.token_hex(4)}.npy"
    with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(ids, np.int64), allow_pickle=False)
    return {"name": name, "n": len(ids)}


def recorded_opening(folder: Path) -> dict[str, Any] | None:
    """The embeddings' stamp the index in `folder` was last saved with (save_index's `opened`),
    or None."""
    try:
        side = json.loads((Path(folder) / SIDECAR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    opened = side.get("opened") if isinstance(side, dict) else None
    return opened if isinstance(opened, dict) else None


def _drop_ids(folder: Path, keep: dict[str, Any] | None) -> None:
    """Remove the ids files the sidecar no longer names."""
    for path in folder.glob(IDS_GLOB):
        if keep is None or path.name != keep["name"]:
            path.unlink(missing_ok=True)


def sorted_ids(folder: Path, index: faiss.Index) -> np.ndarray:
    """The ids `index` (as saved in `folder`) holds, sorted: read from the ids file its sidecar
    names (80 MB at 10^7; where it lists the main file's alone, with the delta's ids merged
    in), else gathered from its lists and sorted (1-2 s at 10^7)."""
    delta = delta_of(index)
    try:
        side = json.loads((Path(folder) / SIDECAR_FILE).read_text(encoding="utf-8"))
        record = side["ids_file"]
        n = record["n"]
        layered = delta is not None and n == index.ntotal - delta.ntotal
        if (n == index.ntotal or layered) and Path(record["name"]).name == record["name"]:
            ids = np.load(Path(folder) / record["name"], allow_pickle=False)
            whole = ids.dtype == np.int64 and ids.shape == (n,)
            if whole and bool((ids[1:] >= ids[:-1]).all()):
                if n == index.ntotal:
                    return ids
                assert delta is not None
                added = np.sort(index_ids(delta))  # two sorted runs: merged by a stable sort
                return np.sort(np.concatenate([ids, added]), kind="stable")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return np.sort(index_ids(index))


def _drop_delta(folder: Path) -> None:
    for name in (DELTA_FILE, DELTA_STAGED):
        (folder / name).unlink(missing_ok=True)


_KEPT = "index:"


def _files_stamp(folder: Path) -> Stamp:
    names = [SIDECAR_FILE, INDEX_FILE, STAGED_FILE, DELTA_FILE, DELTA_STAGED]
    return file_stamps([folder / name for name in names])


def _kept_index(
    folder: Path, expected_fingerprint: str | None
) -> tuple[faiss.Index, IndexInfo] | None:
    """The index a save of this flow run left in `folder`, when its files are as it left them."""
    kept = reuse.get(_KEPT + str(folder), _files_stamp(folder))
    if kept is None or (
        expected_fingerprint is not None and kept[1].model_fingerprint != expected_fingerprint
    ):
        return None
    return kept


def _matches(path: Path, expected: dict[str, Any]) -> bytes | None:
    """The file's bytes when its size and SHA-256 are those the sidecar records, else None."""
    try:
        if path.stat().st_size != expected.get("bytes"):
            return None
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return data if hashlib.sha256(data).hexdigest() == expected.get("sha256") else None


def _sized(path: Path, expected: dict[str, Any]) -> bool:
    try:
        return path.stat().st_size == expected.get("bytes")
    except FileNotFoundError:
        return False


def _read_mapped(path: Path, kind: str) -> faiss.Index:
    """The index file memory-mapped, read-only: its pages live in the page cache, shared by
    every process of the machine that maps it, and only those a search touches are read.

    What FAISS (1.15) maps: with IO_FLAG_MMAP the inverted lists of an IVF index (ivfpq, with
    or without OPQ; ivfsq8) become OnDiskInvertedLists over the file, but the codes of a flat
    index (flat, sq8: IndexIDMap2 over an IndexFlatCodes) are still read into memory; those
    are mapped by IO_FLAG_MMAP_IFC (an older FAISS lacks it: read into memory, as without
    mmap). The two flags cannot be combined (the IVF hook needs a plain file reader). The id
    map of a flat index (IndexIDMap2's ids and their reverse table) is always in memory."""
    flat = kind in ("flat", "sq8")
    flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) if flat else faiss.IO_FLAG_MMAP
    return faiss.read_index(str(path), flags)


def finish_save(folder: Path) -> None:
    """Complete a save_index killed after its commit (the staged file is the index), or drop a
    staged file whose save never committed. For writers only (they hold the writer lock)."""
    folder = Path(folder)
    try:
        side = json.loads((folder / SIDECAR_FILE).read_text(encoding="utf-8"))
        expected, delta = side["index_file"], side.get("delta_file")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        expected, delta = {}, None
    _finish(folder / STAGED_FILE, folder / INDEX_FILE, expected)
    if not isinstance(delta, dict):  # none recorded: a full save's was left behind
        _drop_delta(folder)
    else:
        _finish(folder / DELTA_STAGED, folder / DELTA_FILE, delta)


def _finish(staged: Path, final: Path, expected: dict[str, Any]) -> None:
    """A staged file the sidecar describes is renamed into place; one it does not, removed."""
    if not staged.is_file():
        return
    if _matches(staged, expected) is not None:
        os.replace(staged, final)
    else:
        staged.unlink()


def _committed(path: Path, staged: Path, expected: dict[str, Any]) -> bytes | None:
    """The bytes of the file the sidecar describes: `path`, or its staged file where a save was
    killed between its commit and its last rename (`path` once more: a save may have renamed
    the staged file meanwhile); None when neither matches."""
    return next((d for p in (path, staged, path) if (d := _matches(p, expected))), None)


def reusable_index(
    folder: Path, tag: str, rebuild: bool, changed: str = "model changed", *, mapped: bool = False
) -> tuple[faiss.Index | None, IndexInfo | None, str]:
    """For a writer about to update the index in `folder` (built from vectors tagged `tag`):
    finish or drop a killed save, then (index, info, "") when it can be updated in place, or
    (None, None, why it must be rebuilt).

    `mapped`: an IVF index is opened layered (faiss_index.layered): its main file memory-mapped,
    its size checked (not read), and its delta read, or an empty one; vectors are then added to
    the delta and saved by save_delta. A writer that must remove vectors loads it whole."""
    clean_stale_tmp(folder)  # left by a killed run
    finish_save(folder)
    if rebuild:
        return None, None, "requested"
    try:
        index, info = load_index(folder, mmap=mapped)
        if mapped and ivf_part(index) is None:  # a flat index's codes are not added to mapped
            index, info = load_index(folder)
        elif mapped and delta_of(index) is None:
            index = layered(index, empty_like(index))
    except NoIndex:
        return None, None, "no usable index"
    except CbirError as exc:
        return None, None, str(exc)
    if info.model_fingerprint != tag:
        return None, None, f"{changed} from {info.model_fingerprint} to {tag}"
    return index, info, ""


def load_index(
    folder: Path, expected_fingerprint: str | None = None, *, mmap: bool = False
) -> tuple[faiss.Index, IndexInfo]:
    """Read an index saved by :func:`save_index`; raise NoIndex when none was saved, CbirError
    when it is damaged or stale.

    `mmap`: map the file instead of reading it (:func:`_read_mapped`), for a reader that only
    searches (a Dask worker of `cbir pairs`) and a nightly update (reusable_index); its size is
    checked but not its checksum (a load without `mmap` checks it). A delta file (save_delta)
    is read and checked whole: merged into the index read in memory, or layered over the
    mapped one (faiss_index.layered)."""
    folder = Path(folder)
    side_path, index_path = folder / SIDECAR_FILE, folder / INDEX_FILE
    if not side_path.is_file() or not (index_path.is_file() or (folder / STAGED_FILE).is_file()):
        missing = side_path if not side_path.is_file() else index_path
        raise NoIndex(f"no index at {folder} ({missing.name} missing); build it with `cbir index`")
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
        _check_sidecar(side)
        version = side["format_version"]
        expected_file = side["index_file"]
        info = IndexInfo.from_dict(side)
    except (ValueError, KeyError, TypeError) as e:
        raise CbirError(f"index sidecar {side_path} is unreadable ({e}); {_REBUILD}") from e
    if version != INDEX_FORMAT_VERSION:
        raise CbirError(
            f"index at {folder} has format version {version}, this cbir reads version "
            f"{INDEX_FORMAT_VERSION}; {_REBUILD}"
        )
    if expected_fingerprint is not None and info.model_fingerprint != expected_fingerprint:
        raise CbirError(
            f"index was built from embeddings of model {info.model_fingerprint or '(unknown)'} but "
            f"the current embeddings are from model {expected_fingerprint}; {_REBUILD}"
        )

    damaged = f"index file {index_path} is damaged; {_REBUILD}"
    # index.faiss, or the staged file of a save killed between its commit and its last rename
    # (index.faiss once more: a save may have renamed the staged file meanwhile)
    candidates = (index_path, folder / STAGED_FILE, index_path)
    try:
        if mmap:
            sized = next((p for p in candidates if _sized(p, expected_file)), None)
            if sized is None:
                raise CbirError(f"{damaged} (size differs from {SIDECAR_FILE})")
            index = _read_mapped(sized, info.params.kind)
        else:
            data = _committed(index_path, folder / STAGED_FILE, expected_file)
            if data is None:
                raise CbirError(f"{damaged} (size or checksum differs from {SIDECAR_FILE})")
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:  # FAISS raises RuntimeError on truncated/garbled input
        raise CbirError(damaged) from e
    delta = side.get("delta_file")
    if delta is not None:
        index = _with_delta(folder, index, delta, mmap)
    if index.ntotal != info.n_vectors or index.d != info.dim:
        raise CbirError(
            f"index file holds {index.ntotal} vectors of dimension {index.d} but {SIDECAR_FILE} "
            f"says {info.n_vectors} of dimension {info.dim}; {_REBUILD}"
        )
    ivf = ivf_part(index)
    if ivf is not None:
        ivf.nprobe = info.nprobe
    return index, info


def _with_delta(
    folder: Path, index: faiss.Index, expected: dict[str, Any], mmap: bool
) -> faiss.Index:
    """The index with the delta file the sidecar records (its staged file, of a save killed
    between its commit and its rename, counts too): merged, or layered over a mapped index."""
    path = folder / DELTA_FILE
    damaged = f"index file {path} is damaged; {_REBUILD}"
    data = _committed(path, folder / DELTA_STAGED, expected)
    if data is None:
        raise CbirError(f"{damaged} (size or checksum differs from {SIDECAR_FILE})")
    try:
        delta = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if ivf_part(index) is None or ivf_part(delta) is None:
            raise RuntimeError("a delta is only kept for an IVF index")
        return layered(index, delta) if mmap else merged(index, delta)
    except RuntimeError as e:  # garbled, or not made from this index
        raise CbirError(damaged) from e


# --------------------------------------------------------------------------- searching it


@dataclass
class RegionSearcher:
    """The regional descriptors' index, answering with each picture's best region."""

    index: Any
    info: Any
    owners: list[str]  # row order of `vectors` and `boxes`
    boxes: np.ndarray
    vectors: np.ndarray
    fids: np.ndarray  # sorted FAISS ids, and the row of each
    rows: np.ndarray

    @classmethod
    def of(
        cls, index: Any, info: Any, owners: list[str], boxes: np.ndarray, vectors: np.ndarray
    ) -> RegionSearcher:
        fids = region_ids(owners)
        order = np.argsort(fids)
        return cls(index, info, owners, boxes, vectors, fids[order], order)

    def row(self, fids: np.ndarray) -> np.ndarray:
        return self.rows[np.searchsorted(self.fids, np.asarray(fids, np.int64))]

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float, np.ndarray]]]:
        """Per query, the pictures owning its nearest regions, best region each, best first
        (up to k pictures: 4k regions are searched, as a picture's regions crowd together)."""
        scores, fids = faiss_search(
            self.index, self.info, queries, 4 * k, vectors=lambda f: self.vectors[self.row(f)]
        )
        out = []
        for srow, frow in zip(scores, fids, strict=True):
            ok = frow >= 0
            rows = self.row(frow[ok])
            hits = regions.best_regions(
                srow[ok], [self.owners[r] for r in rows], [self.boxes[r] for r in rows]
            )
            out.append(hits[:k])
        return out


@dataclass(frozen=True)
class _Lookup:
    """A searcher's vectors as faiss_index re-ranks from them (faiss_index.Scorer)."""

    s: Searcher

    def __call__(self, fids: np.ndarray) -> np.ndarray:
        return self.s.lookup(fids)

    def inner_products(self, queries: np.ndarray, fids: np.ndarray) -> np.ndarray | None:
        return self.s.inner_products(queries, fids)


#: Above this many ids, rows_of sorts them before its binary searches.
SORT_LOOKUPS = 1 << 16


def _sorted_positions(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """np.searchsorted(haystack, needles); many needles are sorted first, so that the searches
    walk the haystack in order (a batch's 2 million candidates among 10^7 ids: 0.4 s against
    2.7 s, each search a string of cache misses otherwise)."""
    flat = needles.reshape(-1)
    if flat.size <= SORT_LOOKUPS or bool((flat[1:] >= flat[:-1]).all()):
        return np.searchsorted(haystack, needles)
    order = np.argsort(flat)
    pos = np.empty(flat.shape, np.int64)
    pos[order] = np.searchsorted(haystack, flat[order])
    return pos.reshape(needles.shape)


#: Lookups of at most this many FAISS ids search the images' keys (Searcher.rows_of).
KEYED_LOOKUPS = 1 << 17


def _rows_by_key(keys: np.ndarray, fids: np.ndarray) -> np.ndarray:
    """The row of each FAISS id among sorted 64-bit `keys` (their rows), -1 for none: the key
    with the id's bits and its top bit clear, else set (the row of the clear one where two
    keys share their low 63 bits, as in the FAISS ids sorted stably)."""
    wanted = fids.astype(np.uint64)
    out = np.full(fids.shape, -1, np.int64)
    for top in (np.uint64(1 << 63), np.uint64(0)):  # the clear one last: it wins
        at = found_at(keys, wanted | top, _sorted_positions)
        out = np.where(at >= 0, at, out)
    return np.where(fids >= 0, out, -1)


def near_lists(folder: Path | None, ivf: faiss.IndexIVF) -> NearLists:
    """The near lists of the index in `folder` (cbir.probes): restored from NEAR_FILE where it
    was kept for these centroids, else computed as searches need them."""
    if folder is None:
        return NearLists(ivf)
    shared = reuse.get(_NEAR + str(folder), _near_stamp(folder))  # kept by this flow run
    if shared is not None:
        return cast(NearLists, shared)
    near = NearLists(ivf)
    try:
        with np.load(folder / NEAR_FILE, allow_pickle=False) as kept:
            if str(kept["digest"]) == near.digest:
                near.restore(kept["near"])
    except (OSError, ValueError, KeyError, EOFError):  # none, or not one: computed instead
        pass
    return near


def keep_near_lists(folder: Path, index: faiss.Index) -> bool:
    """Compute every near list of `index` and keep them in `folder` (NEAR_FILE), unless they
    are kept there for its centroids already; returns whether it wrote them. A night's 1,000
    queries lie in about as many lists, whose near lists were computed every night (at 10^7
    images, 8,192 lists: 0.5 s of the night; all of them once, when the index is trained:
    5.3 s)."""
    ivf = probed_ivf(index)
    if ivf is None:
        return False
    near = near_lists(folder, ivf)
    wrote = not near.complete
    if wrote:
        table = near.table().astype(np.int32)  # list numbers: half the bytes
        with atomic_path(folder / NEAR_FILE) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, near=table, digest=np.array(near.digest))
    # the pairs step of this flow run searches this index: it need not read and check them again
    reuse.put(_NEAR + str(folder), _near_stamp(folder), near)
    return wrote


_NEAR = "near lists:"


def _near_stamp(folder: Path) -> Stamp:
    """The index files as a reader finds them (_files_stamp) and the near lists' file."""
    return _files_stamp(folder) + file_stamps([folder / NEAR_FILE])


@dataclass
class Searcher:
    """The current index with what is needed to turn its answers into images and paths."""

    index: Any
    info: Any
    fingerprint: str
    image_ids: ImageIds  # sorted; the row order of `vectors`
    vectors: np.ndarray | Vectors  # memory-mapped (store.vectors) in the pipeline
    path_of: Mapping[str, str]  # image_id -> canonical path (manifest.CanonicalPaths)
    regions: RegionSearcher | None = None  # with embed.regions
    index_dir: Path | None = None  # where the index's near lists may be kept (keep_near_lists)
    _near: NearLists | None = field(default=None, repr=False)  # cbir.probes, once searched
    _row_lists: np.ndarray | None = field(default=None, repr=False)  # each row's list
    #: the FAISS ids sorted and the row of each, made for the first lookup of many ids
    _by_fid: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        index: Any,
        info: Any,
        fingerprint: str,
        image_ids: Sequence[str],
        vectors: np.ndarray | Vectors,
        path_of: Mapping[str, str],
        regions: RegionSearcher | None = None,
        index_dir: Path | None = None,
    ) -> Searcher:
        ids = ImageIds.of(image_ids)
        return cls(index, info, fingerprint, ids, vectors, path_of, regions, index_dir)

    def rows_of(self, fids: np.ndarray) -> np.ndarray:
        """The row of each FAISS id (any shape), -1 for none or an id not among the vectors.
        A few ids (a night's candidates) are looked up among the images' sorted keys, a FAISS
        id being a key with its top bit dropped; many (an all-pairs batch) among the FAISS ids
        sorted once, which at 10^7 costs a night 0.8-1.4 s and 240 MB to make."""
        fids = np.asarray(fids, np.int64)
        keys = self.image_ids.hex_keys() if fids.size <= KEYED_LOOKUPS else None
        if keys is not None:
            return _rows_by_key(keys, fids)
        if self._by_fid is None:
            every = faiss_ids(self.image_ids)
            order = np.argsort(every, kind="stable")  # ids sorted: two runs, merged (_changes)
            self._by_fid = (every[order], order)
        sorted_fids, rows = self._by_fid
        at = found_at(sorted_fids, fids, _sorted_positions)
        return np.where(at >= 0, rows[np.maximum(at, 0)], -1) if len(rows) else at

    def present(self, image_ids: list[str]) -> np.ndarray:
        """Whether each image is among this searcher's (by its FAISS id, then its id: 63 bits
        of two ids can agree)."""
        rows = self.rows_of(faiss_ids(image_ids)) if image_ids else np.zeros(0, np.int64)
        ids = self.image_ids
        return np.array(
            [r >= 0 and ids[r] == i for r, i in zip(rows.tolist(), image_ids, strict=True)], bool
        )

    def _known_rows(self, fids: np.ndarray) -> np.ndarray:
        """rows_of, refusing an id (not -1) that has no vector."""
        rows = self.rows_of(fids)
        if ((rows < 0) & (np.asarray(fids) >= 0)).any():
            raise CbirError(
                "the index holds images that have no current embedding: the index and the "
                f"embeddings are out of sync; {_REBUILD}"
            )
        return rows

    def lookup(self, fids: np.ndarray) -> np.ndarray:
        """Stored vectors for FAISS ids: the index re-scores its candidates exactly with them."""
        return self.vectors[self._known_rows(fids)]

    def inner_products(self, queries: np.ndarray, fids: np.ndarray) -> np.ndarray | None:
        """The queries' inner products with their candidate ids, where the vector file scores
        them itself (faiss_index.Scorer: a large file read in order); None: fetch them."""
        if not isinstance(self.vectors, Vectors):
            return None
        return self.vectors.inner_products(queries, self._known_rows(fids))

    def search_rows(
        self, queries: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows of image_ids; -1 for no result) of each query's top k. `rows`: the
        queries are these rows' own vectors (an all-pairs search), which probe the lists
        around the one each lies in (cbir.probes)."""
        own = self.own(rows) if rows is not None else None
        scores, fids = faiss_search(
            self.index, self.info, queries, k, vectors=_Lookup(self), own=own
        )
        return scores, np.where(fids >= 0, self.rows_of(fids), -1)

    def own(self, rows: np.ndarray) -> Own | None:
        """The index's near lists and the list each of `rows` lies in (-1: none), for
        search_rows; None for an index whose searches do not probe around them (probed_ivf).
        Found among the index's ids (a pass over them; a layered index's delta first), or,
        after map_lists, looked up."""
        ivf = probed_ivf(self.index)
        if ivf is None:
            return None
        near = self._near_lists(ivf)
        rows = np.asarray(rows, np.int64)
        if self._row_lists is not None:
            return near, self._row_lists[rows]
        return near, lists_holding(self.index, faiss_ids(self.image_ids.take(rows)))

    def map_lists(self) -> None:
        """Find every row's list and every list's near lists once, for a search of many
        batches (at 10^7 images about 2 s and, for 8,192 lists, 5-8 s), rather than a pass
        over the index's ids a batch."""
        ivf = probed_ivf(self.index)
        if ivf is None or self._row_lists is not None:
            return
        ids, lists = stored_lists(ivf)
        at = self.rows_of(ids)
        row_lists = np.full(len(self.image_ids), -1, np.int32)
        row_lists[at[at >= 0]] = lists[at >= 0]
        self._near_lists(ivf).table()  # every list's, computed or restored
        self._row_lists = row_lists

    def read_ahead(self) -> None:
        """For a search of many batches, whose re-ranking wants most of the vector file: read a
        large one into the page cache in the background (store.vectors.RowReader.read_ahead)."""
        if isinstance(self.vectors, Vectors):
            self.vectors.read_ahead()

    def _near_lists(self, ivf: faiss.IndexIVF) -> NearLists:
        if self._near is None:
            self._near = near_lists(self.index_dir, ivf)
        return self._near

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str | None]]]:
        scores, rows = self.search_rows(queries, k)
        flat = rows.reshape(-1)
        named: list[str | None] = [None] * len(flat)
        for j, image_id in zip(
            np.flatnonzero(flat >= 0).tolist(), self.image_ids.take(flat[flat >= 0]), strict=True
        ):
            named[j] = image_id
        nq, width = rows.shape
        return scores, [named[j * width : (j + 1) * width] for j in range(nq)]

    def candidates(
        self,
        queries: np.ndarray,
        k: int,
        local_hits: Sequence[Sequence[tuple[str, int]]] | None = None,
    ) -> list[list[Candidate]]:
        """Per query vector, the images it may be a copy or a detail of: the union of its
        global top k, (with regions) the owners of its regional top k and the pictures its
        keypoints voted for (`local_hits`, per query: image_id, votes, from
        store.local.LocalSearcher), at most k, best first, each saying which search found it
        (`found_by`) and, for a region, its box."""
        scores, ids = self.search(queries, k)
        hits = self.regions.search(queries, k) if self.regions is not None else None
        out = []
        for q in range(len(queries)):
            g = [(i, float(s)) for s, i in zip(scores[q], ids[q], strict=True) if i is not None]
            voted = list(local_hits[q]) if local_hits is not None else []
            out.append(
                regions.union(
                    g,
                    hits[q] if hits is not None else [],
                    k,
                    voted,
                    self.similarities(queries[q], [i for i, _ in voted]),
                )
            )
        return out

    def similarities(self, query: np.ndarray, image_ids: Sequence[str]) -> dict[str, float]:
        """The query vector's global similarity to these images (those with a vector)."""
        found = self.rows_of(faiss_ids(list(image_ids)))
        known = [i for i, r in zip(image_ids, found, strict=True) if r >= 0]
        if not known:
            return {}
        sims = np.asarray(self.vectors[found[found >= 0]], np.float32) @ np.asarray(
            query, np.float32
        )
        return {i: float(v) for i, v in zip(known, sims, strict=True)}


def open_searcher(
    settings: Settings,
    fingerprint: str | None = None,
    *,
    with_regions: bool = True,
    mmap: bool = False,
) -> Searcher:
    """Load the index for the current model (and, with embed.regions, the regional index); a
    stale index is refused with a clear message. `mmap`: see load_index."""
    fp, ids, vectors, _ = current_embeddings(settings, fingerprint)
    lay = layout(settings)
    kept = None if mmap else _kept_index(lay.index_dir, fp)  # searched, never changed
    index, info = kept or load_index(lay.index_dir, expected_fingerprint=fp, mmap=mmap)
    scheme = regions.scheme(settings.embed.regions) if with_regions else None
    region_searcher = None
    if scheme is not None:
        tag, owners, boxes, region_vectors = current_regions(settings, fp, scheme)
        r_index, r_info = load_index(lay.region_index_dir, expected_fingerprint=tag, mmap=mmap)
        region_searcher = RegionSearcher.of(r_index, r_info, owners, boxes, region_vectors)
    paths = CanonicalPaths(
        lambda: canonical_table(settings), lambda ids: canonical_paths_of(settings, ids)
    )
    return Searcher.of(index, info, fp, ids, vectors, paths, region_searcher, lay.index_dir)
