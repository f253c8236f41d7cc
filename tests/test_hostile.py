"""Hostile inputs: each gets a clear, specific error (or is handled correctly) and the data that
was there before is left exactly as it was.

* Bad scans are quarantined with a reason by `cbir ingest`, which goes on and leaves the rows of
  the images ingested before unchanged. The classes of the foundation issue (zero-byte,
  truncated, random bytes, text, pixel-limit bomb, broken symlink, symlink out of the root) are
  built by tests/test_ingest.py's `_bad_input_folder`; the unreadable file and the file that
  vanishes after the walk get their own tests here, as do the new classes.
* Awkward but valid scans (CMYK JPEG with an ICC profile, 16-bit greyscale, palette PNG with
  transparency, a TIFF of 100,000 pages) are ingested and embedded, with sensible RGB pixels.
* File names with a newline, quotes, `..`, HTML and bytes that are not UTF-8 are accepted: the
  manifest keeps the exact bytes (path_raw) and a printable UTF-8 `path` (undecodable bytes shown
  as \\xNN), which the catalogue, pairs, evaluation and the escaped HTML gallery use.
* Bad params, ground truth, damaged index/manifest/shard/checkpoint files and pickled
  checkpoints make the CLI exit 2 with one line `cbir STEP: error: ...`, and every file under
  data/ is byte-for-byte unchanged.

CLI cases run `cli.main` in this process (the same code as `python -m cbir.cli`, without the
interpreter start-up); `make faults` also runs each of them as a real subprocess.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import io
import os
import pickle
import re
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from cbir import cli, imaging, ingest
from cbir.config import load_settings
from cbir.embed import embeddings_dir, load_embeddings, run_embed
from cbir.imaging import PAGE_COUNT_LIMIT
from cbir.index import load_index, run_index
from cbir.ingest import run_ingest
from cbir.model import CHECKPOINT_FORMAT, retrieval_model, save_checkpoint
from cbir.search import run_pairs
from conftest import CBIR, REPO, as_archive_user, open_catalogue, photo, save, write_params
from test_ingest import EXPECTED_REASONS, _bad_input_folder

FAST = {
    "ingest": {"workers": 1},
    "embed": {"resolution": 32, "batch_size": 16, "shard_size": 8, "workers": 0},
    "search": {"k": 4, "pair_threshold": 0.5, "cluster_threshold": 0.9},
    "evaluate": {"ks": [1, 3], "baselines": False},
    "report": {"thumb_size": 64},
    "orchestration": {"lock_timeout": 0},
}


# --------------------------------------------------------------------------- helpers

def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (the writer lock's scratch file aside)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ".cbir.lock":
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def manifest_rows(settings) -> list[dict]:
    """Manifest rows without last_run (an ingest run that changes nothing still counts)."""
    rows = pq.read_table(settings.path(settings.data.manifest_dir) / "files.parquet").to_pylist()
    return sorted(({k: v for k, v in r.items() if k != "last_run"} for r in rows),
                  key=lambda r: (r["path_raw"], r["version"]))


def quarantine(settings) -> dict[str, str]:
    path = settings.path(settings.data.manifest_dir) / "quarantine.parquet"
    return {r["path"]: r["reason"] for r in pq.read_table(path).to_pylist()}


def run_cli(mode: str, capsys, *argv: str) -> tuple[int, str]:
    """Run `cbir ARGV` in this process or as a subprocess: (exit code, stderr)."""
    if mode == "subprocess":
        out = subprocess.run([*CBIR, *argv], capture_output=True, text=True, cwd=REPO)
        assert "Traceback" not in out.stderr, out.stderr
        return out.returncode, out.stderr
    capsys.readouterr()
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, step: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cbir {step}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


MODES = ["in-process", pytest.param("subprocess", marks=pytest.mark.faults_full)]


def case(case_id: str, *values: object, full: bool = False) -> object:
    """A parametrised case; `full`: only in the full matrix (`make faults`), because CI already
    covers its class with another case."""
    return pytest.param(*values, id=case_id, marks=[pytest.mark.faults_full] if full else [])


def ingested(workspace, **params) -> tuple[object, list[dict]]:
    """Two good scans ingested; returns (settings, their manifest rows)."""
    save(photo(20), workspace.scans / "keep" / "a.jpg", quality=90)
    save(photo(21), workspace.scans / "keep" / "b.png")
    settings = workspace(**params)
    run_ingest(settings)
    return settings, manifest_rows(settings)


def kept_rows(settings, before: list[dict]) -> None:
    """The rows ingested before are still there, unchanged."""
    now = {(r["path_raw"], r["version"]): r for r in manifest_rows(settings)}
    for r in before:
        assert now[(r["path_raw"], r["version"])] == r


# --------------------------------------------------------------------------- crafted files

def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))


def tiff_with_pages(n: int) -> bytes:
    """A greyscale 8x8 TIFF of `n` pages: page 1 is a ramp, every other page shares one white
    strip (12 bytes of IFD per tag, so 100,000 pages fit in 10 MB)."""
    first = bytes(range(0, 256, 4))  # 64 px ramp
    white = b"\xff" * 64
    tags = 8
    ifd = 2 + 12 * tags + 4
    ifd0 = 8 + 128
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd0) + first + white)
    for i in range(n):
        at = ifd0 + i * ifd
        strip = 8 if i == 0 else 8 + 64
        entries = [(256, 3, 1, 8), (257, 3, 1, 8), (258, 3, 1, 8), (259, 3, 1, 1),
                   (262, 3, 1, 1), (273, 4, 1, strip), (278, 3, 1, 8), (279, 4, 1, 64)]
        out += struct.pack("<H", tags) + b"".join(struct.pack("<HHII", *e) for e in entries)
        out += struct.pack("<I", at + ifd if i < n - 1 else 0)
    return bytes(out)


def cmyk_icc_profile() -> bytes:
    """A minimal ICC header declaring an output profile for CMYK data (no tags): what the
    decoder meets in a Photoshop CMYK JPEG, without shipping a real press profile."""
    header = bytearray(128)
    header[8:12] = b"\x02\x10\x00\x00"  # version 2.1
    header[12:16], header[16:20], header[20:24] = b"prtr", b"CMYK", b"Lab "
    header[36:40] = b"acsp"
    body = bytes(header) + struct.pack(">I", 0)
    return struct.pack(">I", len(body)) + body[4:]


# The colours of the CMYK test card: (C, M, Y, K) -> the RGB a reader expects, roughly.
CMYK_PATCHES = [((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 255, 0), (0, 255, 0)),
                ((255, 255, 0, 0), (0, 0, 255)), ((0, 0, 0, 255), (0, 0, 0)),
                ((0, 0, 0, 0), (255, 255, 255))]


def make_cmyk_jpeg(path: Path) -> None:
    card = Image.new("CMYK", (40 * len(CMYK_PATCHES), 40))
    for i, (cmyk, _) in enumerate(CMYK_PATCHES):
        card.paste(cmyk, (40 * i, 0, 40 * (i + 1), 40))
    card.save(path, "JPEG", quality=95, icc_profile=cmyk_icc_profile())


def check_cmyk(rgb: Image.Image, info: dict) -> None:
    assert info["mode"] == "CMYK"
    a = np.asarray(rgb, dtype=np.int16)
    for i, (_, want) in enumerate(CMYK_PATCHES):
        got = a[20, 40 * i + 20]
        assert np.abs(got - np.array(want)).max() <= 40, (i, got, want)


def make_grey16(path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 96).reshape(64, 96).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # I;16 TIFF


def check_grey16(rgb: Image.Image, info: dict) -> None:
    assert info["mode"].startswith("I;16")
    a = np.asarray(rgb)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # grey
    grey = a[..., 0].astype(int).ravel()
    assert grey[0] == 0 and grey[-1] == 255  # the full range, scaled
    assert (np.diff(grey) >= 0).all() and len(np.unique(grey)) > 200  # ramp kept, not clipped


def make_dark16(path: Path) -> None:
    dark = np.full((64, 96), 100, np.uint16)  # 100 of 65535: nearly black
    dark[:8, :8] = 200
    # big-endian samples, as older Mac software wrote them
    Image.frombytes("I;16B", (96, 64), dark.astype(">u2").tobytes()).save(path)


def check_dark16(rgb: Image.Image, info: dict) -> None:
    assert info["mode"].startswith("I;16")
    # scaled by the 16-bit range, not stretched from its own maximum (that made it grey, 100/255)
    assert np.asarray(rgb).max() <= 1


def make_palette_png(path: Path) -> None:
    im = Image.new("P", (64, 32), 0)
    im.putpalette([0, 0, 0, 0, 0, 255, 255, 0, 0] + [0] * (253 * 3))
    im.paste(1, (32, 0, 64, 16))  # opaque blue
    im.paste(2, (32, 16, 64, 32))  # red at half opacity
    im.save(path, transparency=bytes([0, 255, 128]))  # index 0 fully transparent


def check_palette(rgb: Image.Image, info: dict) -> None:
    assert info["mode"] == "P"
    a = np.asarray(rgb, dtype=np.int16)
    assert tuple(a[16, 10]) == (255, 255, 255)  # transparent: composited on white
    assert tuple(a[8, 48]) == (0, 0, 255)
    assert np.abs(a[24, 48] - np.array([255, 127, 127])).max() <= 2  # half red over white


def make_pages(path: Path) -> None:
    path.write_bytes(tiff_with_pages(100_000))


def check_pages(rgb: Image.Image, info: dict) -> None:
    # the first page is the one used; the count stops at the limit instead of reading 10 MB of
    # page headers one quadratic step at a time (Pillow's n_frames: 40 s for this file)
    assert info["pages"] == PAGE_COUNT_LIMIT
    assert np.asarray(rgb)[0, :8, 0].tolist() == list(range(0, 32, 4))


# name -> (make the file, check the decoded RGB picture and manifest row)
ACCEPTED: dict[str, tuple[Callable[[Path], None], Callable[[Image.Image, dict], None]]] = {
    "cmyk.jpg": (make_cmyk_jpeg, check_cmyk),
    "grey16.tif": (make_grey16, check_grey16),
    "dark16.tif": (make_dark16, check_dark16),
    "palette.png": (make_palette_png, check_palette),
    "pages.tif": (make_pages, check_pages),
}


# --------------------------------------------------------------------------- bad scans

def test_the_foundation_bad_files_are_quarantined_and_earlier_rows_kept(workspace, tmp_path):
    settings, before = ingested(workspace, ingest={"max_pixels": 50_000, "workers": 2})
    _bad_input_folder(workspace.scans, tmp_path / "outside")
    summary = run_ingest(settings)
    q = quarantine(settings)
    assert set(q) == set(EXPECTED_REASONS)
    for name, fragment in EXPECTED_REASONS.items():
        assert fragment in q[name], (name, q[name])
    kept_rows(settings, before)
    assert summary.counts["new"] == 1  # good.jpg only
    assert run_ingest(settings).decoded == 0  # the bad files are not retried while unchanged


def test_a_png_declaring_a_huge_size_is_refused_before_decoding(workspace):
    """Rejected by the default pixel limit from its header alone: 30 GB are never allocated."""
    settings, before = ingested(workspace)
    assert settings.ingest.max_pixels == 200_000_000  # the shipped default, not a test value
    (workspace.scans / "huge.png").write_bytes(png_declaring(100_000, 100_000))
    (workspace.scans / "just-over.png").write_bytes(png_declaring(20_000, 10_001))
    t0 = time.perf_counter()
    run_ingest(settings)
    assert time.perf_counter() - t0 < 30
    q = quarantine(settings)
    assert "100000x100000 = 10,000,000,000 pixels exceeds the limit" in q["huge.png"]
    assert "20000x10001 = 200,020,000 pixels exceeds the limit of 200,000,000" in \
        q["just-over.png"]
    kept_rows(settings, before)


def test_an_unreadable_file_is_quarantined_and_earlier_rows_kept(workspace):
    settings, before = ingested(workspace)
    locked = save(photo(2), workspace.scans / "locked.jpg")
    locked.chmod(0)
    cmd = as_archive_user([*CBIR, "ingest", "--params", str(settings.params_path)])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "permission denied" in quarantine(settings)["locked.jpg"]
    kept_rows(settings, before)


def test_a_file_vanishing_after_the_walk_is_quarantined_and_earlier_rows_kept(workspace,
                                                                               monkeypatch):
    settings, before = ingested(workspace)
    save(photo(3), workspace.scans / "gone.jpg")
    real_walk = ingest.walk_scans

    def walk_then_delete(root, ignore):
        entries = list(real_walk(root, ignore))
        (workspace.scans / "gone.jpg").unlink()
        return iter(entries)

    monkeypatch.setattr(ingest, "walk_scans", walk_then_delete)
    run_ingest(settings)
    assert "disappeared" in quarantine(settings)["gone.jpg"]
    kept_rows(settings, before)


# --------------------------------------------------------------------------- awkward valid scans

@pytest.mark.parametrize("name", list(ACCEPTED))
def test_awkward_scans_decode_to_sensible_rgb(tmp_path, name):
    make, check = ACCEPTED[name]
    path = tmp_path / name
    make(path)
    t0 = time.perf_counter()
    rgb, info = imaging.open_scan(str(path))  # what embedding, training and thumbnails see
    assert time.perf_counter() - t0 < 10
    assert rgb.mode == "RGB"
    check(rgb, dataclasses.asdict(info))


def test_awkward_scans_are_ingested_and_embedded(workspace):
    settings, before = ingested(workspace, **FAST)
    for name, (make, _) in ACCEPTED.items():
        make(workspace.scans / name)
    t0 = time.perf_counter()
    summary = run_ingest(settings)
    assert time.perf_counter() - t0 < 60  # the 100,000-page TIFF alone took 40 s before
    assert summary.counts.get("quarantined", 0) == 0, quarantine(settings)
    rows = {r["path"]: r for r in manifest_rows(settings)}
    for name, (_, check) in ACCEPTED.items():
        assert rows[name]["status"] == "ok"
        # the ingest worker decodes its own way (draft, greyscale, no RGB): same facts
        rgb, info = imaging.open_scan(str(workspace.scans / name))
        assert (info.width, info.height, info.mode) == \
            (rows[name]["width"], rows[name]["height"], rows[name]["mode"])
        check(rgb, rows[name])
    kept_rows(settings, before)

    embedded = run_embed(settings)
    assert embedded.failed == []
    ids, vectors = load_embeddings(embedded.folder)
    assert {rows[n]["image_id"] for n in ACCEPTED} <= set(ids)
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


# --------------------------------------------------------------------------- hostile file names

HOSTILE_NAMES = [
    b"line\nbreak.jpg",
    b"quote\"s and 'apostrophes'.jpg",
    b"up..down/x..after-dots.png",  # `..` inside a folder's name and a file's
    b"<b>bold</b> & <script>alert(1)</script>.jpg",
    b"caf\xe9 latin-1.jpg",  # not UTF-8
    "ünïcödé ✓.jpg".encode(),
]


def display(raw: bytes) -> str:
    """How the manifest shows a raw name (undecodable bytes as \\xNN)."""
    return raw.decode("utf-8", "backslashreplace")


def test_hostile_file_names_round_trip_through_every_step(tmp_path):
    ws = tmp_path / "ws"
    scans = os.fsencode(ws / "scans")
    for i, raw in enumerate(HOSTILE_NAMES):
        full = os.path.join(scans, raw)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        buf = io.BytesIO()
        # two groups of near-duplicates: the same picture at different sizes
        photo(i % 2, (96 - 4 * i, 64 - 2 * i)).save(buf, "PNG" if raw.endswith(b".png")
                                                      else "JPEG", quality=90)
        with open(full, "wb") as fh:
            fh.write(buf.getvalue())
    # ground truth in UTF-8: non-UTF-8 names are written as the manifest shows them
    gt = ws / "ground_truth.csv"
    with open(gt, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "group"])
        for i, raw in enumerate(HOSTILE_NAMES):
            w.writerow([f"scans/{display(raw)}", f"g{i % 2}"])
    params = write_params(ws, {"data": {"scans_dir": "scans", "ground_truth": "ground_truth.csv"},
                               **FAST})
    settings = load_settings(params)
    steps = ("ingest", "embed", "index", "pairs", "evaluate", "report")
    for step in steps:
        assert cli.main([step, "--params", str(params)]) == 0, step

    rows = manifest_rows(settings)
    assert sorted(r["path_raw"] for r in rows) == sorted(HOSTILE_NAMES)
    assert all(r["status"] == "ok" and r["path"] == display(r["path_raw"]) for r in rows)
    shown = {display(raw) for raw in HOSTILE_NAMES}
    assert "caf\\xe9 latin-1.jpg" in shown

    con = open_catalogue(settings)
    assert {r[0] for r in con.execute("SELECT path FROM images").fetchall()} == shown
    in_pairs = con.execute("SELECT path_a, path_b FROM duplicate_pairs").fetchall()
    con.close()
    assert in_pairs and {p for pair in in_pairs for p in pair} <= shown

    ids = {r["image_id"] for r in rows}
    fp = retrieval_model(settings)[2]
    assert set(load_embeddings(embeddings_dir(settings, fp))[0]) == ids
    assert load_index(settings.path(settings.data.index_dir))[1].n_vectors == len(ids)
    neighbours = pq.read_table(settings.path(settings.data.reports_dir) / "neighbors.parquet")
    assert set(neighbours.column("query_path").to_pylist()) == shown

    gallery = settings.path(settings.data.reports_dir) / "gallery"
    pages = "".join(p.read_text(encoding="utf-8") for p in gallery.glob("*.html"))
    assert "<script>alert(1)</script>" not in pages and "<b>bold</b>" not in pages
    for name in shown:
        assert html.escape(name, quote=True) in pages, name
    # every link to a scan is percent-encoded and leads to the file, whatever its bytes
    links = {unquote_to_bytes(html.unescape(h)) for h in re.findall(r'href="([^"]+)"', pages)}
    targets = {os.path.normpath(os.path.join(os.fsencode(gallery), link)) for link in links
               if not link.endswith(b".html")}
    assert all(os.path.exists(t) for t in targets)
    assert {t for t in targets if t.startswith(scans)} == \
        {os.path.normpath(os.path.join(scans, raw)) for raw in HOSTILE_NAMES}


# --------------------------------------------------------------------------- the CLI steps

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A workspace that went through ingest, embed, index, pairs and evaluate, with a model
    checkpoint (of the same weights, so embeddings stay valid) and a ground truth."""
    ws = tmp_path_factory.mktemp("built") / "ws"
    scans = ws / "scans"
    lines = ["path,group"]
    for i in range(5):
        save(photo(i), scans / f"p{i}.jpg", quality=90)
        save(photo(i).resize((80, 54)), scans / "copies" / f"p{i}.png")
        lines += [f"scans/p{i}.jpg,g{i}", f"scans/copies/p{i}.png,g{i}"]
    (ws / "ground_truth.csv").write_text("\n".join(lines) + "\n")
    params = write_params(ws, {"data": {"scans_dir": "scans",
                                        "ground_truth": "ground_truth.csv"}, **FAST})
    settings = load_settings(params)
    run_ingest(settings)
    model, pp, _, _ = retrieval_model(settings)
    save_checkpoint(settings.path(settings.model.checkpoint), model, pp)
    run_embed(settings)
    run_index(settings)
    run_pairs(settings)
    assert cli.main(["evaluate", "--params", str(params)]) == 0
    return ws


