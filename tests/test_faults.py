"""Crash anywhere: every step is killed with SIGKILL at its fault points, then rerun.

For each (step, kill point) case: a workspace in the state just before the step (a copy of the
reference run's state there: the steps before it ran normally), the step run as `cbir <step>` in a
subprocess with CBIR_KILL_AT set (it must die by SIGKILL: a point never reached fails the case),
the outputs left behind checked to be usable (Parquet reads, the index loads, pages are whole),
the step rerun without the kill (`train --resume`), and its outputs compared with those of the
uninterrupted reference run: same ids, same rows, no duplicates, no gaps, vectors and scores
equal within float tolerance, no temporary file left.

The reference (module scope, computed once) builds a small demo collection in two phases:
phase 1 is the first build (ingest, train, embed, index, pairs, evaluate, report); phase 2 adds
the day's arrivals (an exact copy, a rescan, two new photographs) and a deleted scan, and runs
the incremental steps again (no training). A case names its phase. The nightly flow starts from
the phase-2 arrivals and is compared with an uninterrupted nightly run.

CI runs the reduced set (each step once, evaluate aside); `make faults` runs them all (marker
faults_full). The kill points are listed in cbir/faults.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cbir.store.pairs import read_pairs
from cbir.store.catalog import query
from cbir.config import Settings, load_settings
from cbir.steps.demo import generate_demo_collection
from cbir.store.layout import SHARD_GLOB
from cbir.store.embeddings import load_embeddings
from cbir.steps.embed import run_embed
from cbir.steps.evaluate import run_evaluate
from cbir.fsutil import TMP_PREFIX
from cbir.faiss_index import index_ids, search
from cbir.store.index import load_index
from cbir.steps.index import run_index
from cbir.store.manifest import canonical_images
from cbir.steps.ingest import run_ingest
from cbir.model import safe_load
from cbir.steps.report import run_report
from cbir.faiss_index import faiss_ids
from cbir.steps.pairs import run_pairs
from cbir.steps.train import _read_cache, run_train
from conftest import CBIR, REPO, photo, save, write_params

PARAMS: dict[str, Any] = {
    "data": {"scans_dir": "scans", "ground_truth": "ground_truth.csv"},
    "ingest": {"workers": 2, "journal_every": 2},
    "model": {"backbone": "resnet18", "projection_dim": 32, "seed": 1},
    # 21 images, batch 8: 2 optimiser steps per epoch, 4 in all
    "train": {"resolution": 32, "batch_size": 8, "epochs": 2, "workers": 0,
              "augment_strength": 0.3, "time_budget_minutes": 0},
    "embed": {"resolution": 64, "batch_size": 2, "shard_size": 4, "workers": 0},
    "search": {"k": 5, "pair_threshold": 0.5, "cluster_threshold": 0.9},
    "evaluate": {"baselines": False},
    "report": {"thumb_size": 48, "page_size": 8},
    "orchestration": {"task_retries": 0, "retry_delay_seconds": 0, "lock_timeout": 5,
                      "dvc_commit": False},
}
PHASES: dict[int, tuple[str, ...]] = {
    1: ("ingest", "train", "embed", "index", "pairs", "evaluate", "report"),
    2: ("ingest", "embed", "index", "pairs", "evaluate", "report"),
}
# Manifest columns compared with the reference; first_run / last_run are run ids, which a
# killed run legitimately shifts (it may have committed before dying); runs.parquet, a log with
# timestamps, is only checked for unique run ids. mtime is the scan's own (copies keep it).
MANIFEST_COLUMNS = ["image_id", "path", "path_raw", "version", "status", "is_canonical",
                    "duplicate_of", "sha256", "bytes", "mtime_ns", "mtime", "width", "height",
                    "mode", "format", "pages", "phash"]
QUARANTINE_COLUMNS = ["path", "path_raw", "reason", "bytes", "mtime_ns"]
ATOL = 1e-5  # float tolerance for vectors and scores


def _quiet(_: str) -> None:
    pass


RUN: dict[str, Callable[[Settings], Any]] = {
    "ingest": run_ingest, "train": lambda s: run_train(s, log=_quiet), "embed": run_embed,
    "index": run_index, "pairs": run_pairs, "evaluate": run_evaluate, "report": run_report,
}
# The rerun after a kill: the same, except that training resumes (README: `cbir train --resume`).
RERUN: dict[str, Callable[[Settings], Any]] = {
    **RUN, "train": lambda s: run_train(s, resume=True, log=_quiet)}


# --------------------------------------------------------------------------- workspaces

def _link_or_copy(src: str, dst: str) -> None:
    """Big files (checkpoints, caches) are hard-linked: every write replaces a file, never
    changes one in place, so a link shares nothing that a step could alter."""
    if os.path.getsize(src) > 1 << 20:
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)  # mtimes kept: ingest sees the scans unchanged


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=_link_or_copy)
    return dst


def _settings(ws: Path) -> Settings:
    return load_settings(ws / "params.yaml")


def _arrivals(ws: Path) -> None:
    """Phase 2: an exact copy, a rescan of a known print, two new photographs; one scan gone."""
    scans = ws / "scans"
    originals = sorted(scans.rglob("*.jpg"))
    new = scans / "arrived"
    new.mkdir()
    shutil.copy(originals[0], new / "copy-of-first.jpg")
    with Image.open(originals[1]) as im:
        im.convert("RGB").resize((im.width * 9 // 10, im.height * 9 // 10)).save(
            new / "rescan.jpg", quality=70)
    save(photo(101, (96, 72)), new / "new1.png")
    save(photo(102, (72, 96)), new / "new2.png")
    gone = originals[-1]
    gone.unlink()
    gt = ws / "ground_truth.csv"
    with open(gt, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh)
                if (ws / r["path"]).resolve() != gone.resolve()]
    with open(gt, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "group"])
        w.writeheader()
        w.writerows(rows)


@dataclass
class Reference:
    """The uninterrupted run: the workspace state before each step of each phase."""

    states: dict[str, Path]

    def before(self, phase: int, step: str) -> Path:
        return self.states[f"{phase}:{step}"]

    def after(self, phase: int, step: str) -> Path:
        steps = PHASES[phase]
        i = steps.index(step)
        return self.states[f"{phase}:{steps[i + 1]}" if i + 1 < len(steps) else f"{phase}:end"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("faults-reference")
    generate_demo_collection(root / "demo", n_groups=6, n_distractors=6, max_copies=3, size=96,
                             seed=3, workers=1)
    ws = root / "ws"
    shutil.copytree(root / "demo" / "scans", ws / "scans")
    shutil.copy(root / "demo" / "ground_truth.csv", ws / "ground_truth.csv")
    write_params(ws, PARAMS)
    states: dict[str, Path] = {}
    for phase, steps in PHASES.items():
        if phase == 2:
            _arrivals(ws)
        for step in steps:
            states[f"{phase}:{step}"] = _copy(ws, root / "states" / f"{phase}-{step}")
            RUN[step](_settings(ws))
        states[f"{phase}:end"] = _copy(ws, root / "states" / f"{phase}-end")
    return Reference(states=states)


@pytest.fixture(scope="module")
def nightly_reference(reference: Reference, prefect_harness: None,
                      tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted nightly run over the phase-2 arrivals."""
    from flows.nightly import nightly

    ws = _copy(reference.before(2, "ingest"), tmp_path_factory.mktemp("nightly-ref") / "ws")
    nightly(str(ws / "params.yaml"))
    return ws


