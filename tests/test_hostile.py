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
import json
import pickle
import re
import shutil
import socket
import stat
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote_to_bytes

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from cbir.store.layout import layout
from cbir import cli, imaging, probe
from cbir.steps import ingest
from cbir.store import catalog
from cbir.config import NO_LIMIT, load_settings
from cbir.steps.embed import run_embed
from cbir.store.embeddings import load_embeddings
from cbir.imaging import PAGE_COUNT_LIMIT
from cbir.store.index import load_index
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.model import CHECKPOINT_FORMAT, retrieval_model, save_checkpoint
from cbir.steps.pairs import run_pairs
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
    run_ingest(settings)
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
    rgb, info = imaging.open_scan(str(path))  # what embedding, training and thumbnails see
    assert rgb.mode == "RGB"
    check(rgb, dataclasses.asdict(info))


def test_awkward_scans_are_ingested_and_embedded(workspace):
    settings, before = ingested(workspace, **FAST)
    for name, (make, _) in ACCEPTED.items():
        make(workspace.scans / name)
    summary = run_ingest(settings)  # the 100,000-page TIFF's pages are counted to the limit only
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
    assert set(load_embeddings(layout(settings).embeddings(fp))[0]) == ids
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
         "1 path lies outside the scans folder"),
    case("absolute-outside", "path,group\n/etc/hostname,g1\nscans/p0.jpg,g1\n",
         "lie outside the scans folder", full=True),
    case("symlink-outside", "path,group\nscans/escape.jpg,g1\n",
         "1 path lies outside the scans folder"),
    case("dotdot-in-and-out", "path,group\nscans/../scans/../outside.jpg,g1\n",
         "lie outside the scans folder", full=True),
    case("unknown", "path,group\nscans/nope.jpg,g1\nscans/p0.jpg,g1\n",
         "1 path is not an ingested image (quarantined or never ingested), e.g. "
         "'scans/nope.jpg'"),
    case("quarantined", "path,group\nscans/broken.jpg,g1\n", "is not an ingested image"),
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


# --------------------------------------------------------------------------- issue 12, family 2
# `cbir sql` and every catalogue connection cbir hands out are read only and sandboxed by DuckDB
# itself (catalog.connect: the file attached read only, external access off except the
# workspace's own Parquet outputs, configuration locked), and `cbir sql` runs queries only. A
# damaged or foreign manifest, shard, index or pair file is one line naming the file and the
# command that rebuilds it (cbir/store/tables.py), in every step that reads it.

def outside_parquet(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"secret": ["outside the workspace"]}), folder / "secret.parquet")
    return folder / "secret.parquet"


SQL_REFUSED = [
    # (SQL, where {out} is a folder outside the workspace; what the one line says)
    case("copy-over-manifest", "COPY (SELECT 1 AS x) TO 'data/manifest/files.parquet' "
         "(FORMAT parquet, USE_TMP_FILE false)", "not COPY"),
    case("copy-outside", "COPY images TO '{out}/images.csv'", "not COPY"),
    case("export-database", "EXPORT DATABASE '{out}/export'", "not EXPORT"),
    case("attach", "ATTACH '{out}/new.duckdb' AS other", "not ATTACH"),
    case("install", "INSTALL httpfs", "not LOAD"),
    case("load", "LOAD httpfs", "not LOAD"),
    case("read-text-etc", "SELECT * FROM read_text('/etc/passwd')",
         "file system operations are disabled"),
    case("read-csv-etc", "SELECT * FROM read_csv('/etc/passwd')",
         "file system operations are disabled"),
    case("glob-etc", "SELECT * FROM glob('/etc/*')", "file system operations are disabled"),
    case("read-blob-signature", "SELECT * FROM read_blob('data/catalog.duckdb.signature')",
         "file system operations are disabled"),
    case("parquet-outside", "SELECT * FROM read_parquet('{out}/secret.parquet')",
         "file system operations are disabled"),
    case("query-function", "FROM query('COPY (SELECT 1) TO ''{out}/q.csv''')",
         "Expected a single SELECT statement"),
    case("set-undo-guard", "SET enable_external_access = true", "not SET"),
    case("reset-lock", "RESET lock_configuration", "not SET"),
    case("create-table", "CREATE TABLE t AS SELECT 1 AS x", "not CREATE"),
    case("create-temp-macro", "CREATE TEMP MACRO m(x) AS x", "not CREATE"),
    case("pragma", "PRAGMA enable_profiling", "not PRAGMA"),
    case("checkpoint", "CHECKPOINT", "not CALL"),
    case("two-statements", "SELECT 1; COPY images TO '{out}/x.csv'",
         "one query at a time: the SQL holds 2 statements"),
    case("update-extensions", "UPDATE EXTENSIONS", "only queries can run"),
]


