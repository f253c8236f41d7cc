"""A deterministic synthetic demo collection: procedural old photographs and archival copies.

``generate_demo_collection`` paints originals (street scenes, landscapes, harbours, studio
portraits, group photos, interiors; mostly greyscale or toned, some faded colour), writes each
original with 1..max_copies-1 near-duplicates made the way archives make them (rescans, crops,
mounts, toning, fading, damage, recompression; composed from ``cbir.degrade``), plus distractor
originals without copies, and a ``ground_truth.csv`` mapping every file to its group. The
pictures come from the kernels in ``cbir.synth`` (``paint_original``, ``archival_copy``); this
step plans the collection, writes it, and refuses a folder that is not the demo's.

Layout under ``out_dir``::

    scans/box-01/scan-000123.jpg   (also .png and .tif; shuffled numbers hide the groups)
    ground_truth.csv               path,group  (path relative to out_dir)
    demo_manifest.json             parameters and file sizes; lets a rerun skip the work

Same arguments give byte-identical files: every original has its own seed derived from ``seed``
with ``numpy.random.SeedSequence``, encoders get fixed settings and no metadata, and the worker
pool only changes which process paints an image, never what it paints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing as mp
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import CbirError
from ..fsutil import atomic_path, clean_stale_tmp, write_json
from ..parallel import start_method
from ..progress import bar
from ..synth.copies import archival_copy
from ..synth.paintings import paint_original

MANIFEST = "demo_manifest.json"
GROUND_TRUTH = "ground_truth.csv"
SCANS = "scans"
_MANIFEST_VERSION = 1  # bump when the painting or the copy recipes (cbir.synth) change
_SCAN_RE = re.compile(r"scan-\d{6}\.(jpg|png|tif)")
_BOX_RE = re.compile(r"box-\d{2}")
_FORMATS = {"jpg": "JPEG", "png": "PNG", "tif": "TIFF"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "JPEG": {"quality": 90},
    "PNG": {"compress_level": 6},
    "TIFF": {"compression": "tiff_lzw"},
}


@dataclass(frozen=True)
class DemoSummary:
    """What ``generate_demo_collection`` wrote."""

    n_images: int
    n_groups: int
    n_distractors: int
    ground_truth: Path
    scans_dir: Path


@dataclass(frozen=True)
class _Job:
    """One original and its copies: painted and written by one worker."""

    seed: np.random.SeedSequence
    group: str
    paths: tuple[str, ...]  # [0] is the original, the rest are copies; relative to out_dir


def _save(img: Image.Image, target: Path) -> int:
    """Write atomically in the format named by the suffix, with fixed settings; return the size."""
    fmt = _FORMATS[target.suffix[1:]]
    arr = np.asarray(img)
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        img = img.convert("L")  # greyscale scans are commonly stored with one channel
    buf = io.BytesIO()
    img.save(buf, format=fmt, **_SAVE_OPTIONS[fmt])
    data = buf.getvalue()
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return len(data)


def _run_job(job: _Job, out_dir: Path, size: int) -> list[tuple[str, int]]:
    # children built explicitly (SeedSequence.spawn counts its calls) so a job always repeats
    key = job.seed.spawn_key
    scene_seed, *copy_seeds = (
        np.random.SeedSequence(job.seed.entropy, spawn_key=(*key, i)) for i in range(len(job.paths))
    )
    original = paint_original(np.random.default_rng(scene_seed), size)
    written = [(job.paths[0], _save(original, out_dir / job.paths[0]))]
    for path, ss in zip(job.paths[1:], copy_seeds, strict=True):
        copy = archival_copy(original, np.random.default_rng(ss))
        written.append((path, _save(copy, out_dir / path)))
    return written


def _run_job_star(args: tuple[_Job, Path, int]) -> list[tuple[str, int]]:
    return _run_job(*args)


def _plan(n_groups: int, n_distractors: int, max_copies: int, seed: int) -> list[_Job]:
    """Decide group sizes, file names, boxes and formats; all from ``seed``."""
    plan_ss, originals_ss = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(plan_ss)
    n_orig = n_groups + n_distractors
    members = np.ones(n_orig, dtype=np.int64)
    members[:n_groups] += rng.integers(1, max_copies, size=n_groups)  # + 1..max_copies-1 copies
    n_images = int(members.sum())
    numbers = rng.permutation(n_images) + 1  # shuffled scan numbers hide who belongs together
    n_boxes = min(99, n_images, max(2, math.ceil(n_images / 100)))
    formats = rng.choice(["jpg", "png", "tif"], size=n_images, p=[0.8, 0.13, 0.07])
    labels = rng.permutation(n_orig)  # group ids do not tell groups from distractors either
    width = max(4, len(str(n_orig - 1)))
    seeds = originals_ss.spawn(n_orig)
    jobs: list[_Job] = []
    k = 0
    for j in range(n_orig):
        paths = []
        for _ in range(int(members[j])):
            num = int(numbers[k])
            box = 1 + (num - 1) * n_boxes // n_images  # a box holds a contiguous number range
            paths.append(f"{SCANS}/box-{box:02d}/scan-{num:06d}.{formats[k]}")
            k += 1
        jobs.append(_Job(seed=seeds[j], group=f"g{int(labels[j]):0{width}d}", paths=tuple(paths)))
    return jobs


def _existing_complete(out_dir: Path, params: dict[str, Any]) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params or not (out_dir / GROUND_TRUTH).is_file():
        return False
    files: dict[str, int] = manifest.get("files", {})
    try:
        return bool(files) and all((out_dir / p).stat().st_size == n for p, n in files.items())
    except OSError:
        return False


def _refuse_foreign(out_dir: Path) -> None:
    """A folder that holds anything and no demo manifest is not the demo's: writing there would
    overwrite scans and a ground truth named like the demo's own."""
    if (out_dir / MANIFEST).is_file() or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CbirError(
            f"{out_dir} is a file, not a folder: choose a new or empty folder for "
            f"the demo collection"
        )
    held = next(iter(sorted(p.name for p in out_dir.iterdir())), None)
    if held is not None:
        raise CbirError(
            f"{out_dir} already holds {held!r} and is not a demo collection (no "
            f"{MANIFEST}): choose a new or empty folder for the demo collection"
        )


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete demo scans of an earlier, different run: they would be images without ground truth.

    Only ``scans/box-NN/scan-NNNNNN.{jpg,png,tif}`` files are touched; anything else is left.
    """
    scans = out_dir / SCANS
    if not scans.is_dir():
        return
    for box in scans.iterdir():
        if not (box.is_dir() and _BOX_RE.fullmatch(box.name)):
            continue
        clean_stale_tmp(box)
        for f in box.iterdir():
            if _SCAN_RE.fullmatch(f.name) and f.relative_to(out_dir).as_posix() not in keep:
                f.unlink()


def generate_demo_collection(
    out_dir: Path,
    *,
    n_groups: int = 150,
    n_distractors: int = 150,
    max_copies: int = 4,
    size: int = 512,
    seed: int = 0,
    progress: bool = False,
    workers: int | None = None,
) -> DemoSummary:
    """Write a synthetic collection with known near-duplicate groups under ``out_dir``.

    ``n_groups`` originals get 1..``max_copies``-1 copies each; ``n_distractors`` originals get
    none. ``workers``: painting processes (None = all cores, 1 = in this process). A rerun with
    the same arguments on a complete output returns at once.
    """
    if n_groups < 0 or n_distractors < 0 or n_groups + n_distractors == 0:
        raise ValueError("need at least one group or distractor")
    if max_copies < 2:
        raise ValueError("max_copies must be >= 2 (an original plus at least one copy)")
    if size < 32:
        raise ValueError("size must be >= 32 pixels")
    out_dir = Path(out_dir)
    params = {
        "version": _MANIFEST_VERSION, "n_groups": n_groups, "n_distractors": n_distractors,
        "max_copies": max_copies, "size": size, "seed": seed,
    }  # fmt: skip
    jobs = _plan(n_groups, n_distractors, max_copies, seed)
    all_paths = {p for job in jobs for p in job.paths}
    summary = DemoSummary(
        len(all_paths), n_groups, n_distractors, out_dir / GROUND_TRUTH, out_dir / SCANS
    )
    if _existing_complete(out_dir, params):
        return summary
    _refuse_foreign(out_dir)

    # empty the manifest's file list first, so an interrupted run is never mistaken for a
    # complete one (the manifest stays: it says the folder is the demo's)
    write_json({"params": params, "files": {}}, out_dir / MANIFEST)
    _remove_stale(out_dir, all_paths)
    sizes = _paint_all([(job, out_dir, size) for job in jobs], workers, progress)
    _write_ground_truth(out_dir, jobs)
    write_json({"params": params, "files": dict(sorted(sizes.items()))}, out_dir / MANIFEST)
    return summary


def _paint_all(
    tasks: list[tuple[_Job, Path, int]], workers: int | None, progress: bool
) -> dict[str, int]:
    """Paint and write every job (in a pool of `workers` processes); returns path -> size."""
    n_workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, workers)
    n_workers = min(n_workers, max(1, len(tasks) // 8))  # a pool is not worth it for a handful
    sizes: dict[str, int] = {}
    pbar = bar(total=len(tasks), desc="demo", unit="original", enabled=progress)
    try:
        if n_workers == 1:
            for result in map(_run_job_star, tasks):
                sizes.update(result)
                pbar.update()
        else:
            preload = ["cbir.synth.paintings", "cbir.synth.copies", "cbir.steps.demo"]
            ctx = mp.get_context(start_method(preload))
            with ctx.Pool(n_workers) as pool:
                for result in pool.imap_unordered(_run_job_star, tasks, chunksize=4):
                    sizes.update(result)
                    pbar.update()
    finally:
        pbar.close()
    return sizes


def _write_ground_truth(out_dir: Path, jobs: list[_Job]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "group"])
    writer.writerows(sorted((p, job.group) for job in jobs for p in job.paths))
    with atomic_path(out_dir / GROUND_TRUTH) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