# --------------------------------------------------------------------------- checks

def _temp_files(ws: Path) -> list[Path]:
    return sorted(ws.joinpath("data").rglob(TMP_PREFIX + "*"))


class _Links(HTMLParser):
    """Collects a page's image sources and links."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img" and a.get("src"):
            self.imgs.append(a["src"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])


def _local(url: str) -> str | None:
    """The relative file a URL names, or None (fragment only, data: or absolute URL)."""
    parts = urlsplit(url)
    return None if parts.scheme or parts.netloc or not parts.path else unquote(parts.path)


def _check_pages(gallery: Path, *, links: bool) -> dict[str, str]:
    """Every page is whole and parses, every image it shows exists; with `links`, so does
    every page it links to. Returns page name -> text."""
    pages = {}
    for page in sorted(gallery.glob("*.html")):
        text = page.read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>"), page
        parser = _Links()
        parser.feed(text)
        parser.close()
        for src in filter(None, map(_local, parser.imgs)):
            assert (gallery / src).is_file(), f"{page.name}: missing image {src}"
        if links:
            for href in filter(None, map(_local, parser.hrefs)):
                if href.endswith(".html"):
                    assert (gallery / href).is_file(), f"{page.name}: broken link {href}"
        pages[page.name] = text
    return pages


def _assert_usable(ws: Path, before: Path) -> None:
    """What a kill left behind is usable: every Parquet file reads, every JSON parses, the index
    and the training cache load, changed checkpoints load, the gallery's pages are whole and
    show existing images, and the catalogue answers a query."""
    data = ws / "data"
    for p in data.rglob("*.parquet"):
        pq.read_table(p)
    for p in data.rglob("*.json"):
        json.loads(p.read_text(encoding="utf-8"))
    s = _settings(ws)
    index_dir = s.path(s.data.index_dir)
    if (index_dir / "index.json").exists() or (index_dir / "index.faiss").exists():
        load_index(index_dir)
    for folder in s.path(s.data.cache_dir).glob("train-*"):
        if (folder / "index.json").exists():
            assert _read_cache(folder) is not None, folder
    for p in data.rglob("*.pt"):
        old = before / p.relative_to(ws)
        if not (old.exists() and os.path.samefile(p, old)):
            safe_load(p)
    gallery = s.path(s.data.reports_dir) / "gallery"
    if gallery.is_dir():
        _check_pages(gallery, links=False)
    manifest = s.path(s.data.manifest_dir)
    if (manifest / "files.parquet").exists() and (manifest / "runs.parquet").exists():
        query(s, "SELECT count(*) FROM files")  # a reader refreshes the catalogue and queries


def _manifest(s: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    m = s.path(s.data.manifest_dir)
    files = pq.read_table(m / "files.parquet").select(MANIFEST_COLUMNS).to_pylist()
    quarantine = pq.read_table(m / "quarantine.parquet").select(QUARANTINE_COLUMNS).to_pylist()
    key = lambda r: (r["path_raw"], r.get("version", 0))  # noqa: E731
    return sorted(files, key=key), sorted(quarantine, key=key)


def _compare_ingest(a: Settings, b: Settings) -> None:
    files, quarantine = _manifest(a)
    ref_files, ref_quarantine = _manifest(b)
    keys = [(r["path_raw"], r["version"]) for r in files]
    assert len(keys) == len(set(keys)), "a file version is in the manifest twice"
    assert files == ref_files
    assert quarantine == ref_quarantine
    assert not list((a.path(a.data.manifest_dir) / "journal").glob("*.parquet"))
    runs = pq.read_table(a.path(a.data.manifest_dir) / "runs.parquet").column("run_id")
    assert len(runs) == len(set(runs.to_pylist()))


def _embedding_folders(s: Settings) -> dict[str, Path]:
    return {p.name: p for p in s.path(s.data.embeddings_dir).iterdir() if p.is_dir()}


def _compare_embed(a: Settings, b: Settings) -> None:
    folders, ref_folders = _embedding_folders(a), _embedding_folders(b)
    assert folders.keys() == ref_folders.keys()  # one per model fingerprint
    for fp, folder in folders.items():
        ref = ref_folders[fp]
        assert sorted(p.name for p in folder.glob(SHARD_GLOB)) == \
            sorted(p.name for p in ref.glob(SHARD_GLOB))
        raw = [i for p in folder.glob(SHARD_GLOB)
               for i in pq.read_table(p, columns=["image_id"]).column(0).to_pylist()]
        assert len(raw) == len(set(raw)), "an image is embedded twice"
        ids, vectors = load_embeddings(folder)
        ref_ids, ref_vectors = load_embeddings(ref)
        assert ids == ref_ids
        np.testing.assert_allclose(vectors, ref_vectors, atol=ATOL)
        card = lambda f: {k: v for k, v in json.loads(  # noqa: E731 - source: a path
            (f / "model.json").read_text()).items() if k != "source"}
        assert card(folder) == card(ref)
    # no gaps: every present canonical image has an embedding for the current model
    current = safe_load(a.path(a.model.checkpoint))["fingerprint"]
    ids, _ = load_embeddings(folders[current])
    assert {r["image_id"] for r in canonical_images(a)} <= set(ids)


def _compare_index(a: Settings, b: Settings) -> None:
    index, info = load_index(a.path(a.data.index_dir))
    ref_index, ref_info = load_index(b.path(b.data.index_dir))
    assert index.ntotal == ref_index.ntotal == info.n_vectors
    ids = index_ids(index)
    assert len(ids) == len(set(ids.tolist())), "a vector is in the index twice"
    assert set(ids.tolist()) == set(index_ids(ref_index).tolist())
    assert info.params == ref_info.params and info.model_fingerprint == ref_info.model_fingerprint
    # exactly the present images that have an embedding
    folder = a.path(a.data.embeddings_dir) / info.model_fingerprint
    present = {r["image_id"] for r in canonical_images(a)}
    emb_ids, vectors = load_embeddings(folder, present)
    assert set(ids.tolist()) == set(faiss_ids(emb_ids).tolist())
    queries = vectors[:: max(1, len(vectors) // 5)]
    scores, found = search(index, info, queries, 5)
    ref_scores, ref_found = search(ref_index, ref_info, queries, 5)
    np.testing.assert_array_equal(found, ref_found)
    np.testing.assert_allclose(scores, ref_scores, atol=ATOL)


def _pair_rows(s: Settings) -> list[dict[str, Any]]:
    rows = read_pairs(s).to_pylist()
    return sorted(rows, key=lambda r: (r["kind"], r["image_a"], r["image_b"], r["path_b"]))


def _compare_pairs(a: Settings, b: Settings) -> None:
    rows, ref_rows = _pair_rows(a), _pair_rows(b)
    keys = [(r["kind"], r["image_a"], r["image_b"], r["path_b"]) for r in rows]
    assert len(keys) == len(set(keys)), "a pair is recorded twice"
    assert keys == [(r["kind"], r["image_a"], r["image_b"], r["path_b"]) for r in ref_rows]
    for r, ref in zip(rows, ref_rows):
        assert (r["path_a"], r["rank"]) == (ref["path_a"], ref["rank"])
        assert r["score"] == pytest.approx(ref["score"], abs=ATOL)
    clusters = lambda s: sorted(  # noqa: E731
        (r["cluster_id"], r["image_id"], r["size"]) for r in
        pq.read_table(s.path(s.data.pairs_dir) / "clusters.parquet").to_pylist())
    assert clusters(a) == clusters(b)
    searched = lambda s: pq.read_table(  # noqa: E731
        s.path(s.data.pairs_dir) / "searched.parquet").column("image_id").to_pylist()
    assert searched(a) == searched(b)


def _compare_evaluate(a: Settings, b: Settings) -> None:
    reports, ref_reports = a.path(a.data.reports_dir), b.path(b.data.reports_dir)
    metrics = json.loads((reports / "metrics.json").read_text())
    ref_metrics = json.loads((ref_reports / "metrics.json").read_text())
    assert metrics.keys() == ref_metrics.keys()
    for model, vals in metrics.items():
        assert vals == pytest.approx(ref_metrics[model], abs=ATOL), model
    assert pq.read_table(reports / "neighbors.parquet").num_rows == \
        pq.read_table(ref_reports / "neighbors.parquet").num_rows
    assert (reports / "metrics.md").read_text() == (ref_reports / "metrics.md").read_text()


def _compare_report(a: Settings, b: Settings) -> None:
    gallery = a.path(a.data.reports_dir) / "gallery"
    ref_gallery = b.path(b.data.reports_dir) / "gallery"
    pages = _check_pages(gallery, links=True)
    ref_pages = _check_pages(ref_gallery, links=True)
    assert pages.keys() == ref_pages.keys()
    different = [name for name in pages if pages[name] != ref_pages[name]]
    assert not different, f"pages differ from the uninterrupted run's: {different[:5]}"
    thumbs = lambda g: sorted(p.relative_to(g) for p in (g / "thumbs").rglob("*.jpg"))  # noqa
    assert thumbs(gallery) == thumbs(ref_gallery)
    plots = lambda s: sorted(p.name for p in (s.path(s.data.reports_dir) / "plots").iterdir())  # noqa
    assert plots(a) == plots(b)


def _history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def _compare_train(a: Settings, b: Settings) -> None:
    ckpt, ref = safe_load(a.path(a.model.checkpoint)), safe_load(b.path(b.model.checkpoint))
    assert ckpt["fingerprint"] == ref["fingerprint"]
    assert ckpt["state_dict"].keys() == ref["state_dict"].keys()
    different = [k for k in ckpt["state_dict"]
                 if not torch.equal(ckpt["state_dict"][k], ref["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    models, ref_models = a.path(a.data.models_dir), b.path(b.data.models_dir)
    last, ref_last = safe_load(models / "last.pt"), safe_load(ref_models / "last.pt")
    assert last["epoch"] == ref_last["epoch"] == a.train.epochs
    assert [h["loss"] for h in last["history"]] == [h["loss"] for h in ref_last["history"]]
    assert _history(models / "history.csv") == _history(ref_models / "history.csv")
    metrics = json.loads((models / "train_metrics.json").read_text())
    ref_metrics = json.loads((ref_models / "train_metrics.json").read_text())
    assert {k: metrics[k] for k in ("loss", "epochs", "images", "stopped_early")} == \
        {k: ref_metrics[k] for k in ("loss", "epochs", "images", "stopped_early")}
    caches = sorted(a.path(a.data.cache_dir).glob("train-*"))
    assert len(caches) == 1 and len(list(caches[0].glob("images-*.npy"))) == 1
    cache = _read_cache(caches[0])
    ref_cache = _read_cache(next(b.path(b.data.cache_dir).glob("train-*")))
    assert cache is not None and ref_cache is not None
    assert (cache.ids, cache.failed, cache.file.name) == \
        (ref_cache.ids, ref_cache.failed, ref_cache.file.name)
    np.testing.assert_array_equal(np.load(cache.file), np.load(ref_cache.file))


def _nightly_pairs(s: Settings) -> list[tuple[str, ...]]:
    """Every pair listed in the nightly reports, from the markdown tables."""
    rows = []
    for report in sorted((s.path(s.data.reports_dir) / "nightly").glob("run-*.md")):
        for line in report.read_text(encoding="utf-8").splitlines():
            cells = tuple(c.strip() for c in line.strip("|").split(" | "))
            if line.startswith("| ") and cells[0].isdigit():
                rows.append(cells)
    return sorted(rows)


def _compare_nightly(a: Settings, b: Settings) -> None:
    for compare in (_compare_ingest, _compare_embed, _compare_index, _compare_pairs):
        compare(a, b)
    pairs = _nightly_pairs(a)
    assert pairs, "the night's report lists no pair"
    assert len(pairs) == len(set(pairs)), "a new pair is reported twice"
    assert pairs == _nightly_pairs(b)
    assert not (a.path(a.data.reports_dir) / "nightly" / "pending.json").exists()


COMPARE: dict[str, Callable[[Settings, Settings], None]] = {
    "ingest": _compare_ingest, "train": _compare_train, "embed": _compare_embed,
    "index": _compare_index, "pairs": _compare_pairs, "evaluate": _compare_evaluate,
    "report": _compare_report, "nightly": _compare_nightly,
}


# --------------------------------------------------------------------------- the cases

def case(step: str, kill: str, phase: int = 2, *, full: bool = True) -> Any:
    """One kill: `step` of `phase` (2: after the arrivals) killed at `kill` (CBIR_KILL_AT);
    "a then b": killed at a, and its rerun killed again at b."""
    marks = [pytest.mark.faults_full] if full else []
    return pytest.param(step, kill, phase, marks=marks, id=f"{step}{phase}-{kill}")


CASES = [
    # ingest: early, mid-decode (a journal part written), each commit point and write
    case("ingest", "ingest.result:3", full=False),
    case("ingest", "ingest.result:1"),
    case("ingest", "write.part-*.parquet:1"),
    case("ingest", "ingest.commit:1"),
    case("ingest", "write.files.parquet:1"),
    case("ingest", "ingest.commit:2"),
    case("ingest", "write.quarantine.parquet:1"),
    case("ingest", "write.runs.parquet:1"),
    case("ingest", "ingest.commit:4"),
    # the catalogue holds views, rewritten only when they change: on the first build
    case("ingest", "write.catalog.duckdb:1", phase=1),
    case("ingest", "ingest.result:7", phase=1),
    case("ingest", "ingest.commit:2", phase=1),
    case("ingest", "ingest.result:2 then ingest.commit:3"),
    # train: the decoded cache, mid-epoch, each checkpoint write
    case("train", "train.step:3", phase=1, full=False),
    case("train", "train.cache:5", phase=1),
    case("train", "write.images-*.npy:1", phase=1),
    case("train", "write.index.json:1", phase=1),
    case("train", "train.step:1", phase=1),
    case("train", "write.last.pt:2", phase=1),
    case("train", "write.history.csv:1", phase=1),
    case("train", "write.model.pt:1", phase=1),
    case("train", "write.train_metrics.json:1", phase=1),
    case("train", "train.step:3 then train.step:1", phase=1),
    # embed: the first build (six shards) and the arrivals (one)
    case("embed", "write.shard-*.parquet:3", phase=1, full=False),
    case("embed", "write.model.json:1", phase=1),
    case("embed", "embed.batch:1", phase=1),
    case("embed", "embed.batch:5", phase=1),
    case("embed", "embed.shard:2", phase=1),
    case("embed", "embed.batch:1"),
    case("embed", "write.shard-*.parquet:1"),
    case("embed", "write.shard-*.parquet:2 then embed.batch:3", phase=1),
    # the memory-mapped vector file: appended (the arrivals), first written, its commit
    case("embed", "vectors.commit:1"),
    case("embed", "vectors.commit:1", phase=1),
    case("embed", "write.vectors.parquet:1"),
    # index: an update in place (arrivals added, the deleted scan removed); the first build
    case("index", "index.commit:1", full=False),
    case("index", "index.save:1"),
    case("index", "write.index.faiss.next:1"),
    case("index", "write.index.json:1"),
    case("index", "index.commit:1", phase=1),
    # pairs
    case("pairs", "pairs.write:1", full=False),
    case("pairs", "pairs.batch:1"),
    case("pairs", "write.pairs.next.parquet:1"),
    case("pairs", "write.clusters.next.parquet:1"),
    case("pairs", "pairs.searched:1"),
    case("pairs", "write.searched.next.parquet:1"),
    case("pairs", "write.catalog.duckdb:1", phase=1),
    # evaluate
    case("evaluate", "write.metrics.json:1"),
    case("evaluate", "write.neighbors.parquet:1"),
    case("evaluate", "write.metrics.md:1"),
    # report: thumbnails, pages, plots
    case("report", "report.page:3", full=False),
    case("report", "report.thumb:1"),
    case("report", "write.*.jpg:2"),
    case("report", "write.*.png:1"),
    case("report", "report.page:1"),
    case("report", "write.pairs-0001.html:1"),
    case("report", "write.index.html:1"),
    case("report", "report.thumb:10", phase=1),
    case("report", "report.page:12", phase=1),
    # the nightly flow: inside each of its steps, and around its report
    case("nightly", "pairs.write:1", full=False),
    case("nightly", "nightly.begun:1"),
    case("nightly", "write.pending.json:1"),
    case("nightly", "ingest.result:2"),
    case("nightly", "ingest.commit:2"),
    case("nightly", "write.shard-*.parquet:1"),
    case("nightly", "vectors.commit:1", full=False),
    case("nightly", "index.commit:1"),
    case("nightly", "pairs.searched:1"),
    # the commit of the pairs (here a fold: the arrivals removed a scan)
    case("nightly", "write.pairs.json:1", full=False),
    case("nightly", "write.run-*.md:1"),
    case("nightly", "nightly.reported:1"),
    case("nightly", "ingest.commit:4 then pairs.searched:1"),
]


def _kill(ws: Path, step: str, kill: str, env: dict[str, str], *, resume: bool = False) -> None:
    """Run `cbir <step>` with the kill point set; it must die by SIGKILL."""
    argv = [*CBIR, step, "--params", str(ws / "params.yaml"), *(["--resume"] if resume else [])]
    out = subprocess.run(argv, cwd=REPO,
                         env={**os.environ, **env, "CBIR_KILL_AT": kill},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, (
        f"`cbir {step}` with CBIR_KILL_AT={kill} was not killed (exit {out.returncode}): the "
        f"point was never reached\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def _prefect_env() -> dict[str, str]:
    """The module's temporary Prefect server, for a flow run in a subprocess."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url, "no Prefect API: the prefect_harness fixture is not active"
    return {"PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.mark.parametrize("step,kill,phase", CASES)
def test_killed_step_reruns_to_the_uninterrupted_result(step: str, kill: str, phase: int,
                                                        reference: Reference,
                                                        request: pytest.FixtureRequest,
                                                        tmp_path: Path) -> None:
    if step == "nightly":
        ref_ws = request.getfixturevalue("nightly_reference")
        before = reference.before(2, "ingest")
        env = _prefect_env()
    else:
        ref_ws = reference.after(phase, step)
        before = reference.before(phase, step)
        env = {}
    ws = _copy(before, tmp_path / "ws")

    # "a then b": killed at a, then the rerun (train: --resume) killed at b
    for i, spec in enumerate(kill.split(" then ")):
        _kill(ws, step, spec, env, resume=step == "train" and i > 0)
        _assert_usable(ws, before)

    if step == "nightly":
        from flows.nightly import nightly

        nightly(str(ws / "params.yaml"))
    else:
        RERUN[step](_settings(ws))
    COMPARE[step](_settings(ws), _settings(ref_ws))
    assert not _temp_files(ws), "temporary files left behind"


def test_every_step_is_in_the_reduced_set() -> None:
    """CI (the reduced set) kills every step at least once (evaluate, whose outputs only the
    report reads, in the full set), and the full set every step at several points."""
    reduced = {p.values[0] for p in CASES if not p.marks}
    assert reduced == set(COMPARE) - {"evaluate"} == {*PHASES[1], "nightly"} - {"evaluate"}
    per_step = {step: sum(1 for p in CASES if p.values[0] == step) for step in COMPARE}
    assert min(per_step.values()) >= 3, per_step


def test_kill_points_match_wildcards_and_count_hits(monkeypatch: pytest.MonkeyPatch) -> None:
    from cbir import faults

    killed: list[tuple[str, int]] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(("kill", sig)))
    monkeypatch.setattr(faults, "_hits", faults.Counter())
    monkeypatch.setenv(faults.ENV, "write.*.jpg:2, ingest.commit")
    faults.point("write.a.jpg")
    faults.point("write.a.png")
    faults.point("ingest.result")
    assert not killed
    faults.point("write.b.jpg")  # the second match of the pattern
    assert killed == [("kill", signal.SIGKILL)]
    faults.point("ingest.commit")  # n defaults to 1
    assert len(killed) == 2


