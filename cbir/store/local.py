"""The index of the collection's local descriptors (cbir.votes), in `data.index_dir/local/`.

Built by `cbir index` when search.local_candidates > 0, from the features cache
(cbir.store.features: pictures missing there are extracted first): each canonical picture's
strongest index.local_keypoints RootSIFT descriptors, each under a FAISS id made of its picture's
id (faiss_index.owner_key) and its keypoint's number in the low bits, so a hit names its
picture without a table and a picture's descriptors are added and removed with it. 8-bit
scalar-quantised codes (faiss_index.choose_sq8_params): 128 bytes a descriptor and an 8-byte
id, about 41 kB a picture at 300 descriptors (the features cache itself holds 136 kB a
picture).

Saved as the global index is (store.index.save_index: staged file, sidecar as the commit), so a
kill leaves the previous index or the new one; the sidecar's fingerprint is the recipe (features
recipe and keypoints a picture): a change of either rebuilds it. A changed collection updates it
in place (pictures gone removed, new ones added) until it outgrows its trained quantiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import votes
from ..arrays import unique_sorted
from ..faiss_index import (
    MAX_LOCAL,
    IndexInfo,
    add_vectors,
    build_index,
    choose_sq8_params,
    index_ids,
    owner_key,
    remove_ids,
)
from ..faiss_index import search as faiss_search
from ..verify import Features
from .features import RECIPE, FeatureCache, extract_missing, feature_cache
from .index import load_index, reusable_index, save_index
from .layout import layout
from .manifest import canonical_images

if TYPE_CHECKING:
    from ..config import Settings

#: Pictures whose descriptors are read and added at a time (bounds the memory of a build).
CHUNK = 2000


def recipe(keypoints: int) -> str:
    """What the index's descriptors are: the features' recipe and the cap a picture."""
    return f"{RECIPE}-top{keypoints}"


def descriptors(f: Features, keypoints: int) -> tuple[np.ndarray, np.ndarray]:
    """A picture's strongest `keypoints` RootSIFT descriptors and their keypoint numbers (a
    blank patch's all-zero descriptor has no direction and is left out)."""
    d = f.descriptors[:keypoints]
    keep = np.flatnonzero(np.einsum("ij,ij->i", d, d) > 0.5)
    return np.ascontiguousarray(d[keep]), keep.astype(np.int64)


@dataclass
class LocalSummary:
    info: IndexInfo
    folder: Path
    rebuilt: bool
    reason: str = ""
    added: int = 0  # pictures
    removed: int = 0
    without_features: int = 0  # canonical pictures whose scan could not be read
    pictures: int = 0  # pictures indexed

    def lines(self) -> list[str]:
        p = self.info.params
        per = self.info.n_vectors / max(1, self.pictures)
        shape = f"IVF nlist={p.nlist} nprobe={self.info.nprobe}" if p.nlist else "exact scan"
        out = [
            f"local index: {self.info.n_vectors} descriptors of {self.pictures} pictures "
            f"({per:.0f} a picture), 8-bit codes, {shape}",
            (
                f"  rebuilt ({self.reason}); {self.info.build_seconds:.1f} s"
                if self.rebuilt
                else f"  updated: {self.added} pictures added, {self.removed} removed"
            ),
            f"  {self.folder}",
        ]
        if self.without_features:
            out.append(f"  {self.without_features} pictures have no local features (unreadable)")
        return out


def build_local_index(
    settings: Settings, *, rebuild: bool = False, progress: bool = False
) -> LocalSummary:
    """Bring the local descriptors' index up to date with the collection (module docstring)."""
    keypoints = settings.index.local_keypoints
    folder = layout(settings).local_index_dir
    tag = recipe(keypoints)
    index, info, reason = reusable_index(folder, tag, rebuild, "descriptors changed")
    cache = feature_cache(settings)
    files, failed, _ = extract_missing(settings, cache, progress=progress)
    ids = [i for i in sorted(files) if i not in failed and i in cache]
    if index is not None and info is not None:
        fids = index_ids(index)
        have = owner_key(fids, MAX_LOCAL)
        want = owner_key(ids, MAX_LOCAL)
        stale = ~np.isin(have, want)
        new = [i for i, fresh in zip(ids, ~np.isin(want, have), strict=True) if fresh]
        remove_ids(index, info, fids[stale])
        if _add(index, info, cache, new, keypoints, settings.index.rebuild_factor):
            if stale.any() or new:
                save_index(index, info, folder)
            return LocalSummary(
                info=info,
                folder=folder,
                rebuilt=False,
                added=len(new),
                removed=len(unique_sorted(have[stale])),
                without_features=len(files) - len(ids),
                pictures=len(ids),
            )
        reason = "collection outgrew the trained quantiser"
    index, info = _build(cache, ids, keypoints, settings.index.seed)
    info.model_fingerprint = tag
    save_index(index, info, folder)
    return LocalSummary(
        info=info,
        folder=folder,
        rebuilt=True,
        reason=reason or "first build",
        added=len(ids),
        without_features=len(files) - len(ids),
        pictures=len(ids),
    )