@pytest.mark.parametrize("sql,fragment", SQL_REFUSED)
def test_sql_changes_and_reads_nothing_but_the_catalogue(ws, capsys, monkeypatch, tmp_path,
                                                         sql, fragment):
    out = tmp_path / "outside"
    outside_parquet(out)
    monkeypatch.chdir(ws)  # relative paths in a COPY would land in the workspace
    params = str(ws / "params.yaml")
    assert cli.main(["sql", "--params", params, "SELECT count(*) FROM pair_report"]) == 0
    before, outside = snapshot(ws), snapshot(out)
    rc, err = run_cli("in-process", capsys, "sql", "--params", params, sql.format(out=out))
    assert_one_line_error(rc, err, "sql", fragment)
    assert snapshot(ws) == before and snapshot(out) == outside


def outputs(ws: Path) -> dict[str, str]:
    """The data folder's files but caches (a step may warm matplotlib's before it stops)."""
    return {k: v for k, v in snapshot(ws / "data").items() if not k.startswith("cache/")}


def foreign(path: Path) -> None:
    """Replace a stored output by a Parquet file cbir did not write."""
    pq.write_table(pa.table({"x": [1, 2]}), path)


def retyped(path: Path, column: str) -> None:
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(["wide"] * len(t)))
    pq.write_table(t, path)


def shard_of_other_dimension(ws: Path) -> None:
    shard = first_shard(ws)
    ids = pq.read_table(shard).column("image_id")
    vectors = pa.FixedSizeListArray.from_arrays(pa.array([0.5] * (3 * len(ids)), pa.float32()), 3)
    pq.write_table(pa.table({"image_id": ids, "vector": vectors}), shard)


def sidecar_with(ws: Path, **values) -> None:
    side = ws / "data/index/index.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), **values}))


def manifest_folder(ws: Path) -> None:
    (ws / "data/manifest/files.parquet").unlink()
    (ws / "data/manifest/files.parquet").mkdir()


MANIFEST = "data/manifest/files.parquet"
FOREIGN = [
    # (step, damage it, what the one line says)
    case("manifest-ingest", "ingest", lambda ws: foreign(ws / MANIFEST),
         "files.parquet is unreadable: it has no column 'image_id'", "`cbir ingest`"),
    case("manifest-embed", "embed", lambda ws: foreign(ws / MANIFEST),
         "files.parquet is unreadable", "`cbir ingest`"),
    case("manifest-query", "query", lambda ws: foreign(ws / MANIFEST),
         "files.parquet is unreadable", "`cbir ingest`"),
    case("manifest-sql", "sql", lambda ws: foreign(ws / MANIFEST),
         "files.parquet is unreadable", "`cbir ingest`"),
    case("manifest-report", "report", lambda ws: foreign(ws / MANIFEST),
         "files.parquet is unreadable", full=True),
    case("manifest-calibrate", "calibrate", lambda ws: foreign(ws / MANIFEST),
         "files.parquet is unreadable", full=True),
    case("manifest-evaluate", "evaluate", lambda ws: foreign(ws / MANIFEST),
         "files.parquet is unreadable", full=True),
    case("manifest-retyped-pairs", "pairs", lambda ws: retyped(ws / MANIFEST, "width"),
         "column 'width' holds string, not int32"),
    case("manifest-retyped-sql", "sql", lambda ws: retyped(ws / MANIFEST, "width"),
         "column 'width' holds string"),
    case("manifest-folder-ingest", "ingest", manifest_folder,
         "files.parquet is unreadable: it is not a regular file"),
    case("runs-ingest", "ingest", lambda ws: foreign(ws / "data/manifest/runs.parquet"),
         "runs.parquet is unreadable: it has no column 'run_id'"),
    case("runs-sql", "sql", lambda ws: foreign(ws / "data/manifest/runs.parquet"),
         "runs.parquet is unreadable", "`cbir ingest`"),
    case("quarantine-report", "report",
         lambda ws: foreign(ws / "data/manifest/quarantine.parquet"),
         "quarantine.parquet is unreadable"),
    case("pairs-sql", "sql", lambda ws: foreign(ws / "data/pairs/pairs.parquet"),
         "pairs.parquet is unreadable: it has no column 'image_a'", "`cbir pairs`"),
    case("clusters-report", "report", lambda ws: foreign(ws / "data/pairs/clusters.parquet"),
         "clusters.parquet is unreadable", "`cbir pairs`"),
    case("shard-index", "index", lambda ws: foreign(first_shard(ws)),
         "is damaged (it has no column 'image_id')", "run `cbir embed`"),
    case("shard-query", "query", lambda ws: foreign(first_shard(ws)), "is damaged",
         full=True),
    case("shard-dimension-pairs", "pairs", shard_of_other_dimension,
         "is damaged (vectors of dimension 3, the model's have 512)", "run `cbir embed`"),
    case("sidecar-types-pairs", "pairs", lambda ws: sidecar_with(ws, index_file=5),
         "index.json is unreadable (index_file is 5)", "`cbir index`"),
    case("sidecar-types-query", "query", lambda ws: sidecar_with(ws, n_vectors="many"),
         "index.json is unreadable", "`cbir index`"),
]
STEP_ARGS = {"query": ["scans/p0.jpg"], "sql": ["SELECT count(*) FROM pair_report"]}