def test_every_kill_point_is_documented() -> None:
    """faults.py lists every point the code has (tests and users pick them from there)."""
    import re

    from cbir import faults

    names = {m for folder in ("cbir", "flows") for path in (REPO / folder).glob("*.py")
             for m in re.findall(r'faults\.point\("([^"]+)"\)', path.read_text())}
    assert names and all(f"`{name}`" in (faults.__doc__ or "") for name in names), names


def test_a_nightly_run_killed_after_its_report_does_not_report_again(workspace) -> None:
    import pyarrow as pa

    from cbir.store.layout import RUNS
    from cbir.store.manifest import RUNS_SCHEMA
    from cbir.steps.nightly import PENDING, begin_nightly, report_file
    from cbir.store.layout import NIGHTLY as REPORTS

    s = workspace()
    runs = [{"run_id": i} for i in (1, 2)]
    s.path(s.data.manifest_dir).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(runs, schema=RUNS_SCHEMA),
                   s.path(s.data.manifest_dir) / RUNS)
    folder = s.path(s.data.reports_dir) / REPORTS
    folder.mkdir(parents=True)
    (folder / PENDING).write_text(json.dumps({"since_run": 1}))
    assert begin_nightly(s) == 1  # run 2 not reported yet: its arrivals are still pending
    report_file(folder, 2).write_text("# New duplicate pairs, ingest run 2\n")
    assert begin_nightly(s) == 2  # killed after writing run 2's report: reported already
    assert json.loads((folder / PENDING).read_text()) == {"since_run": 2}