def _read(cache: FeatureCache, ids: Sequence[str], keypoints: int) -> tuple[np.ndarray, np.ndarray]:
    """The descriptors of these pictures and their FAISS ids (a picture unreadable in the cache
    since: left out)."""
    vecs, fids = [], []
    for image_id in ids:
        f = cache.get(image_id)
        if f is None:
            continue
        d, number = descriptors(f, keypoints)
        vecs.append(d)
        fids.append(owner_key([image_id], MAX_LOCAL)[0] | number)
    if not vecs:
        return np.zeros((0, 128), np.float32), np.zeros(0, np.int64)
    return np.concatenate(vecs), np.concatenate(fids)


def _add(
    index: Any,
    info: IndexInfo,
    cache: FeatureCache,
    ids: Sequence[str],
    keypoints: int,
    rebuild_factor: float,
) -> bool:
    """Add these pictures' descriptors in chunks; False (when the quantiser is outgrown)."""
    for at in range(0, len(ids), CHUNK):
        x, fids = _read(cache, ids[at : at + CHUNK], keypoints)
        if not add_vectors(index, info, x, fids, rebuild_factor=rebuild_factor):
            return False
    return True


def _build(
    cache: FeatureCache, ids: Sequence[str], keypoints: int, seed: int
) -> tuple[Any, IndexInfo]:
    """Train on the descriptors of a random sample of the pictures, then add the rest."""
    n = sum(min(cache.keypoints(i), keypoints) for i in ids)
    params = choose_sq8_params(n)
    rng = np.random.default_rng(seed)
    k = min(len(ids), max(1, math.ceil(params.train_size / keypoints)))
    chosen = set(rng.choice(len(ids), size=k, replace=False).tolist()) if ids else set()
    sample = [ids[i] for i in sorted(chosen)]
    x, fids = _read(cache, sample, keypoints)
    index, info = build_index(x, fids, params, target_recall=None, seed=seed)
    info.trained_size = max(n, info.n_vectors)  # sized for all of them, trained on the sample
    rest = [i for j, i in enumerate(ids) if j not in chosen]
    _add(index, info, cache, rest, keypoints, rebuild_factor=math.inf)
    return index, info


@dataclass
class LocalSearcher:
    """The local descriptors' index, answering a query's features with the pictures its
    keypoints vote for."""

    index: Any
    info: IndexInfo
    image_of_key: dict[int, str]

    def votes(self, queries: Sequence[Features | None], n: int) -> list[list[tuple[str, int]]]:
        """Per query, up to n (image_id, votes) best first ([] for None)."""
        parts = [votes.query_descriptors(q) if q is not None else None for q in queries]
        stacked = [p for p in parts if p is not None and len(p)]
        out: list[list[tuple[str, int]]] = [[] for _ in queries]
        if not stacked or n <= 0:
            return out
        sims, fids = faiss_search(self.index, self.info, np.concatenate(stacked), votes.K + 1)
        keys = np.where(fids >= 0, owner_key(fids, MAX_LOCAL), -1)
        at = 0
        for q, p in enumerate(parts):
            if p is None or not len(p):
                continue
            rows = slice(at, at + len(p))
            at += len(p)
            if sims.shape[1] < 2:  # an index of one descriptor has no background
                continue
            hits = [
                (self.image_of_key[key], v)
                for key, v in votes.tally(sims[rows], keys[rows])
                if key in self.image_of_key  # a picture gone since the index was built
            ]
            out[q] = hits[:n]
        return out


def open_local(settings: Settings) -> LocalSearcher | None:
    """The local descriptors' index when search.local_candidates asks for it (None when off);
    raises NoIndex / CbirError when it was not built or is damaged or of other descriptors."""
    if settings.search.local_candidates <= 0:
        return None
    tag = recipe(settings.index.local_keypoints)
    index, info = load_index(layout(settings).local_index_dir, expected_fingerprint=tag)
    ids = [r["image_id"] for r in canonical_images(settings)]
    keys = owner_key(ids, MAX_LOCAL)
    return LocalSearcher(index, info, {int(k): i for k, i in zip(keys, ids, strict=True)})