@pytest.mark.parametrize("step,damage,fragments", [
    pytest.param(s, d, f, id=p.id, marks=p.marks)
    for p in FOREIGN for s, d, *f in [p.values]])
def test_foreign_or_damaged_outputs_give_one_line_naming_the_file(ws, capsys, step, damage,
                                                                  fragments):
    damage(ws)
    before = outputs(ws)
    extra = [str(ws / a) if a.startswith("scans/") else a for a in STEP_ARGS.get(step, [])]
    rc, err = run_cli("in-process", capsys, step, "--params", str(ws / "params.yaml"), *extra)
    assert_one_line_error(rc, err, step, *fragments)
    assert outputs(ws) == before


# --------------------------------------------------------------------------- issue 12, family 3
# Hangs. Only regular files are ever opened (imaging.open_regular: stat before, O_NONBLOCK and
# fstat on the descriptor), so no FIFO, socket or device reached by an argument or a symlink in
# the scans blocks a command; the params loader bounds size and alias expansion and refuses
# duplicate keys. The timeouts are a safety net (a regression fails instead of hanging).

def special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a socket, /dev/zero, and links to them (those that can be made here)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.jpg")
    made = {"fifo": folder / "pipe.jpg"}
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(folder / "sock.jpg"))
        made["socket"] = folder / "sock.jpg"
    except OSError:
        pass
    finally:
        sock.close()
    os.symlink("pipe.jpg", folder / "link-to-pipe.jpg")
    made["link-to-fifo"] = folder / "link-to-pipe.jpg"
    if os.path.exists("/dev/zero") and stat.S_ISCHR(os.stat("/dev/zero").st_mode):
        made["dev-zero"] = Path("/dev/zero")
    return made


@pytest.mark.timeout(300)
def test_special_files_given_as_arguments_are_refused_without_opening(ws, capsys, tmp_path):
    params = str(ws / "params.yaml")
    made = special_files(tmp_path / "special")
    for what, path in made.items():
        for step in ("augment-preview", "query"):
            rc, err = run_cli("in-process", capsys, step, "--params", params, str(path))
            assert_one_line_error(rc, err, step, "not a regular file"), (what, step)


@pytest.mark.timeout(300)
def test_special_files_in_the_scans_are_quarantined_without_opening(workspace):
    settings, before = ingested(workspace)
    inside = workspace.scans / "odd"
    made = special_files(inside)
    os.symlink(inside / "pipe.jpg", workspace.scans / "abs-link-to-pipe.jpg")
    os.symlink("odd/link-to-pipe.jpg", workspace.scans / "link-to-link.jpg")
    if "socket" in made:
        os.symlink("odd/sock.jpg", workspace.scans / "link-to-socket.jpg")
    run_ingest(settings)
    q = quarantine(settings)
    links = ["odd/link-to-pipe.jpg", "abs-link-to-pipe.jpg", "link-to-link.jpg"] + \
        (["link-to-socket.jpg"] if "socket" in made else [])
    for name in links:
        assert "symbolic link to something that is not a regular file" in q[name], (name, q)
    assert "not a regular file" in q["odd/pipe.jpg"]
    kept_rows(settings, before)