@pytest.fixture
def ws(built, tmp_path) -> Path:
    """A private copy of the built workspace (paths in its params are relative)."""
    return Path(shutil.copytree(built, tmp_path / "ws", symlinks=True))


def params_of(ws: Path) -> dict:
    return yaml.safe_load((ws / "params.yaml").read_text())


def set_params(ws: Path, **sections) -> None:
    params = params_of(ws)
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values} if isinstance(values, dict) else values
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


BAD_PARAMS = [
    # (step, section, value, what the error names)
    case("out-of-range", "ingest", "ingest", {"max_pixels": -5}, "ingest.max_pixels"),
    case("str-for-list", "ingest", "ingest", {"ignore": "*.tmp"},
         "ingest.ignore: Input should be a valid list"),
    case("bool-for-int", "ingest", "ingest", {"workers": True},
         "ingest.workers: Value error, expected a number, got a boolean"),
    case("list-for-section", "ingest", "ingest", [1, 2],
         "ingest: Input should be a valid dictionary"),
    case("int-for-path", "ingest", "data", {"scans_dir": 42},
         "data.scans_dir: Input is not a valid path"),
    case("str-for-int", "embed", "embed", {"resolution": "big"}, "embed.resolution"),
    case("fraction-for-int", "embed", "embed", {"batch_size": 2.5}, "embed.batch_size",
         full=True),
    case("unknown-choice", "embed", "model", {"backbone": "resnet1000"}, "model.backbone"),
    case("list-for-int", "pairs", "search", {"k": [5]},
         "search.k: Input should be a valid integer"),
    case("threshold-out-of-range", "pairs", "search", {"pair_threshold": 2},
         "search.pair_threshold", full=True),
    case("str-for-int-list", "evaluate", "evaluate", {"ks": "1,5,10"},
         "evaluate.ks: Input should be a valid list", full=True),
    case("list-for-path", "evaluate", "data", {"ground_truth": ["a", "b"]},
         "data.ground_truth", full=True),
    case("str-for-float", "index", "index", {"target_recall": "high"}, "index.target_recall"),
    case("str-for-epochs", "train", "train", {"epochs": "many"}, "train.epochs", full=True),
    case("str-for-seconds", "ingest", "orchestration", {"lock_timeout": "soon"},
         "orchestration.lock_timeout", full=True),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step,section,value,fragment", BAD_PARAMS)
def test_params_with_wrong_types_are_refused(ws, capsys, mode, step, section, value, fragment):
    before = snapshot(ws / "data")
    set_params(ws, **{section: value})
    rc, err = run_cli(mode, capsys, step, "--params", str(ws / "params.yaml"))
    assert_one_line_error(rc, err, step, "invalid params", fragment)
    assert snapshot(ws / "data") == before


BAD_GROUND_TRUTH = [
    case("dotdot-outside", "path,group\n../outside.jpg,g1\n",
         "1 paths lie outside the scans folder"),
    case("absolute-outside", "path,group\n/etc/hostname,g1\nscans/p0.jpg,g1\n",
         "lie outside the scans folder", full=True),
    case("symlink-outside", "path,group\nscans/escape.jpg,g1\n",
         "lie outside the scans folder"),
    case("dotdot-in-and-out", "path,group\nscans/../scans/../outside.jpg,g1\n",
         "lie outside the scans folder", full=True),
    case("unknown", "path,group\nscans/nope.jpg,g1\nscans/p0.jpg,g1\n",
         "1 paths are not ingested images (missing, quarantined or never ingested), e.g. "
         "'scans/nope.jpg'"),
    case("quarantined", "path,group\nscans/broken.jpg,g1\n", "not ingested images"),
    case("wrong-header", "file,cluster\nscans/p0.jpg,g1\n",
         "expected a header with columns path,group"),
    case("empty-group", "path,group\nscans/p0.jpg,\n", "line 2: empty path or group"),
    case("empty-file", "", "expected a header with columns path,group", full=True),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("text,fragment", BAD_GROUND_TRUTH)
def test_bad_ground_truth_is_refused(ws, capsys, mode, text, fragment):
    save(photo(9), ws / "outside.jpg")
    os.symlink(ws / "outside.jpg", ws / "scans" / "escape.jpg")
    (ws / "scans" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert cli.main(["ingest", "--params", str(ws / "params.yaml")]) == 0
    before = snapshot(ws / "data")
    (ws / "ground_truth.csv").write_text(text)
    rc, err = run_cli(mode, capsys, "evaluate", "--params", str(ws / "params.yaml"))
    assert_one_line_error(rc, err, "evaluate", fragment)
    assert snapshot(ws / "data") == before


def test_ground_truth_that_is_not_utf8_is_refused(ws, capsys):
    before = snapshot(ws / "data")
    (ws / "ground_truth.csv").write_bytes("path,group\nscans/caf\xe9.jpg,g1\n".encode("latin-1"))
    rc, err = run_cli("in-process", capsys, "evaluate", "--params", str(ws / "params.yaml"))
    assert_one_line_error(rc, err, "evaluate", "is not UTF-8 text")
    assert snapshot(ws / "data") == before


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def first_shard(ws: Path) -> Path:
    return sorted((ws / "data" / "embeddings").glob("*/shard-*.parquet"))[0]


DAMAGED = [
    # (step, damage it, what the error says)
    case("index-pairs", "pairs", lambda ws: truncate(ws / "data/index/index.faiss"),
         "index.faiss is damaged; rebuild with `cbir index` (size or checksum differs"),
    case("index-evaluate", "evaluate", lambda ws: truncate(ws / "data/index/index.faiss"),
         "index.faiss is damaged; rebuild with `cbir index`", full=True),
    case("index-sidecar-pairs", "pairs", lambda ws: truncate(ws / "data/index/index.json"),
         "index.json is unreadable"),
    case("manifest-ingest", "ingest", lambda ws: truncate(ws / "data/manifest/files.parquet"),
         "files.parquet is unreadable"),
    case("manifest-embed", "embed", lambda ws: truncate(ws / "data/manifest/files.parquet"),
         "files.parquet is unreadable"),
    case("manifest-pairs", "pairs", lambda ws: truncate(ws / "data/manifest/files.parquet"),
         "files.parquet is unreadable", full=True),
    case("shard-embed", "embed", lambda ws: truncate(first_shard(ws)), "is damaged"),
    case("shard-index", "index", lambda ws: truncate(first_shard(ws)),
         "run `cbir embed` to embed its", full=True),
    case("checkpoint-embed", "embed", lambda ws: truncate(ws / "data/models/model.pt"),
         "model.pt is not a readable weights file (damaged or truncated?)"),
    case("checkpoint-pairs", "pairs", lambda ws: truncate(ws / "data/models/model.pt", 0.1),
         "model.pt is not a readable weights file", full=True),
    case("checkpoint-empty-evaluate", "evaluate",
         lambda ws: (ws / "data/models/model.pt").write_bytes(b""),
         "model.pt is not a readable weights file", full=True),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step,damage,fragment", DAMAGED)
def test_damaged_files_give_one_clear_line(ws, capsys, mode, step, damage, fragment):
    damage(ws)
    before = snapshot(ws / "data")
    rc, err = run_cli(mode, capsys, step, "--params", str(ws / "params.yaml"))
    assert_one_line_error(rc, err, step, fragment)
    assert snapshot(ws / "data") == before


def test_the_index_step_rebuilds_a_damaged_index(ws, capsys):
    truncate(ws / "data/index/index.faiss")
    rc, err = run_cli("in-process", capsys, "index", "--params", str(ws / "params.yaml"))
    assert rc == 0, err
    index, info = load_index(ws / "data/index")
    assert index.ntotal == info.n_vectors == 10


class Payload:
    """Unpickling this creates the file named `marker`: weights_only loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_checkpoint(path: Path, marker: Path) -> None:
    """A cbir-looking checkpoint that hides a pickled object among its weights."""
    with open(path, "wb") as fh:
        torch.save({"format": CHECKPOINT_FORMAT, "state_dict": {"x": Payload(marker)}}, fh,
                   pickle_module=pickle)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["checkpoint", "init"])
def test_a_checkpoint_with_a_pickled_object_is_refused(ws, capsys, tmp_path, mode, where):
    marker = tmp_path / "code-ran"
    if where == "checkpoint":  # the training checkpoint embed loads
        target = ws / "data/models/model.pt"
    else:  # model.init naming a local file (no training checkpoint)
        (ws / "data/models/model.pt").unlink()
        target = ws / "evil.pt"
        set_params(ws, model={"init": "evil.pt"})
    pickled_checkpoint(target, marker)
    before = snapshot(ws / "data")
    rc, err = run_cli(mode, capsys, "embed", "--params", str(ws / "params.yaml"))
    assert_one_line_error(rc, err, "embed", f"{target} was refused: it contains pickled Python "
                          "objects")
    assert not marker.exists()  # the payload never ran
    assert snapshot(ws / "data") == before


@pytest.mark.faults_full
@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_train_resume_refuses_a_bad_epoch_checkpoint(ws, capsys, tmp_path, damage):
    set_params(ws, train={"epochs": 2, "batch_size": 4, "resolution": 32, "workers": 0})
    assert cli.main(["train", "--params", str(ws / "params.yaml"), "--max-epochs", "1"]) == 0
    last = ws / "data/models/last.pt"
    assert last.is_file()
    marker = tmp_path / "code-ran"
    if damage == "truncated":
        truncate(last)
        fragment = "last.pt is not a readable weights file (damaged or truncated?)"
    else:
        pickled_checkpoint(last, marker)
        fragment = "last.pt was refused: it contains pickled Python objects"
    before = snapshot(ws / "data")
    rc, err = run_cli("in-process", capsys, "train", "--params", str(ws / "params.yaml"),
                      "--resume")
    assert_one_line_error(rc, err, "train", fragment)
    assert not marker.exists()
    assert snapshot(ws / "data") == before
