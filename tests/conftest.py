"""Shared fixtures: throw-away workspaces with their own params.yaml, and real image files."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

# Each of the suite's worker processes (pytest-xdist: `make test` runs two, one per core of the
# machine CI has) gets its share of the CPUs for OpenMP and BLAS (FAISS, numpy, torch where cbir
# does not set its threads itself), read when those libraries load: below. Left at one thread per
# CPU in every worker, the threads outnumber the cores, and OpenMP's waiting threads spin on the
# cores the other worker needs (a FAISS OPQ training took twice as long). The library's own
# choices (embed, train: torch.set_num_threads) are not overridden; nor is a value the user set.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "").isdigit():
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, _share)))

import numpy as np  # after the thread settings above
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
CBIR = [sys.executable, "-m", "cbir.cli"]
os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect's client analytics, read at its import


def shared_photos() -> list[Path]:
    """The real archive photographs in ../shared/data, or a skip with the reason."""
    photos = sorted((SHARED_DATA / "photos").rglob("*.jpg")) if SHARED_DATA.is_dir() else []
    if not photos:
        pytest.skip(f"real photographs not available: {SHARED_DATA / 'photos'} is absent "
                    "(it sits beside the repository on the project's machines)")
    return photos


def as_archive_user(cmd: list[str]) -> list[str]:
    """`cmd` without root's power to read any file (tests run as root in CI): a real archive
    user lacks it, so permission errors can be tested. Skips where that cannot be arranged."""
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is not available to drop "
                    "CAP_DAC_OVERRIDE")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", *cmd]


def benchmark(name: str) -> Any:
    """benchmarks/<name>.py loaded as a module (benchmarks/ is a folder of scripts)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark",
                                                  REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_params(folder: Path, params: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pytest_configure(config: pytest.Config) -> None:
    """`--dist loadfile` (make test) hands whole files to the workers; pytest-xdist by default
    hands out the files with the most tests first, which left the long one-test files (the
    end-to-end runs, marked slow) for last, where one worker ran them while the other idled.
    The order of the collection (below) is used instead."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a test marked slow first, then the others, those with most tests first
    (xdist's own order): the longest work starts early and the short files fill the end."""
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item)

    def first(name: str) -> tuple[bool, int]:
        tests = by_file[name]
        return (not any(t.get_closest_marker("slow") for t in tests), -len(tests))

    items[:] = [t for name in sorted(by_file, key=first) for t in by_file[name]]


@pytest.fixture
def workspace(tmp_path: Path):
    """A workspace folder with a scans/ folder; call it with params overrides to get Settings."""
    from cbir.config import load_settings

    scans = tmp_path / "scans"
    scans.mkdir()

    def make(**sections: dict[str, Any]):
        params = deep_merge({"data": {"scans_dir": "scans", "ground_truth": None},
                             "ingest": {"workers": 2}}, sections)
        return load_settings(write_params(tmp_path, params))

    make.root = tmp_path
    make.scans = scans
    return make


def photo(seed: int, size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """A small, distinct, photograph-like picture (smooth gradients plus seeded blobs)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 127 + 90 * np.sin(fx * x / w * 6.28 + ph) * np.cos(fy * y / h * 6.28)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 20)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return im.convert(mode) if mode != "RGB" else im


def save(im: Image.Image, path: Path, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect API server for the session, started as `cbir build` / `cbir
    nightly` start theirs (flows/server.py): waited for as long as it is alive and making
    progress, never for a fixed time, so a busy machine slows the suite but does not fail it."""
    from flows.server import local_api

    with local_api(tmp_path_factory.mktemp("prefect")) as url:
        yield url


@pytest.fixture(autouse=True)
def _no_kill_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CBIR_KILL_AT", raising=False)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(autouse=True)
def _same_folder_after_each_test():
    """A test may change the current folder (open_catalogue does); the next one starts where
    this one did."""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def open_catalogue(settings: Any):
    """The catalogue as a user's own script opens it: in the workspace, read only, with the
    workspace folder as DuckDB's file_search_path (its views name their Parquet files relative to
    the workspace, and DuckDB looks for a relative name in the current folder first: started
    elsewhere, the repository's own data/ after `make demo` would be read instead)."""
    import duckdb

    os.chdir(settings.root)
    con = duckdb.connect(str(settings.path(settings.data.catalog)), read_only=True)
    con.execute("SET file_search_path = ?", [str(settings.root)])
    return con


def textured(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A picture with structure at many scales: shapes of random tone over a grainy ground."""
    rng = np.random.default_rng(seed)
    w, h = size
    ground = rng.normal(128, 30, (h // 8, w // 8)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(ground, "L").resize(size, Image.Resampling.BICUBIC).convert("RGB")
    d = ImageDraw.Draw(img)
    for _ in range(260):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(4, 40)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=fill)
        else:
            d.rectangle([x - r, y - r * rng.uniform(0.2, 1), x + r * rng.uniform(0.2, 1), y + r],
                        fill=fill)
    return img.filter(ImageFilter.GaussianBlur(0.7))
