"""`cbir index`: build the FAISS index of the current embeddings, or update it in place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import regions
from ..errors import CbirError
from ..faiss_index import (
    FLAT_MAX_N,
    IndexInfo,
    Rows,
    add_vectors,
    build_index,
    choose_params,
    delta_of,
    faiss_ids,
    region_ids,
    remove_ids,
)
from ..store.embeddings import current_regions
from ..store.index import (
    keep_near_lists,
    load_index,
    recorded_opening,
    reusable_index,
    save_delta,
    save_index,
    sorted_ids,
)
from ..store.layout import layout
from ..store.local import LocalSummary, build_local_index
from ..store.manifest import keys_in
from ..store.vectors import added_between, current_embeddings
from .index_dask import dask_add_vectors, dask_build_index, wants_dask_add

if TYPE_CHECKING:
    from ..config import Settings

#: Vectors added since the index file was last written whole are kept in a delta file beside it
#: (store.index.save_delta), up to this share of the index; past it, or when vectors are
#: removed, the index is read whole and written whole again. At 10^7 images a night's delta
#: saves reading and writing 720 MB; a layered search copies each list it probes
#: (faiss_index.layered), so the share stays small.
DELTA_SHARE = 0.05


@dataclass
class IndexSummary:
    info: IndexInfo
    folder: Path
    rebuilt: bool
    added: int = 0
    removed: int = 0
    delta: int = 0  # vectors in the delta file after an update that wrote it (0: none)
    images_without_embedding: int = 0
    reason: str = ""
    regions: IndexSummary | None = None  # the regional descriptors' index (embed.regions)
    images_without_regions: int = 0
    local: LocalSummary | None = None  # the local descriptors' (search.local_candidates)

    def lines(self) -> list[str]:
        p = self.info.params
        shape = (
            f"IVF-PQ nlist={p.nlist} m={p.m}x{p.nbits}bit{' +OPQ' if p.opq else ''}, "
            f"nprobe={self.info.nprobe}, exact re-ranking of "
            f"{self.info.k_factor}x{self.info.k} candidates"
            if p.kind == "ivfpq"
            else "exact flat inner-product search"
        )
        out = [
            f"index: {self.info.n_vectors} vectors, dim {self.info.dim}, model "
            f"{self.info.model_fingerprint}: {shape}",
            (
                f"  rebuilt ({self.reason}); recall@{self.info.k} {self.info.recall_at_k:.3f} "
                f"vs exact search; {self.info.build_seconds:.1f} s"
                if self.rebuilt
                else f"  updated: {self.added} added, {self.removed} removed, no retraining"
                + (f" ({self.delta} in the delta file beside the index)" if self.delta else "")
            ),
            f"  {self.folder}",
        ]
        if self.images_without_embedding:
            out.append(
                f"  {self.images_without_embedding} images have no embedding (run "
                f"`cbir embed`; unreadable files are listed there)"
            )
        if self.regions is not None:
            out += ["regions " + line for line in self.regions.lines()]
            if self.images_without_regions:
                out.append(
                    f"  {self.images_without_regions} images have no regional descriptors "
                    f"(run `cbir embed`)"
                )
        if self.local is not None:
            out += self.local.lines()
        return out


def run_index(settings: Settings, *, rebuild: bool = False) -> IndexSummary:
    """Build the index of the current embeddings, or update it in place when that is enough;
    with embed.regions, the same for the index of the regional descriptors beside it, and with
    search.local_candidates, for the local descriptors' (store.local: their features extracted
    into the features cache first where missing).

    New images are added without retraining until the collection outgrows the size the index was
    trained for by `index.rebuild_factor`; images no longer present are removed; a different
    model (fingerprint) means a rebuild.
    """
    fp, ids, vectors, n_missing = current_embeddings(settings)
    lay = layout(settings)
    opened = getattr(vectors, "stamp", None)
    summary = _build_or_update(
        settings,
        lay.index_dir,
        fp,
        faiss_ids(ids),
        vectors,
        rebuild,
        on_dask=True,
        # the rows appended since the opening the index was saved with: the only new ones
        since=added_between(settings, fp, recorded_opening(lay.index_dir), opened, ids),
        opened=opened,
        near=True,
    )
    summary.images_without_embedding = n_missing
    scheme = regions.scheme(settings.embed.regions)
    if scheme is not None:
        tag, owners, _, region_vectors = current_regions(settings, fp, scheme)
        fids = region_ids(owners)
        summary.regions = _build_or_update(
            settings, lay.region_index_dir, tag, fids, region_vectors, rebuild
        )
        summary.images_without_regions = len(ids) - len(set(owners))
    if settings.search.local_candidates > 0:
        summary.local = build_local_index(settings, rebuild=rebuild)
    return summary


def _changes(have: np.ndarray, fids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids in the index that are not among `fids`, sorted; which of `fids` the index lacks).
    `have`: the index's ids, sorted (store.index.sorted_ids). By binary search (FAISS ids are
    unique): np.setdiff1d and np.isin hash every id, 3.8 s at 10^6 against 0.2 s."""
    fids = np.asarray(fids, np.int64)
    if not len(have):
        return have, np.ones(len(fids), bool)
    # the current ids come sorted as hex strings: as FAISS ids (their top bit dropped) two
    # sorted runs, each searched in `have` in order (numpy's search starts where the last
    # ended), which marks both sides at once: 10^7 ids 0.4 s against 0.9 s merging the runs
    # and searching each side in the other
    cuts = np.flatnonzero(fids[1:] < fids[:-1]) + 1
    if len(cuts) > _RUNS_MAX:
        return have[~keys_in(have, fids)], ~keys_in(fids, have)
    hit = np.zeros(len(have), bool)
    found = np.empty(len(fids), bool)
    for lo, hi in zip([0, *cuts], [*cuts, len(fids)], strict=True):
        run = fids[lo:hi]
        at = np.minimum(np.searchsorted(have, run), len(have) - 1)
        found[lo:hi] = ok = have[at] == run
        hit[at[ok]] = True
    return have[~hit], ~found


