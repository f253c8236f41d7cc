"""Ingest on real files: formats, bad inputs, exact duplicates, incremental reruns, SIGKILL."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cbir.steps import ingest
from cbir.store.manifest import canonical_images
from cbir.config import load_settings
from cbir.errors import CbirError
from cbir.imaging import hamming, phash
from cbir.steps.ingest import run_ingest
from conftest import CBIR, REPO, as_archive_user, open_catalogue, photo, save, shared_photos


def manifest(settings) -> list[dict]:
    rows = pq.read_table(settings.path(settings.data.manifest_dir) / "files.parquet").to_pylist()
    return sorted(rows, key=lambda r: (r["path"], r["version"]))


def quarantine(settings) -> dict[str, str]:
    path = settings.path(settings.data.manifest_dir) / "quarantine.parquet"
    return {r["path"]: r["reason"] for r in pq.read_table(path).to_pylist()}


def by_path(settings) -> dict[str, dict]:
    return {r["path"]: r for r in manifest(settings) if r["status"] != "replaced"}


# --------------------------------------------------------------------------- formats

def test_every_supported_format_is_decoded(workspace):
    s = workspace.scans
    save(photo(1), s / "a.jpg", quality=90)
    save(photo(2), s / "sub" / "b.png")
    save(photo(3), s / "sub" / "deeper" / "c.webp")
    save(photo(4), s / "d.bmp")
    save(photo(5), s / "e.jp2")
    frames = [photo(6 + i).convert("P") for i in range(3)]
    frames[0].save(s / "f.gif", save_all=True, append_images=frames[1:])
    pages = [photo(10 + i) for i in range(3)]
    pages[0].save(s / "g.tif", save_all=True, append_images=pages[1:])
    grey16 = (np.linspace(0, 65535, 64 * 96).reshape(64, 96)).astype(np.uint16)
    Image.fromarray(grey16).save(s / "h16.tif")
    assert Image.open(s / "h16.tif").mode.startswith("I;16")

    settings = workspace()
    summary = run_ingest(settings)
    rows = by_path(settings)
    assert summary.counts["new"] == 8 and summary.counts["quarantined"] == 0
    assert {p: r["format"] for p, r in rows.items()} == {
        "a.jpg": "JPEG", "sub/b.png": "PNG", "sub/deeper/c.webp": "WEBP", "d.bmp": "BMP",
        "e.jp2": "JPEG2000", "f.gif": "GIF", "g.tif": "TIFF", "h16.tif": "TIFF"}
    assert rows["g.tif"]["pages"] == 3 and rows["f.gif"]["pages"] == 3
    assert rows["a.jpg"]["pages"] == 1
    assert rows["h16.tif"]["mode"].startswith("I;16")
    for r in rows.values():
        assert (r["width"], r["height"]) == (96, 64)
        assert r["status"] == "ok" and r["is_canonical"]
        assert r["image_id"] == r["sha256"][:16] and len(r["sha256"]) == 64
        assert r["first_run"] == r["last_run"] == 1
    # the 16-bit gradient keeps its full tonal range after conversion (not clipped to white)
    assert rows["h16.tif"]["phash"] != 0 and rows["h16.tif"]["phash"] != 2**64 - 1


def test_exif_orientation_applied_and_malformed_exif_tolerated(workspace):
    s = workspace.scans
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise: stored 96x64, shown 64x96
    save(photo(1), s / "rotated.jpg", exif=exif.tobytes())
    # An EXIF block whose IFD offset points past the end: real scanners write such things.
    bad = b"Exif\x00\x00MM\x00\x2a\x00\x00\xff\xf0" + b"\x00" * 8
    save(photo(2), s / "bad_exif.jpg", exif=bad)
    settings = workspace()
    run_ingest(settings)
    rows = by_path(settings)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (64, 96)
    assert rows["bad_exif.jpg"]["status"] == "ok"
    assert (rows["bad_exif.jpg"]["width"], rows["bad_exif.jpg"]["height"]) == (96, 64)
    assert quarantine(settings) == {}


def test_phash_is_robust_to_recompression_and_distinct_across_images():
    a, b = photo(1, (256, 192)), photo(2, (256, 192))
    buf = io.BytesIO()
    a.resize((200, 150)).save(buf, "JPEG", quality=40)
    a2 = Image.open(io.BytesIO(buf.getvalue()))
    assert hamming(phash(a), phash(a2)) <= 6
    assert hamming(phash(a), phash(b)) >= 16


def _reference_phash(im: Image.Image) -> int:
    """The pHash recipe written plainly (np.median, a loop over the bits): what ingest stored
    before `phash` was made cheaper, so stored hashes must not change."""
    from cbir.imaging import _dct_matrix, to_rgb

    if im.mode not in ("L", "RGB"):
        im = to_rgb(im)
    grey = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    d = _dct_matrix(32)
    coeffs = (d @ grey @ d.T)[:8, :8].ravel()
    value = 0
    for bit in coeffs > np.median(coeffs):
        value = (value << 1) | int(bit)
    return value


def test_phash_is_the_plain_recipe_bit_for_bit():
    rng = np.random.default_rng(0)
    pictures = [photo(i, (64 + 7 * i, 48 + 5 * i)) for i in range(20)]
    pictures += [p.convert("L") for p in pictures[:5]] + [p.convert("RGBA") for p in pictures[:3]]
    pictures += [Image.fromarray(np.full((20, 30), v, np.uint8)) for v in (0, 77, 255)]  # ties
    pictures += [Image.fromarray(rng.integers(0, 2, (33, 65), dtype=np.uint8) * 255)]
    pictures += [Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))]
    hashes = [phash(p) for p in pictures]
    assert hashes == [_reference_phash(p) for p in pictures]
    assert len(set(hashes)) > 20 and any(h >> 63 for h in hashes)  # the top bit is kept


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_cut_short_is_quarantined_though_decoded_at_an_eighth(workspace, progressive):
    """Ingest decodes a large JPEG at 1/8 DCT scale; the whole entropy-coded stream is still
    read, so a file missing only its last bytes is still found truncated."""
    from cbir import imaging, probe

    rng = np.random.default_rng(1)
    pixels = (rng.random((768, 1024, 3)) * 255).astype(np.uint8)
    whole = io.BytesIO()
    Image.fromarray(pixels).save(whole, "JPEG", quality=90, progressive=progressive)
    data = whole.getvalue()
    pic, _ = imaging.open_scan(data, draft=("L", probe._PHASH_DRAFT), rgb=False)
    assert pic.size == (128, 96)  # decoded at 1/8 scale
    save(photo(1), workspace.scans / "good.jpg")
    (workspace.scans / "whole.jpg").write_bytes(data)
    (workspace.scans / "cut.jpg").write_bytes(data[: len(data) * 99 // 100])
    (workspace.scans / "no_end.jpg").write_bytes(data[:-2])  # only the end-of-image marker gone
    settings = workspace(ingest={"workers": 2})
    run_ingest(settings)
    q = quarantine(settings)
    assert set(q) == {"cut.jpg", "no_end.jpg"}
    assert all("truncated" in reason for reason in q.values()), q
    assert by_path(settings)["whole.jpg"]["width"] == 1024


def test_work_is_cut_into_batches_in_order_within_the_limits():
    sizes = [10] * 1000 + [ingest.BATCH_BYTES] * 3 + [1] * 5
    for workers in (1, 2, 16):
        batches = ingest._batches(sizes, workers)
        assert [i for b in batches for i in range(len(sizes))[b]] == list(range(len(sizes)))
        most = min(ingest.BATCH_FILES, len(sizes) // (4 * workers))
        assert all(0 < b.stop - b.start <= most for b in batches)
        # a batch over the byte limit holds one file: a file is never split or left out
        assert all(sum(sizes[b]) <= ingest.BATCH_BYTES or b.stop - b.start == 1 for b in batches)
        assert len(batches) >= min(len(sizes), 4 * workers)
    assert ingest._batches([], 2) == []
    assert ingest._batches([5, 5, 5], 2) == [slice(0, 1), slice(1, 2), slice(2, 3)]


# --------------------------------------------------------------------------- bad input

def _bad_input_folder(scans: Path, outside: Path) -> None:
    save(photo(1), scans / "good.jpg")
    (scans / "empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    photo(2, (200, 150)).save(whole, "JPEG", quality=95)
    (scans / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (scans / "random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (scans / "notes.txt").write_text("Box 12, folder 3: glass negatives, see register.\n")
    save(photo(3, (300, 300)), scans / "huge.png")  # over the 50,000-pixel limit set below
    outside.mkdir(exist_ok=True)
    save(photo(4), outside / "elsewhere.jpg")
    os.symlink(outside / "elsewhere.jpg", scans / "escape.jpg")
    os.symlink(scans / "no-such-file.jpg", scans / "broken.jpg")


EXPECTED_REASONS = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated",
    "random.jpg": "not an image",
    "notes.txt": "contains text",
    "huge.png": "exceeds the limit",
    "escape.jpg": "outside the scans folder",
    "broken.jpg": "broken symbolic link",
}


def test_bad_inputs_are_quarantined_with_reasons_and_the_run_goes_on(workspace, tmp_path):
    _bad_input_folder(workspace.scans, tmp_path / "outside")
    settings = workspace(ingest={"max_pixels": 50_000, "workers": 2})
    summary = run_ingest(settings)
    q = quarantine(settings)
    assert set(q) == set(EXPECTED_REASONS)
    for name, fragment in EXPECTED_REASONS.items():
        assert fragment in q[name], (name, q[name])
    assert set(by_path(settings)) == {"good.jpg"}
    assert summary.counts["quarantined"] == len(EXPECTED_REASONS)
    assert sorted(p for p, _ in summary.newly_quarantined) == sorted(EXPECTED_REASONS)
    # the quarantine is visible in the catalogue, and a rerun does not retry unchanged bad files
    con = open_catalogue(settings)
    assert con.execute("SELECT count(*) FROM quarantine").fetchone()[0] == len(EXPECTED_REASONS)
    con.close()
    again = run_ingest(settings)
    assert again.decoded == 0 and again.counts["quarantined"] == len(EXPECTED_REASONS)
    assert again.newly_quarantined == [] and "in this run" not in "\n".join(again.lines())


def test_cli_ingest_exits_zero_with_a_summary_despite_bad_files(workspace, tmp_path):
    _bad_input_folder(workspace.scans, tmp_path / "outside")
    workspace(ingest={"max_pixels": 50_000})
    out = subprocess.run([*CBIR, "ingest", "--params", str(workspace.root / "params.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "1 ok" in out.stdout and "7 quarantined" in out.stdout
    assert "  7 quarantined in this run, e.g. " in out.stdout  # "0 new" alone would hide them


def test_sidecar_files_that_are_not_images_get_the_ignore_patterns_that_skip_them(workspace):
    # seen in an archivist trial: METS XML beside every scan, quarantined one by one
    save(photo(1), workspace.scans / "box/001.jpg")
    for i in range(3):
        (workspace.scans / "box" / f"00{i}.xml").write_text("<mets/>")
    (workspace.scans / "box" / "ocr.TXT").write_text("words")
    (workspace.scans / "box" / "damaged.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 40)
    (workspace.scans / "box" / "phone.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 40)
    settings = workspace()
    lines = run_ingest(settings).lines()
    hint = next(line for line in lines if "ingest.ignore" in line)
    assert hint == ("  of them not images: 3 *.xml, 1 *.TXT; to leave such files out, add "
                    "'*.xml', '*.TXT' to ingest.ignore in params.yaml")  # no picture format
    settings = workspace(ingest={"ignore": [".*", "*.xml", "*.TXT"]})
    again = run_ingest(settings)
    # the skipped ones leave the quarantine
    assert set(quarantine(settings)) == {"box/damaged.jpg", "box/phone.HEIC"}
    assert not any("ingest.ignore" in line for line in again.lines())


def test_unreadable_file_is_quarantined(workspace):
    save(photo(1), workspace.scans / "good.jpg")
    locked = save(photo(2), workspace.scans / "locked.jpg")
    locked.chmod(0)
    params = workspace.root / "params.yaml"
    workspace()
    cmd = as_archive_user([*CBIR, "ingest", "--params", str(params)])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    settings = load_settings(params)
    assert "permission denied" in quarantine(settings)["locked.jpg"]
    assert set(by_path(settings)) == {"good.jpg"}


def test_file_vanishing_during_the_walk_is_quarantined(workspace, monkeypatch):
    for i in range(3):
        save(photo(i), workspace.scans / f"p{i}.jpg")
    real_walk = ingest.walk_scans

    def walk_then_delete(root, ignore):
        entries = list(real_walk(root, ignore))
        (workspace.scans / "p1.jpg").unlink()  # gone after the stat walk, before it is read
        return iter(entries)

    monkeypatch.setattr(ingest, "walk_scans", walk_then_delete)
    settings = workspace()
    run_ingest(settings)
    assert "disappeared" in quarantine(settings)["p1.jpg"]
    assert set(by_path(settings)) == {"p0.jpg", "p2.jpg"}


# --------------------------------------------------------------------------- setup errors

def test_missing_scans_dir_and_bad_params_give_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  scans_dir: nowhere\n")
    out = subprocess.run([*CBIR, "ingest", "--params", str(tmp_path / "params.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0
    assert "scans folder not found" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    for text, fragment in [("data: [unclosed\n", "not valid YAML"),
                           ("ingest:\n  workers: lots\n", "ingest.workers"),
                           ("ingest:\n  wrokers: 2\n", "ingest.wrokers"),
                           ("- a list\n", "mapping")]:
        (tmp_path / "params.yaml").write_text(text)
        out = subprocess.run([*CBIR, "ingest", "--params", str(tmp_path / "params.yaml")],
                             capture_output=True, text=True, cwd=REPO)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert fragment in out.stderr and len(out.stderr.strip().splitlines()) == 1

    out = subprocess.run([*CBIR, "ingest", "--params", str(tmp_path / "absent.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "params file not found" in out.stderr


def test_relative_paths_resolve_against_the_params_folder(tmp_path):
    ws = tmp_path / "elsewhere"
    save(photo(1), ws / "my-scans" / "x.jpg")
    (ws / "params.yaml").write_text("data:\n  scans_dir: my-scans\n")
    out = subprocess.run([*CBIR, "ingest", "--params", str(ws / "params.yaml")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (ws / "data" / "manifest" / "files.parquet").is_file()
    assert (ws / "data" / "catalog.duckdb").is_file()


# --------------------------------------------------------------------------- duplicates, reruns

def test_exact_duplicates_become_one_canonical_image(workspace):
    s = workspace.scans
    save(photo(1), s / "a" / "orig.jpg")
    shutil.copy(s / "a" / "orig.jpg", s / "b_copy.jpg")
    (s / "c").mkdir()
    shutil.copy(s / "a" / "orig.jpg", s / "c" / "copy2.jpg")
    save(photo(2), s / "other.jpg")
    settings = workspace()
    summary = run_ingest(settings)
    rows = by_path(settings)
    assert summary.counts["new_duplicates"] == 2
    ids = {r["image_id"] for r in rows.values()}
    assert len(ids) == 2
    canon = [r for r in rows.values() if r["is_canonical"]]
    assert len(canon) == 2
    dup_rows = [r for r in rows.values() if r["status"] == "duplicate"]
    assert {r["path"] for r in dup_rows} == {"b_copy.jpg", "c/copy2.jpg"}
    assert all(r["duplicate_of"] == "a/orig.jpg" for r in dup_rows)
    # duplicates were recognised by hash, not decoded a second time
    assert summary.decoded < 4
    con = open_catalogue(settings)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 2
    got = con.execute("SELECT path, canonical_path FROM exact_duplicates ORDER BY path").fetchall()
    assert got == [("b_copy.jpg", "a/orig.jpg"), ("c/copy2.jpg", "a/orig.jpg")]
    con.close()
    assert [r["path"] for r in canonical_images(settings)] in (
        ["a/orig.jpg", "other.jpg"], ["other.jpg", "a/orig.jpg"])


def test_byte_identical_copies_keep_their_digest_whatever_its_bytes(workspace):
    """The copies of one content are found by their SHA-256 digests, held as 32 bytes a file:
    a digest that ends in zero bytes is as good as any (a fixed-width bytes array would drop
    them), and the first copy in walk order is the one decoded."""
    import hashlib

    from PIL import PngImagePlugin

    data = b""
    for n in range(5000):  # a picture whose digest ends in a zero byte (1 in 256)
        info = PngImagePlugin.PngInfo()
        info.add_text("n", str(n))
        buf = io.BytesIO()
        photo(3).save(buf, "PNG", pnginfo=info)
        if hashlib.sha256(buf.getvalue()).digest()[-1] == 0:
            data = buf.getvalue()
            break
    assert data
    s = workspace.scans
    for name in ("a.png", "b/a.png", "c/a.png"):
        (s / name).parent.mkdir(exist_ok=True)
        (s / name).write_bytes(data)
    save(photo(4), s / "other.png")
    settings = workspace()
    summary = run_ingest(settings)
    rows = by_path(settings)
    sha = hashlib.sha256(data).hexdigest()
    assert {p: r["sha256"] for p, r in rows.items() if p != "other.png"} == dict.fromkeys(
        ("a.png", "b/a.png", "c/a.png"), sha)
    assert summary.decoded == 2 and summary.counts["new_duplicates"] == 2
    assert {p for p, r in rows.items() if r["is_canonical"]} == {"a.png", "other.png"}


def test_incremental_runs_add_change_delete(workspace):
    s = workspace.scans
    for i in range(4):
        save(photo(i), s / f"p{i}.jpg")
    settings = workspace()
    first = run_ingest(settings)
    assert first.counts["new"] == 4 and first.decoded == 4
    before = manifest(settings)

    second = run_ingest(settings)  # nothing changed: nothing decoded, nothing added
    assert second.decoded == 0 and second.counts.get("new", 0) == 0
    after = manifest(settings)
    assert [{k: v for k, v in r.items() if k != "last_run"} for r in after] == \
           [{k: v for k, v in r.items() if k != "last_run"} for r in before]
    con = open_catalogue(settings)
    assert con.execute("SELECT DISTINCT last_run FROM files").fetchall() == [(2,)]
    con.close()

    save(photo(10), s / "new.jpg")  # added
    save(photo(11), s / "p1.jpg")  # content changed under the same path
    os.utime(s / "p1.jpg", ns=(1, 1_000_000_000))
    (s / "p2.jpg").unlink()  # deleted
    third = run_ingest(settings)
    assert third.counts["new"] == 1 and third.counts["changed"] == 1
    assert third.counts["newly_missing"] == 1 and third.decoded == 2
    rows = manifest(settings)
    p1 = [r for r in rows if r["path"] == "p1.jpg"]
    assert [(r["version"], r["status"]) for r in p1] == [(1, "replaced"), (2, "ok")]
    assert p1[0]["sha256"] != p1[1]["sha256"] and p1[1]["first_run"] == 3
    p2 = [r for r in rows if r["path"] == "p2.jpg"]
    assert len(p2) == 1 and p2[0]["status"] == "missing" and p2[0]["last_run"] == 2
    assert len(rows) == 6  # nothing dropped: 4 originals + new + p1 v2

    # the file comes back: present again, same row, same id
    save(photo(2), s / "p2.jpg")
    run_ingest(settings)
    p2 = [r for r in manifest(settings) if r["path"] == "p2.jpg"]
    assert len(p2) == 1 and p2[0]["status"] == "ok"


def test_canonical_moves_to_a_duplicate_when_the_original_goes_missing(workspace):
    s = workspace.scans
    save(photo(1), s / "a.jpg")
    settings = workspace()
    run_ingest(settings)
    shutil.copy(s / "a.jpg", s / "b.jpg")
    run_ingest(settings)
    assert by_path(settings)["b.jpg"]["status"] == "duplicate"
    (s / "a.jpg").unlink()
    run_ingest(settings)
    rows = by_path(settings)
    assert rows["a.jpg"]["status"] == "missing" and not rows["a.jpg"]["is_canonical"]
    assert rows["b.jpg"]["status"] == "ok" and rows["b.jpg"]["is_canonical"]


def test_a_file_moved_away_and_back_unchanged_is_canonical_again_and_reruns_write_no_manifest(
        workspace, tmp_path):
    s = workspace.scans
    save(photo(1), s / "a.jpg")
    os.utime(s / "a.jpg", ns=(1, 1_000_000_000))
    shutil.copy(s / "a.jpg", s / "b.jpg")  # a later mtime: a is seen first
    save(photo(2), s / "c.jpg")
    settings = workspace()
    run_ingest(settings)
    c_row = by_path(settings)["c.jpg"]
    os.replace(s / "a.jpg", tmp_path / "a.jpg")  # away: mtime and size kept
    run_ingest(settings)
    assert by_path(settings)["b.jpg"]["is_canonical"]
    os.replace(tmp_path / "a.jpg", s / "a.jpg")  # back, unchanged: not read again
    back = run_ingest(settings)
    assert back.decoded == 0 and back.counts["unchanged"] == 3
    rows = by_path(settings)
    assert (rows["a.jpg"]["status"], rows["a.jpg"]["is_canonical"]) == ("ok", True)
    assert (rows["b.jpg"]["status"], rows["b.jpg"]["duplicate_of"]) == ("duplicate", "a.jpg")
    assert {k: v for k, v in rows["c.jpg"].items() if k != "last_run"} == \
           {k: v for k, v in c_row.items() if k != "last_run"}
    assert rows["c.jpg"]["last_run"] == 3
    files = settings.path(settings.data.manifest_dir) / "files.parquet"
    written = files.read_bytes()
    again = run_ingest(settings)  # nothing changed: only the run log is written
    assert again.counts["unchanged"] == 3 and again.totals == {"ok": 2, "duplicate": 1}
    assert files.read_bytes() == written
    con = open_catalogue(settings)
    assert con.execute("SELECT DISTINCT last_run FROM files").fetchall() == [(4,)]
    con.close()


def test_the_epochs_change_exactly_when_an_image_is_known_by_another_path_or_a_row_changes(
        workspace, tmp_path):
    """The manifest's canonical epoch (the pairs step trusts its recorded paths while it holds):
    kept by new files, new copies, changed content at a new id and unchanged reruns; drawn
    afresh when a canonical file moves, goes missing (its copy takes over), comes back, or its
    path gets new content (its old image is then known by no path)."""
    from cbir.store.manifest import canonical_epoch, rows_epoch

    s = workspace.scans
    save(photo(1), s / "a.jpg")
    os.utime(s / "a.jpg", ns=(1, 1_000_000_000))  # seen first: a stays canonical over its copy
    save(photo(2), s / "c.jpg")
    settings = workspace()
    assert canonical_epoch(settings) is None  # no manifest yet
    run_ingest(settings)
    epochs = [canonical_epoch(settings)]
    assert epochs[0] and len(epochs[0]) == 32
    rows = [rows_epoch(settings)]
    assert rows[0] and rows[0] != epochs[0]

    def after(change, *, kept: bool, rows_kept: bool = False) -> None:
        """Also the rows epoch (the stored pair_report keeps the recorded pairs' rows while it
        holds): kept where the run only appended rows of new paths or contents."""
        change()
        run_ingest(settings)
        epochs.append(canonical_epoch(settings))
        assert (epochs[-1] == epochs[-2]) == kept, change.__name__
        assert epochs[-1]
        rows.append(rows_epoch(settings))
        assert (rows[-1] == rows[-2]) == rows_kept, change.__name__
        assert rows[-1]

    def unchanged(): pass
    def new_file(): save(photo(3), s / "d.jpg")
    def new_copy(): shutil.copy(s / "a.jpg", s / "b.jpg")
    def moved(): os.replace(s / "c.jpg", s / "sub-c.jpg")
    def gone_copy_takes_over(): os.replace(s / "a.jpg", tmp_path / "a.jpg")
    def back(): os.replace(tmp_path / "a.jpg", s / "a.jpg")
    def new_content(): save(photo(4), s / "d.jpg")
    after(unchanged, kept=True, rows_kept=True)
    after(new_file, kept=True, rows_kept=True)
    after(new_copy, kept=True, rows_kept=True)
    assert by_path(settings)["b.jpg"]["status"] == "duplicate"
    after(moved, kept=False)
    after(gone_copy_takes_over, kept=False)
    assert by_path(settings)["b.jpg"]["is_canonical"]
    after(back, kept=False)
    assert by_path(settings)["a.jpg"]["is_canonical"]
    after(new_content, kept=False)
    assert len(set(epochs)) == 5 and len(set(rows)) == 5  # never an old epoch again
    # a manifest written before epochs: the next run, unchanged, writes it once with one
    files = settings.path(settings.data.manifest_dir) / "files.parquet"
    pq.write_table(pq.read_table(files).replace_schema_metadata(None), files)
    assert canonical_epoch(settings) is None and rows_epoch(settings) is None
    run_ingest(settings)
    stamped = files.read_bytes()
    assert canonical_epoch(settings) not in (None, *epochs)
    assert rows_epoch(settings) not in (None, *rows)
    run_ingest(settings)
    assert files.read_bytes() == stamped


# --------------------------------------------------------------------------- crash safety

def _comparable(rows: list[dict]) -> list[tuple]:
    return sorted((r["path"], r["version"], r["status"], r["image_id"], r["width"], r["height"],
                   r["phash"], r["is_canonical"]) for r in rows)


@pytest.mark.parametrize("kill_at", ["ingest.result:15", "ingest.commit:2"])
def test_sigkill_leaves_previous_manifest_and_next_run_completes(tmp_path, kill_at):
    def populate(scans: Path, n: int, start: int = 0) -> None:
        for i in range(start, n):
            save(photo(i, (160, 120)), scans / f"box{i % 3}" / f"s{i:03d}.jpg", quality=85)

    params = {"data": {"scans_dir": "scans"}, "ingest": {"workers": 2, "journal_every": 5}}
    from conftest import write_params

    # reference: one uninterrupted run over the final folder
    ref = tmp_path / "ref"
    populate(ref / "scans", 5)
    ref_settings = load_settings(write_params(ref, params))
    run_ingest(ref_settings)
    populate(ref / "scans", 45, 5)
    run_ingest(ref_settings)

    ws = tmp_path / "ws"
    populate(ws / "scans", 5)
    settings = load_settings(write_params(ws, params))
    run_ingest(settings)
    previous = (settings.path(settings.data.manifest_dir) / "files.parquet").read_bytes()
    populate(ws / "scans", 45, 5)

    env = {**os.environ, "CBIR_KILL_AT": kill_at}
    out = subprocess.run([*CBIR, "ingest", "--params", str(ws / "params.yaml")], env=env,
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == -signal.SIGKILL, out.stderr
    files = settings.path(settings.data.manifest_dir) / "files.parquet"
    if kill_at.startswith("ingest.result"):
        assert files.read_bytes() == previous  # the previous manifest is intact
    pq.read_table(files)  # and always readable

    resumed = run_ingest(settings)
    if kill_at.startswith("ingest.result"):
        assert resumed.decoded < 40  # the journal saved the work done before the kill
    assert _comparable(manifest(settings)) == _comparable(manifest(ref_settings))
    assert not list((settings.path(settings.data.manifest_dir) / "journal").glob("*.parquet"))


# --------------------------------------------------------------------------- real photographs

@pytest.mark.shared_data
def test_ingest_real_archive_photographs(tmp_path):
    photos = shared_photos()
    root = photos[0].parents[1]  # ../shared/data/photos
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  scans_dir: {root}\ningest:\n  workers: 2\n")
    settings = load_settings(params)
    summary = run_ingest(settings)
    assert summary.counts["new"] == len(photos)
    assert summary.counts["quarantined"] == 0
    rows = manifest(settings)
    assert all(r["format"] == "JPEG" and r["width"] > 100 for r in rows)
    assert len({r["phash"] for r in rows}) > 0.95 * len(rows)


@pytest.mark.parametrize("chunk", [2, 3, 65_536])
def test_the_walk_is_taken_into_columns_a_chunk_at_a_time(monkeypatch, chunk):
    """The walk's files become columns a chunk at a time (no Python object per file stays:
    an unchanged rerun of 10^6 files peaked at 0.65-0.67 GB against 0.90-0.91 GB), each file
    read back as the walk gave it, its problem included, whatever the chunk boundaries."""
    from cbir.probe import Entry

    monkeypatch.setattr(ingest._Seen, "CHUNK", chunk)
    walked = [Entry(f"box-{i // 3}/{i}.jpg".encode(), 1000 + i, 10**18 + i,
                    "not an image" if i in (2, 5) else None) for i in range(7)]
    seen = ingest._Seen.of(iter(walked))
    assert len(seen) == 7 and seen.raw.to_pylist() == [e.raw for e in walked]
    assert seen.size.tolist() == [e.size for e in walked]
    assert seen.mtime_ns.tolist() == [e.mtime_ns for e in walked]
    assert seen.usable.tolist() == [e.problem is None for e in walked]
    assert [seen.entry(i) for i in range(7)] == walked
    empty = ingest._Seen.of(iter([]))
    assert len(empty) == 0 and len(empty.raw) == 0 and empty.usable.dtype == bool


def test_plain_new_images_get_the_rows_the_merge_would_make(tmp_path, monkeypatch):
    """The files that can only be new images are made rows in Arrow (a first run of 10^6 files
    held 1.3 KB of dict a file); every other file goes through the merge. Two workspaces over
    the same scans, one sending every file through the merge, agree run after run: the rows,
    the counts, the totals, the epochs."""
    import yaml

    scans = tmp_path / "scans"
    workspaces = {}
    for name in ("columns", "merge"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.yaml").write_text(yaml.safe_dump(
            {"data": {"scans_dir": str(scans), "ground_truth": None}, "ingest": {"workers": 2}}))
        workspaces[name] = load_settings(tmp_path / name / "params.yaml")
    split = ingest._split_new
    plain_counts = []
    epochs: dict[str, list] = {}
    history: list[list[bool]] = []

    def counting(cands, files, results):
        plain, back = split(cands, files, results)
        plain_counts.append((plain.num_rows, len(back)))
        return plain, back

    def all_to_merge(cands, files, results):
        return cands.slice(0, 0), cands.to_pylist()

    def night() -> None:
        out = {}
        for name, merge in (("columns", counting), ("merge", all_to_merge)):
            with monkeypatch.context() as m:
                m.setattr(ingest, "_split_new", merge)
                out[name] = run_ingest(workspaces[name])
        a, b = (manifest(workspaces[n]) for n in ("columns", "merge"))
        assert a == b
        assert out["columns"].counts == out["merge"].counts
        assert out["columns"].totals == out["merge"].totals
        assert out["columns"].decoded == out["merge"].decoded
        drawn = []  # which epochs each workspace drew afresh this run
        for n in ("columns", "merge"):
            now = [ingest.metadata_value(workspaces[n].path("data/manifest/files.parquet"), key)
                   for key in (ingest.CANONICAL_EPOCH, ingest.ROWS_EPOCH)]
            drawn.append([a != b for a, b in zip(epochs.get(n, [None, None]), now, strict=True)])
            epochs[n] = now
        assert drawn[0] == drawn[1]
        history.append(drawn[0])

    for i in range(5):
        save(photo(i), scans / f"p{i}.jpg")
    save(photo(0), scans / "same-bytes" / "p0.jpg")  # a byte-identical copy: its twin merges
    night()
    assert plain_counts[-1] == (4, 0)  # p1-p4; p0 is a copy's twin
    save(photo(20), scans / "new" / "a.jpg")  # plain
    save(photo(1), scans / "new" / "p1-again.jpg")  # a known content: not even decoded
    save(photo(21), scans / "p2.jpg")  # changed in place: its path has a row
    os.utime(scans / "p2.jpg", ns=(1, 1_000_000_000))
    (scans / "p3.jpg").unlink()  # missing
    night()
    assert plain_counts[-1] == (1, 1)  # new/a.jpg; p2.jpg back to the merge
    save(photo(3), scans / "back" / "p3.jpg")  # the missing image's content at a new path
    save(photo(22), scans / "new" / "b.jpg")
    save(photo(22), scans / "new" / "b.png")  # another file, the same picture: new content
    night()
    assert plain_counts[-1] == (2, 1)  # new/b.jpg and new/b.png; back/p3.jpg to the merge
    rows = {r["path"]: r for r in manifest(workspaces["columns"]) if r["status"] != "replaced"}
    assert rows["back/p3.jpg"]["status"] == "ok" and rows["p3.jpg"]["status"] == "missing"
    assert rows["new/b.png"]["image_id"] != rows["new/b.jpg"]["image_id"]
    save(photo(23), scans / "new" / "c.jpg")  # a night of plain new images only
    night()
    assert plain_counts[-1] == (1, 0)
    # first run: both drawn; a changed path and a missing file: both; rows changed (the missing
    # image's content at a new path); rows only appended: neither (the catalogue keeps its rows)
    assert history == [[True, True], [True, True], [False, True], [False, False]]


def test_a_resumed_run_takes_from_the_journal_only_the_bytes_it_decoded(workspace):
    """A run interrupted mid-decode leaves its results in the journal, read back as columns (a
    first run of 10^7 files killed late would hold 13 GiB of them as dicts). The next run takes
    a file's result from it only for the same size and mtime (a file changed since is decoded
    again), the last result of a path where there are two, failures too; and ends with the
    manifest an uninterrupted run makes."""
    s = workspace.scans
    for i in range(12):
        save(photo(i), s / f"p{i:02d}.jpg")
    (s / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    save(photo(0), s / "copy" / "p00.jpg")  # byte-identical: its twin is decoded, it is not
    settings = workspace(ingest={"workers": 1, "journal_every": 1})

    seen: list[str] = []

    def stop_after_nine(row: dict) -> None:
        seen.append(row["path"])
        if len(seen) == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ingest(settings, on_result=stop_after_nine)
    jdir = settings.path(settings.data.manifest_dir) / "journal"
    journalled = ingest._read_journal(jdir)
    assert sorted(journalled.column("path").to_pylist()) == sorted(seen)
    # a part written twice for one path (a second killed run): the last one counts
    first = journalled.slice(0, 1)
    older = first.set_column(first.schema.get_field_index("width"), "width",
                             pa.array([1], pa.int32()))
    pq.write_table(older, jdir / "part-0-older.parquet")  # sorts before the others
    assert ingest._read_journal(jdir).num_rows == journalled.num_rows
    assert ingest._read_journal(jdir).filter(
        pc.equal(ingest._read_journal(jdir).column("path"), first.column("path")[0])
    ).column("width").to_pylist() == first.column("width").to_pylist()

    changed = next(p for p in seen if p.startswith("p"))
    save(photo(40), s / changed)  # other bytes since they were journalled
    os.utime(s / changed, ns=(1, 2_000_000_000))
    resumed = run_ingest(settings)
    # decoded now: the pictures not journalled, the changed one, and the byte copy of p00 when
    # p00 was journalled (a copy is left out only for a twin decoded in the same run)
    expected = 12 - sum(p.startswith("p") for p in seen) + 1 + ("p00.jpg" in seen)
    assert resumed.decoded == expected
    assert not list(jdir.glob("*.parquet"))

    ref = workspace.root / "ref"
    shutil.copytree(s, ref / "scans", copy_function=shutil.copy2)
    from conftest import write_params
    uninterrupted = load_settings(write_params(ref, {"data": {"scans_dir": "scans"}}))
    run_ingest(uninterrupted)
    assert _comparable(manifest(settings)) == _comparable(manifest(uninterrupted))
    assert quarantine(settings) == quarantine(uninterrupted)
    assert by_path(settings)[changed]["sha256"] == by_path(uninterrupted)[changed]["sha256"]


def test_a_reorganised_folder_says_its_new_paths_were_moved(workspace):
    # Found in an archivist trial: moving a folder of three scans read "3 new, 4 newly
    # missing", as if three scans had arrived.
    s = workspace.scans
    for i in range(3):
        save(photo(i), s / "night" / f"{i}.jpg")
    save(photo(3), s / "gone.jpg")
    settings = workspace()
    run_ingest(settings)
    (s / "night").rename(s / "night-1931")
    (s / "gone.jpg").unlink()
    save(photo(4), s / "arrived.jpg")  # really new
    out = run_ingest(settings)
    assert out.counts["new"] == 4 and out.counts["moved"] == 3 and out.decoded == 1
    assert out.counts["newly_missing"] == 4
    assert "this run: 4 new (3 of them moved from a path now missing), 0 changed" in out.lines()[1]
    again = run_ingest(settings)
    assert again.counts["moved"] == 0 and "moved" not in again.lines()[1]


def _state(settings) -> dict[str, bytes]:
    folder = settings.path(settings.data.manifest_dir)
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def test_an_unmounted_share_changes_nothing_and_is_named(workspace):
    # Found in an archivist trial: the scans folder's photos/ was a share not mounted one
    # night; ingest marked its 194 scans missing without a word, the night removed them from
    # the index and pairs and searched the whole collection again when they came back; an
    # empty mount point lost the quarantine's history, then failed at embed with "holds no
    # image files".
    s = workspace.scans
    for i in range(12):
        save(photo(i), s / "share" / f"{i}.jpg")
    for i in range(12, 16):
        save(photo(i), s / f"{i}.jpg")
    save(photo(12), s / "twin" / "12.jpg")  # a second file of 12.jpg's content
    (s / "notes.txt").write_text("box 12\n")  # quarantined in run 1
    settings = workspace()
    run_ingest(settings)
    before = _state(settings)

    shutil.move(s / "share", workspace.root / "away")  # the share is not mounted tonight
    with pytest.raises(CbirError) as refused:
        run_ingest(settings)
    said = str(refused.value)
    assert said.startswith(f"12 of the 16 images ingested before are gone from the scans "
                           f"folder {s} (12 files under share/): is a drive or network share "
                           f"not mounted? Nothing was changed"), said
    assert "--accept-missing" in said and "\n" not in said
    assert _state(settings) == before  # manifest, quarantine and runs as they were

    shutil.move(workspace.root / "away", s / "share")  # mounted again: an unchanged run
    back = run_ingest(settings)
    assert back.counts["unchanged"] == 17 and back.counts.get("newly_missing", 0) == 0
    assert quarantine(settings) == {"notes.txt": "not an image: the file contains text"}

    # a folder renamed, a file of two gone and a few scans weeded lose no image: no refusal
    (s / "share").rename(s / "share-1931")
    (s / "12.jpg").unlink()
    for i in (13, 14):
        (s / f"{i}.jpg").unlink()
    out = run_ingest(settings)
    assert out.counts["moved"] == 12 and out.counts["newly_missing"] == 15

    # removed on purpose: recorded as missing when asked
    shutil.rmtree(s / "share-1931")
    with pytest.raises(CbirError, match=r"^12 of the 14 images ingested before are gone .*"
                                        r"\(12 files under share-1931/\)"):
        run_ingest(settings)
    done = run_ingest(settings, accept_missing=True)
    assert done.counts["newly_missing"] == 12 and done.totals["ok"] == 2


def test_an_empty_scans_folder_is_refused_however_few_were_ingested(workspace):
    s = workspace.scans
    for i in range(3):
        save(photo(i), s / f"{i}.jpg")
    settings = workspace()
    run_ingest(settings)
    before = _state(settings)
    for p in list(s.iterdir()):
        p.unlink()
    with pytest.raises(CbirError, match=r"^3 of the 3 images ingested before are gone from "
                                        r"the scans folder .* \(3 files under its top level\)"):
        run_ingest(settings)
    assert _state(settings) == before
    # fewer than ingest.VANISHED_MIN and fewer than half gone: no refusal
    for i in range(3):
        save(photo(i), s / f"{i}.jpg")
    run_ingest(settings)
    (s / "0.jpg").unlink()
    assert run_ingest(settings).counts["newly_missing"] == 1