@pytest.mark.timeout(120)
def test_a_fifo_swapped_in_after_the_check_is_not_waited_for(tmp_path, monkeypatch):
    """The race: a scan replaced by a FIFO between the walk (or the stat) and the open."""
    os.mkfifo(tmp_path / "swapped.jpg")
    entry = probe.Entry(b"swapped.jpg", 1000, 0)  # the walk saw a regular file here
    assert "not a regular file" in probe.probe_file(os.fsencode(tmp_path), entry)["reason"]
    assert probe.sha256_of(os.fsencode(tmp_path / "swapped.jpg")) is None
    monkeypatch.setattr(imaging, "not_regular", lambda path: None)  # the stat said "regular"
    with pytest.raises(imaging.NotRegularFile):
        imaging.open_regular(tmp_path / "swapped.jpg")  # O_NONBLOCK: no writer needed
    with pytest.raises(OSError, match="not a regular file"):
        imaging.open_scan(str(tmp_path / "swapped.jpg"))


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    lines = ['lol0: &lol0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\ningest:\n  ignore: *lol{levels}\n"


BAD_YAML = [
    case("billion-laughs", billion_laughs(), "line 7, column 7: the aliases here expand to "
         "more than 100,000 values (a YAML alias bomb?)"),
    case("bomb-under-known-key", "ingest:\n  ignore: &a [x, x, x, x, x, x, x, x, x, x]\n"
         "evaluate:\n  ks: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         "embed:\n  scales: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
         "search:\n  k: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
         "train:\n  lr: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n", "alias bomb"),
    case("recursive-alias", "ingest: &x\n  ignore: [*x]\n",
         "line 1, column 9: an alias refers to a value that contains it"),
    case("duplicate-section", "ingest:\n  workers: 1\nembed:\n  batch_size: 4\ningest:\n"
         "  workers: 2\n", "line 5, column 1: duplicate key 'ingest' (first on line 1)"),
    case("duplicate-key", "ingest:\n  workers: 1\n  max_pixels: 10\n  workers: 2\n",
         "line 4, column 3: duplicate key 'workers' (first on line 2)"),
    case("duplicate-in-flow", "search: {k: 5, k: 6}\n", "duplicate key 'k'"),
    case("nested-too-deeply", "ingest: " + "[" * 50_000 + "]" * 50_000 + "\n",
         "nested too deeply"),
    case("too-large", "# " + "x" * (1 << 20) + "\n", "larger than 1,048,576 bytes"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text,fragment", BAD_YAML)
def test_params_yaml_bombs_and_duplicate_keys_are_one_line(tmp_path, capsys, text, fragment):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    rc, err = run_cli("in-process", capsys, "ingest", "--params", str(params))
    assert_one_line_error(rc, err, "ingest", str(params), fragment)


# --------------------------------------------------------------------------- issue 12, family 4
# Tracebacks instead of one line. Every param has its range, checked when the params are
# loaded (cbir/config.py; no inf or nan anywhere); limits that mean "at most" saturate
# (report.max_pairs, page counts); command-line counts are checked before any work; a write
# refused by a read-only folder is one line saying so (cbir/lock.py, cbir/fsutil.py).

BAD_VALUES = [
    # (step, section, values, what the one line names)
    case("ks-empty", "evaluate", "evaluate", {"ks": []},
         "evaluate.ks: List should have at least 1 item"),
    case("ks-zero", "evaluate", "evaluate", {"ks": [0]},
         "evaluate.ks.0: Input should be greater than or equal to 1"),
    case("ks-negative", "evaluate", "evaluate", {"ks": [1, -3]},
         "evaluate.ks.1: Input should be greater than or equal to 1"),
    case("ks-huge", "evaluate", "evaluate", {"ks": [10**30]},
         "evaluate.ks.0: Input should be less than or equal to 10000"),
    case("k-huge", "pairs", "search", {"k": 10**30}, "search.k: Input should be less than"),
    case("workers-huge", "ingest", "ingest", {"workers": 10**9}, "ingest.workers"),
    case("resolution-huge", "embed", "embed", {"resolution": 10**9}, "embed.resolution"),
    case("batch-huge", "embed", "embed", {"batch_size": 2**70}, "embed.batch_size"),
    case("seed-negative", "embed", "model", {"seed": -1},
         "model.seed: Input should be greater than or equal to 0"),
    case("seed-beyond-c-int", "index", "index", {"seed": 2**40}, "index.seed"),
    case("train-seed-negative", "train", "train", {"seed": -1}, "train.seed"),
    case("timeout-infinite", "ingest", "orchestration", {"lock_timeout": float("inf")},
         "orchestration.lock_timeout: Input should be a finite number"),
    case("precision-nan", "pairs", "search", {"precision_target": float("nan")},
         "search.precision_target: Input should be a finite number"),
    case("page-size-zero", "report", "report", {"page_size": 0}, "report.page_size"),
    case("pq-bytes-huge", "index", "index", {"bytes_per_vector": 10**30},
         "index.bytes_per_vector"),
    case("demo-groups-huge", "demo-data", "demo", {"n_groups": 10**30}, "demo.n_groups"),
]


@pytest.mark.parametrize("step,section,value,fragment", BAD_VALUES)
def test_out_of_range_params_are_one_line(ws, capsys, step, section, value, fragment):
    before = snapshot(ws / "data")
    set_params(ws, **{section: value})
    rc, err = run_cli("in-process", capsys, step, "--params", str(ws / "params.yaml"))
    assert_one_line_error(rc, err, step, "invalid params", fragment)
    assert snapshot(ws / "data") == before


BAD_ARGUMENTS = [
    case("k-zero", "query", ["scans/p0.jpg", "--k", "0"], "--k must be at least 1, got 0"),
    case("k-huge", "query", ["scans/p0.jpg", "--k", str(10**30)], "--k must be at most 10,000"),
    case("n-zero", "augment-preview", ["scans/p0.jpg", "--n", "0"], "--n must be at least 1"),
    case("resolution-huge", "augment-preview", ["scans/p0.jpg", "--resolution", "1000000000"],
         "--resolution must be at most 8,192"),
    case("seed-negative", "augment-preview", ["scans/p0.jpg", "--seed", "-1"],
         "--seed must be at least 0"),
    case("epochs-zero", "train", ["--max-epochs", "0"], "--max-epochs must be at least 1"),
    case("sql-empty", "sql", [""], "no query to run: the SQL is empty or only comments"),
    case("sql-comments", "sql", ["-- what was I looking for?\n/* nothing */ ;"],
         "no query to run"),
    case("sql-limit-negative", "sql", ["SELECT 1", "--limit", "-1"], "--limit must be 0"),
    case("sql-syntax", "sql", ["SELEC path FROM images"],
         "query failed: Parser Error: syntax error at or near \"SELEC\""),
]


@pytest.mark.parametrize("step,argv,fragment", BAD_ARGUMENTS)
def test_out_of_range_arguments_are_one_line(ws, capsys, step, argv, fragment):
    before = snapshot(ws / "data")
    argv = [str(ws / a) if a.startswith("scans/") else a for a in argv]
    rc, err = run_cli("in-process", capsys, step, "--params", str(ws / "params.yaml"), *argv)
    assert_one_line_error(rc, err, step, fragment)
    assert snapshot(ws / "data") == before


def apng_declaring(frames: int) -> bytes:
    """A PNG with an animation control chunk declaring `frames` frames (it holds one)."""
    buf = io.BytesIO()
    photo(7).save(buf, "PNG")
    data = buf.getvalue()
    body = b"acTL" + struct.pack(">II", frames, 0)
    actl = struct.pack(">I", 8) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return data[:33] + actl + data[33:]  # after the signature and IHDR


def test_counts_that_do_not_fit_saturate(ws, capsys):
    """A frame count over the manifest's int32 is capped like a TIFF's page count; a limit
    beyond anything it limits means no limit."""
    (ws / "scans" / "anim.png").write_bytes(apng_declaring(2**31))
    set_params(ws, report={"max_pairs": 10**30, "page_size": 10**30, "thumb_size": 64})
    params = str(ws / "params.yaml")
    assert load_settings(params).report.max_pairs == NO_LIMIT
    for step in ("ingest", "report"):
        rc, err = run_cli("in-process", capsys, step, "--params", params)
        assert rc == 0, err
    rows = {r["path"]: r for r in manifest_rows(load_settings(params))}
    assert rows["anim.png"]["status"] == "ok" and rows["anim.png"]["pages"] == PAGE_COUNT_LIMIT


READ_ONLY = [
    # (what is read-only, the step, what the one line names)
    case("data-folder", "data", "ingest", "data/.cbir.lock"),
    case("manifest-folder", "data/manifest", "ingest", "data/manifest/files.parquet"),
    case("workspace-without-data", "", "embed", "data"),
]


@pytest.mark.parametrize("folder,step,names", READ_ONLY)
def test_a_read_only_workspace_or_data_folder_is_one_line(ws, folder, step, names):
    save(photo(40), ws / "scans" / "new.jpg")  # work to write
    if not folder:
        shutil.rmtree(ws / "data")
    target = ws / folder
    modes = {p: p.stat().st_mode for p in [target, *target.rglob("*")]}
    before = snapshot(ws)
    for p in modes:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        cmd = as_archive_user([*CBIR, step, "--params", str(ws / "params.yaml")])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert "Traceback" not in out.stderr, out.stderr
        assert_one_line_error(out.returncode, out.stderr, step, f"{ws / names}",
                              "read-only for this user", "must be writable")
        if folder == "data":  # reading needs no writes: queries still answer
            sql = as_archive_user([*CBIR, "sql", "--params", str(ws / "params.yaml"),
                                   "SELECT count(*) FROM images"])
            assert subprocess.run(sql, capture_output=True, cwd=REPO).returncode == 0
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert snapshot(ws) == before


# --------------------------------------------------------------------------- issue 12, family 5
# Injection through file names: every line cbir prints goes through one escaping stream
# (cbir/safetext.py), so no name can drive the terminal or forge a line; every report format
# escapes names. Cost bombs: decoded size and JPEG scans are bounded before decoding
# (imaging._check_cost); what exceeds them is quarantined with the reason, and query and
# augment-preview stop with one line. Outside the workspace: caches and Prefect's state stay in
# it and analytics are off (cbir/environ.py), for every entry point.

# A raw control character (line breaks aside), C1 control or bidirectional override.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

CONTROL_NAMES = [
    b"\x1b]0;pwned\x07title.jpg",  # OSC: sets the terminal's title
    b"\x1b[2J\x1b[31mred.jpg",  # clears the screen, paints red
    b"cr\rforged.jpg",  # carriage return: overprints the line
    b"tab\tand\x08backspace.jpg",
    b"\xc2\x9b31mc1-csi.jpg",  # U+009B: a one-character CSI for some terminals
    "rlo\u202egpj.jpg".encode(),  # right-to-left override: shows as "rlojpg.jpg"
    b"new\n  1  1.0000  forged.jpg",  # a line break forging a result line
]


@pytest.fixture(scope="module")
def control_named(tmp_path_factory) -> Path:
    """A workspace whose scans have control characters in their names, ingested, embedded and
    indexed."""
    ws = tmp_path_factory.mktemp("control") / "ws"
    scans = os.fsencode(ws / "scans")
    os.makedirs(scans)
    for i, raw in enumerate(CONTROL_NAMES):
        buf = io.BytesIO()
        photo(30 + i).save(buf, "JPEG", quality=90)
        with open(os.path.join(scans, raw), "wb") as fh:
            fh.write(buf.getvalue())
    with open(os.path.join(scans, b"\x1b[31mnot-an-image.jpg"), "wb") as fh:
        fh.write(b"text, quarantined with its name")
    params = write_params(ws, {"data": {"scans_dir": "scans", "ground_truth": None}, **FAST})
    for step in ("ingest", "embed", "index"):
        assert cli.main([step, "--params", str(params)]) == 0, step
    return ws


def printed(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_names_with_control_characters_are_escaped_in_every_line_printed(control_named, capsys):
    import json

    params = str(control_named / "params.yaml")
    names = {display(raw) for raw in CONTROL_NAMES}
    sql = ("sql", "SELECT path FROM images ORDER BY path", "--params", params)
    outputs = {}
    # a table for people: one row per image, however many line breaks the names hold
    rc, outputs["table"], err = printed(capsys, *sql)
    assert rc == 0, err
    assert len(outputs["table"].splitlines()) == len(names) + 3  # header, rule, rows, count
    # json: escaped the JSON way, so a script reads the exact names back
    rc, outputs["json"], err = printed(capsys, *sql, "--format", "json")
    assert rc == 0 and {r["path"] for r in json.loads(outputs["json"])} == names
    rc, outputs["csv"], err = printed(capsys, *sql, "--format", "csv")
    assert rc == 0 and len(list(csv.reader(io.StringIO(outputs["csv"])))) == len(names) + 1
    # query: each neighbour on its own line, a forged line stays inside its name
    query = os.fsdecode(os.path.join(os.fsencode(control_named / "scans"), CONTROL_NAMES[1]))
    rc, outputs["query"], err = printed(capsys, "query", query, "--k", "3", "--params", params)
    assert rc == 0, err
    lines = outputs["query"].splitlines()  # the threshold, the query, its own file, 3 neighbours
    assert len(lines) == 1 + 1 + 1 + 3 and lines[2].startswith("  in the collection as ")
    assert not any(ln.startswith("  1  1.0000  forged") for ln in outputs["query"].splitlines())
    # the quarantine, and a scans folder named with escapes in ingest's summary
    rc, outputs["quarantine"], err = printed(capsys, "sql", "SELECT path, reason FROM quarantine",
                                             "--params", params)
    assert rc == 0 and "\\u001b[31mnot-an-image.jpg" in outputs["quarantine"], err
    for what, text in outputs.items():
        assert not RAW_CONTROL.search(text), (what, text)
    assert "\\u001b[2J\\u001b[31mred.jpg" in outputs["table"]


@pytest.mark.parametrize("argv", [
    ["augment-preview", "no such\n\x1b[2Jscan.jpg"],
    ["query", "gone\r\x1b]0;t\x07.jpg", "missing\n.jpg"],
    ["sql", "SELECT * FROM no_such_view_\x1b[31m"],
], ids=["augment-preview", "query", "sql"])
def test_an_error_naming_a_hostile_file_is_one_escaped_line(control_named, capsys, argv):
    rc, out, err = printed(capsys, *argv, "--params", str(control_named / "params.yaml"))
    assert_one_line_error(rc, err, argv[0])
    assert not RAW_CONTROL.search(err + out), err
    assert "Traceback" not in err


HOSTILE_CELLS = ['"><img src=x onerror=alert(1)>', "a|b|c.jpg", "[click](http://evil.example)",
                 "![t](http://evil.example/t.png)", "`code` and *bold* _em_", "new\nline.jpg",
                 "\x1b[2Jclear.jpg", "back\\slash|.jpg", "<script>alert(1)</script>"]


def test_every_report_format_escapes_names(monkeypatch):
    from cbir.metrics import markdown_table
    from cbir.safetext import code_fence
    from cbir.steps.nightly import WHOLE_COLUMNS, NightlyReport

    cols = ["new_run", "new_path", "match_path", "score", "kind", "master_path"]
    rows = [(3, name, "scans/other.jpg", 0.9, "near", name) for name in HOSTILE_CELLS]
    md = NightlyReport(run_id=3, since_run=2, columns=cols, pairs=rows).markdown()
    table = [ln for ln in md.splitlines() if ln.startswith("| 3 ")]
    assert len(table) == len(HOSTILE_CELLS)  # a line break stays inside its cell
    for line in table:  # no cell splits: one unescaped pipe more than the table has cells
        assert len(re.findall(r"(?<!\\)\|", line)) == len(WHOLE_COLUMNS) + 1, line
    assert not re.search(r"<[a-z]|(?<!\\)\]\(|(?<!\\)`", md.split("Query:")[0]), md
    assert not RAW_CONTROL.search(md)
    metrics = markdown_table([(name, {}) for name in HOSTILE_CELLS], ks=[1])
    assert "<img" not in metrics and "<script" not in metrics and not RAW_CONTROL.search(metrics)
    pipes = metrics.splitlines()[0].count("|")
    assert all(len(re.findall(r"(?<!\\)\|", ln)) == pipes for ln in metrics.splitlines()[2:])

    # the flows' summary artifact: a line holding a fence cannot close the code block
    import flows.common

    sent = {}
    monkeypatch.setattr(flows.common, "create_markdown_artifact",
                        lambda **kw: sent.update(kw))
    lines = ["```", "</pre><img src=x onerror=alert(1)>", "\x1b[31mred", "````"]
    flows.common.summary_artifact("k", "title <b>", [("ingest", lines)], extra=md)
    fence = code_fence(lines)
    assert fence == "`````" and sent["markdown"].count(fence) == 2
    assert "<b>" not in sent["markdown"] and not RAW_CONTROL.search(sent["markdown"])


def png_header(width: int, height: int, colour_type: int = 6, depth: int = 8) -> bytes:
    """A PNG declaring width x height pixels (RGBA by default), with a few bytes of zeros:
    tiny on disk, GBs once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))


def float_tiff(width: int, height: int) -> bytes:
    """A 32-bit float greyscale TIFF header declaring width x height, with one small strip."""
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 32), (259, 3, 1, 1),
            (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
            (279, 4, 1, 64), (339, 3, 1, 3)]
    return (b"II*\x00" + struct.pack("<I", 8 + 64) + b"\0" * 64 + struct.pack("<H", len(tags))
            + b"".join(struct.pack("<HHII", *t) for t in tags) + struct.pack("<I", 0))


def jpeg_of_scans(repeats: int) -> bytes:
    """A small progressive JPEG whose last scan is repeated `repeats` times (each scan makes the
    decoder go over the whole picture again)."""
    buf = io.BytesIO()
    photo(5).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + data[-2:]


BOMBS = {  # name -> (content, what the reason says)
    "rgba-14000.png": (lambda: png_header(14_000, 14_000),
                       "14000x14000 RGBA takes 784 MB decoded, over the limit of 600 MB"),
    "rgba16-13000.png": (lambda: png_header(13_000, 13_000, 6, 16),
                         "13000x13000 RGBA takes 676 MB decoded"),
    "grey-alpha16-13000.png": (lambda: png_header(13_000, 13_000, 4, 16), "RGBA takes 676 MB"),
    "float-13000.tif": (lambda: float_tiff(13_000, 13_000), "13000x13000 F takes 676 MB"),
    "scans-5000.jpg": (lambda: jpeg_of_scans(5000), "a JPEG of 5,"),
    "scans-named-png.png": (lambda: jpeg_of_scans(200), "scans (the limit is 100"),
}


def test_decode_cost_bombs_are_quarantined_with_the_reason(workspace):
    settings, before = ingested(workspace)
    for name, (make, _) in BOMBS.items():
        (workspace.scans / name).write_bytes(make())
    good = jpeg_of_scans(0)  # the progressive JPEG itself: ten scans, decoded as usual
    (workspace.scans / "progressive.jpg").write_bytes(good)
    summary = run_ingest(settings)
    q = quarantine(settings)
    assert set(q) == set(BOMBS), q
    for name, (_, fragment) in BOMBS.items():
        assert q[name].startswith("too costly to decode: ") and fragment in q[name], q[name]
        assert "possible decompression bomb" in q[name]
    assert summary.counts["new"] == 1  # progressive.jpg
    kept_rows(settings, before)


@pytest.mark.parametrize("step,bomb", [("query", "rgba-14000.png"), ("query", "scans-5000.jpg"),
                                       ("augment-preview", "rgba16-13000.png"),
                                       ("augment-preview", "scans-5000.jpg"),
                                       ("augment-preview", "float-13000.tif")])
def test_decode_cost_bombs_stop_query_and_augment_preview_with_one_line(ws, capsys, step, bomb):
    path = ws / bomb
    path.write_bytes(BOMBS[bomb][0]())
    before = snapshot(ws / "data")
    rc, err = run_cli("in-process", capsys, step, str(path), "--params", str(ws / "params.yaml"))
    assert_one_line_error(rc, err, step, "too costly to decode", BOMBS[bomb][1])
    assert snapshot(ws / "data") == before


def _fresh_home_env(home: Path) -> dict[str, str]:
    """A user's environment with nothing of cbir's, Prefect's or the caches' set."""
    drop = ("PREFECT_", "MPLCONFIGDIR", "TORCH_HOME", "XDG_", "DO_NOT_TRACK", "DVC_NO_ANALYTICS",
            "CBIR_LOCK_HELD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO)}


def test_nothing_is_written_outside_the_workspace(ws, tmp_path):
    """`cbir report` (matplotlib), `cbir serve` (Prefect, no server) and a flow module run as a
    script, with a fresh HOME: nothing appears in it (no ~/.cache, ~/.config, ~/.prefect)."""
    import sys

    from cbir.config import load_settings
    from cbir.environ import workspace_environ

    home = tmp_path / "home"
    home.mkdir()
    env = _fresh_home_env(home)
    params = str(ws / "params.yaml")
    runs = [([*CBIR, "report", "--params", params], 0),
            ([*CBIR, "serve", "--params", params], 2),  # no Prefect server: one line, exit 2
            ([sys.executable, "-m", "flows.nightly", "--params", str(tmp_path / "none.yaml")], 2)]
    for argv, want in runs:
        out = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)
        assert out.returncode == want and "Traceback" not in out.stderr, out.stderr
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == []
    assert (ws / "data" / "cache" / "matplotlib").is_dir()
    wanted = workspace_environ(load_settings(params))  # and nothing is sent out
    assert wanted["DO_NOT_TRACK"] == "1" and wanted["DVC_NO_ANALYTICS"] == "1"
    assert wanted["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert wanted["PREFECT_HOME"] == str(ws / "data" / "prefect")