_RUNS_MAX = 64  # more sorted runs than this: each side searched in the other


def _build_or_update(
    settings: Settings,
    folder: Path,
    fp: str,
    fids: np.ndarray,
    vectors: Rows,
    rebuild: bool,
    *,
    on_dask: bool = False,
    since: np.ndarray | None = None,
    opened: dict[str, Any] | None = None,
    near: bool = False,
) -> IndexSummary:
    """Update the index in `folder` to hold exactly `fids` (vectors of model `fp`), in place
    when it can, else rebuild it. `on_dask`: the vectors are current_embeddings' (the workers
    open them), so with orchestration.dask_address an IVF-PQ build and a large update run as
    Dask tasks (cbir.steps.index_dask). `since` (store.vectors.added_between): the only rows
    that may be new, used where the index and they account for every one of `fids` (then the
    10^7 ids are not compared: 0.4 s); `opened`: the embeddings' stamp, recorded with the
    index; `near`: keep the index's near lists beside it (store.index.keep_near_lists: the
    image index, whose searches probe around each image's own list). The sorted ids file
    lists the index file's ids: it is written with the index file and left as it is by a save
    of the delta (store.index.save_delta)."""
    cfg = settings.index
    address = settings.orchestration.dask_address if on_dask else None
    index, info, reason = reusable_index(folder, fp, rebuild, mapped=True)
    if index is not None and info is not None:
        if info.params.kind == "flat" and len(fids) > FLAT_MAX_N:
            reason = f"collection outgrew exact search ({len(fids)} > {FLAT_MAX_N} vectors)"
        else:
            delta = delta_of(index)
            have: np.ndarray | None = None
            if since is not None and index.ntotal + len(since) == len(fids):
                gone, new_mask = np.zeros(0, np.int64), np.zeros(len(fids), bool)
                new_mask[since] = True
            else:
                have = sorted_ids(folder, index)
                gone, new_mask = _changes(have, fids)
            n_new = int(new_mask.sum())
            on_workers = bool(address) and wants_dask_add(info, n_new)
            # removals, a delta grown past its share, or Dask workers adding: read it whole
            whole = delta is None or (
                on_workers
                or not _in_delta(index.ntotal - delta.ntotal, delta.ntotal + n_new, len(gone))
            )
            if whole and have is None:  # written whole, with its ids: read them while layered
                have = sorted_ids(folder, index)
            if delta is not None and whole:
                try:
                    index, info = load_index(folder)
                except CbirError as exc:  # its checksum is checked now
                    why = str(exc)
                    return _rebuilt(settings, folder, fp, fids, vectors, address, why, opened, near)
                delta = None
            removed = remove_ids(index, info, gone)
            if on_workers and address:
                added = dask_add_vectors(
                    settings,
                    fp,
                    index,
                    info,
                    vectors,
                    fids,
                    np.flatnonzero(new_mask),
                    address,
                    rebuild_factor=cfg.rebuild_factor,
                )
            else:
                added = add_vectors(
                    index,
                    info,
                    vectors[new_mask],
                    fids[new_mask],
                    rebuild_factor=cfg.rebuild_factor,
                )
            if added:
                if delta is not None and n_new:
                    save_delta(index, info, folder, opened)
                elif delta is None and (removed or n_new):
                    assert have is not None
                    save_index(index, info, folder, _after(have, gone, fids[new_mask]), opened)
                if near:
                    keep_near_lists(folder, index)
                return IndexSummary(
                    info=info,
                    folder=folder,
                    rebuilt=False,
                    added=n_new,
                    removed=removed,
                    delta=delta.ntotal if delta is not None else 0,
                )
            reason = (
                f"collection outgrew the trained quantiser ({len(fids)} vectors > "
                f"{cfg.rebuild_factor} x {info.trained_size})"
            )
    reason = reason or "first build"
    return _rebuilt(settings, folder, fp, fids, vectors, address, reason, opened, near)


