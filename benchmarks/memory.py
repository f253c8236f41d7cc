"""Peak memory of `cbir ingest` and `cbir embed` on one 150-megapixel scan, against a tiny image.

Run by hand:  .venv/bin/python benchmarks/memory.py [--width 15000 --height 10000] [--keep DIR]

Each command runs under `/usr/bin/time -v` (GNU time; Debian/Ubuntu package `time`) in a fresh
temporary workspace, and its "Maximum resident set size" is printed in MB. The same commands on
a 96x64 JPEG give the baseline (Python, Pillow, pyarrow, DuckDB, torch and the model), so the
difference is what the large scan costs. Embedding runs with `embed.workers: 0` (decoding in the
main process): with DataLoader workers the decode happens in a child, and GNU time reports the
largest single process, not the sum.

The TIFF is written here, strip by strip (uncompressed 8-bit RGB, 64 rows per strip), so making
it never holds the whole picture in memory. An uncompressed 150-MP RGB picture is 450 MB once
decoded: Pillow has no reduced decoding for TIFF, so that is the floor for one. A JPEG of the
same picture is measured too (`--no-jpeg` skips it): JPEGs decode at a reduced DCT scale (draft
mode), so their cost should stay far below.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROWS_PER_STRIP = 64


def write_striped_tiff(path: Path, width: int, height: int) -> Path:
    """A baseline little-endian RGB TIFF (uncompressed, strips), written without the full array.

    The picture is a smooth diagonal gradient with coloured bands, so it is not blank and every
    strip differs.
    """
    row_bytes = width * 3
    n_strips = -(-height // ROWS_PER_STRIP)
    counts = [min(ROWS_PER_STRIP, height - s * ROWS_PER_STRIP) * row_bytes for s in range(n_strips)]
    # layout: header (8) | IFD | bits-per-sample (6) | strip offsets | strip counts | pixel data
    n_tags = 10
    ifd_at = 8
    ifd_size = 2 + 12 * n_tags + 4
    bps_at = ifd_at + ifd_size
    offsets_at = bps_at + 6
    counts_at = offsets_at + 4 * n_strips
    data_at = counts_at + 4 * n_strips
    offsets = []
    pos = data_at
    for c in counts:
        offsets.append(pos)
        pos += c
    if pos >= 1 << 32:
        raise ValueError("too large for a classic TIFF")

    def tag(code: int, typ: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", code, typ, count, value)

    tags = [
        tag(256, 4, 1, width),  # ImageWidth (LONG)
        tag(257, 4, 1, height),  # ImageLength
        tag(258, 3, 3, bps_at),  # BitsPerSample 8,8,8 (SHORT x3, stored out of line)
        tag(259, 3, 1, 1),  # Compression: none
        tag(262, 3, 1, 2),  # PhotometricInterpretation: RGB
        tag(273, 4, n_strips, offsets_at),  # StripOffsets
        tag(277, 3, 1, 3),  # SamplesPerPixel
        tag(278, 4, 1, ROWS_PER_STRIP),  # RowsPerStrip
        tag(279, 4, n_strips, counts_at),  # StripByteCounts
        tag(284, 3, 1, 1),  # PlanarConfiguration: chunky
    ]
    assert len(tags) == n_tags
    x = np.arange(width, dtype=np.uint32)
    with open(path, "wb") as fh:
        fh.write(b"II*\x00" + struct.pack("<I", ifd_at))
        fh.write(struct.pack("<H", n_tags) + b"".join(tags) + struct.pack("<I", 0))
        fh.write(struct.pack("<HHH", 8, 8, 8))
        fh.write(struct.pack(f"<{n_strips}I", *offsets))
        fh.write(struct.pack(f"<{n_strips}I", *counts))
        for s in range(n_strips):
            y = np.arange(s * ROWS_PER_STRIP, s * ROWS_PER_STRIP + counts[s] // row_bytes,
                          dtype=np.uint32)[:, None]
            strip = np.empty((y.shape[0], width, 3), np.uint8)
            strip[..., 0] = ((x[None, :] * 255) // max(1, width - 1)).astype(np.uint8)
            strip[..., 1] = ((y * 255) // max(1, height - 1)).astype(np.uint8)
            strip[..., 2] = (((x[None, :] + y) // 500) % 2 * 200).astype(np.uint8)
            fh.write(strip.tobytes())
    return path


def _params(ws: Path) -> Path:
    params = ws / "params.yaml"
    params.write_text(
        "data:\n  scans_dir: scans\n  ground_truth: null\n"
        "ingest:\n  workers: 1\n"
        "embed:\n  workers: 0\n  batch_size: 1\n"
        "orchestration:\n  lock_timeout: 0\n")
    return params


def peak_rss_mb(cmd: list[str], cwd: Path) -> float:
    """Run `cmd` under /usr/bin/time -v; its maximum resident set size in MB (1e6 bytes)."""
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
    if m is None:
        raise SystemExit("no 'Maximum resident set size' in the output of /usr/bin/time -v")
    return int(m.group(1)) * 1024 / 1e6


def measure(ws: Path, make_scan) -> dict[str, float]:
    (ws / "scans").mkdir(parents=True)
    make_scan(ws / "scans")
    params = _params(ws)
    cli = [sys.executable, "-m", "cbir.cli"]
    peaks = {step: peak_rss_mb([*cli, step, "--params", str(params)], REPO)
             for step in ("ingest", "embed")}
    import pyarrow.parquet as pq

    rows = pq.read_table(ws / "data" / "manifest" / "files.parquet").to_pylist()
    if [r["status"] for r in rows] != ["ok"]:
        raise SystemExit(f"the scan in {ws / 'scans'} was not ingested: {rows}")
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=15000)
    ap.add_argument("--height", type=int, default=10000)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    ap.add_argument("--no-jpeg", action="store_true", help="skip the large JPEG")
    args = ap.parse_args()
    if not Path("/usr/bin/time").is_file():
        raise SystemExit("skipped: /usr/bin/time is absent (install the Debian package `time`)")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the large JPEG is made from the large TIFF here

    def tiny(scans: Path) -> None:
        Image.new("RGB", (96, 64), (120, 80, 40)).save(scans / "tiny.jpg")

    def big(scans: Path) -> None:
        write_striped_tiff(scans / "big.tif", args.width, args.height)

    def big_jpeg(scans: Path) -> None:
        write_striped_tiff(scans.parent / "big.tif", args.width, args.height)
        with Image.open(scans.parent / "big.tif") as im:
            im.save(scans / "big.jpg", quality=90)
        (scans.parent / "big.tif").unlink()

    tmp = Path(tempfile.mkdtemp(dir=args.keep)) if args.keep else Path(tempfile.mkdtemp())
    try:
        rows = {"tiny JPEG": measure(tmp / "tiny", tiny), "large TIFF": measure(tmp / "tif", big)}
        if not args.no_jpeg:
            rows["large JPEG"] = measure(tmp / "jpg", big_jpeg)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    mp = args.width * args.height / 1e6
    print(f"peak RSS (MB = 1e6 bytes, /usr/bin/time -v): {args.width}x{args.height} = {mp:.0f} MP "
          f"RGB ({args.width * args.height * 3 / 1e6:.0f} MB decoded) vs a 96x64 JPEG")
    print(f"{'scan':12s} {'ingest':>8s} {'(extra)':>8s} {'embed':>8s} {'(extra)':>8s}")
    base = rows["tiny JPEG"]
    for name, r in rows.items():
        print(f"{name:12s} {r['ingest']:8.0f} {r['ingest'] - base['ingest']:+8.0f} "
              f"{r['embed']:8.0f} {r['embed'] - base['embed']:+8.0f}")


if __name__ == "__main__":
    main()
