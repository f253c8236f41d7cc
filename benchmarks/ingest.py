"""Ingest throughput against a plain Pillow decode loop, and the cost of an unchanged rerun.

Run by hand:  .venv/bin/python benchmarks/ingest.py [--repeat 3] [--folder ../shared/data]

Both sides are measured in the same run, interleaved, and the medians compared, because this
machine is shared and noisy. Targets: ingest throughput >= 0.7 x the plain loop; an unchanged
rerun <= 0.05 x the first run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from cbir.config import load_settings
from cbir.steps.ingest import run_ingest

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".jp2"}


def plain_loop(files: list[Path]) -> float:
    """Open and fully decode every file with Pillow, in one process."""
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            im.load()
    return time.perf_counter() - t0


def ingest_once(folder: Path) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(f"data:\n  scans_dir: {folder}\n")
        settings = load_settings(params)
        t0 = time.perf_counter()
        first = run_ingest(settings)
        t1 = time.perf_counter()
        rerun = run_ingest(settings)
        t2 = time.perf_counter()
        assert rerun.decoded == 0, "an unchanged rerun decoded files"
        return t1 - t0, t2 - t1, first.counts.get("new", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"skipped: {args.folder} is absent (the real photographs live there)")
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    plain_loop(files)  # warm the page cache so both sides read from memory

    plain, first, rerun = [], [], []
    n = 0
    for _ in range(args.repeat):
        plain.append(plain_loop(files))
        f, r, n = ingest_once(args.folder)
        first.append(f)
        rerun.append(r)
    p, f, r = (statistics.median(x) for x in (plain, first, rerun))
    print(f"files: {len(files)} ({n} ingested) in {args.folder}")
    print(f"plain Pillow decode loop: {p:.3f} s  ({len(files) / p:.0f} files/s)")
    print(f"cbir ingest, first run:  {f:.3f} s  ({n / f:.0f} files/s)")
    print(f"cbir ingest, unchanged rerun: {r:.4f} s")
    thr = p / f
    ratio = r / f
    print(f"throughput ratio ingest/plain: {thr:.2f}  (target >= 0.70: "
          f"{'PASS' if thr >= 0.7 else 'FAIL'})")
    print(f"rerun/first ratio: {ratio:.3f}  (target <= 0.05: {'PASS' if ratio <= 0.05 else 'FAIL'})")


if __name__ == "__main__":
    main()