def _after(have: np.ndarray, gone: np.ndarray, added: np.ndarray) -> np.ndarray:
    """The index's ids, sorted, after `gone` were removed from `have` and `added` added: two
    sorted runs merged by a stable sort."""
    have = have[~keys_in(have, gone)]
    return np.sort(np.concatenate([have, np.sort(added)]), kind="stable")


def _in_delta(n_main: int, n_delta: int, n_gone: int) -> bool:
    """Whether an update goes to the delta file: nothing removed, and the delta stays within
    DELTA_SHARE of the index file (an update large enough for Dask workers reads it whole)."""
    return n_gone == 0 and n_delta <= DELTA_SHARE * n_main


def _rebuilt(
    settings: Settings,
    folder: Path,
    fp: str,
    fids: np.ndarray,
    vectors: Rows,
    address: str | None,
    reason: str,
    opened: dict[str, Any] | None = None,
    near: bool = False,
) -> IndexSummary:
    """Build the index of `fids` anew (as Dask tasks at `address`), and save it (`near`: with
    its near lists)."""
    cfg = settings.index
    params = choose_params(len(fids), vectors.shape[1], bytes_per_vector=cfg.bytes_per_vector)
    if address and params.kind == "ivfpq":  # a flat index has nothing to train
        index, info = dask_build_index(
            settings,
            fp,
            vectors,
            fids,
            params,
            address,
            target_recall=cfg.target_recall,
            seed=cfg.seed,
        )
    else:
        index, info = build_index(
            vectors, fids, params, target_recall=cfg.target_recall, seed=cfg.seed
        )
    info.model_fingerprint = fp
    save_index(index, info, folder, np.sort(fids, kind="stable"), opened)  # two sorted runs
    if near:
        keep_near_lists(folder, index)
    return IndexSummary(info=info, folder=folder, rebuilt=True, added=len(fids), reason=reason)
