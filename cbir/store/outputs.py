"""Where cbir may write: every output path is checked when the settings load, before any step.

The outputs are the `data.*` paths and `model.checkpoint`, and the data folder's writer lock and
Prefect state (beside `data.manifest_dir`). A params file is refused, with one line naming both
paths, when an output

* overlaps the scans folder (one inside the other), the params file or the ground truth;
* overlaps another output (only the checkpoint may lie in `data.models_dir`, where it belongs);
* is a folder holding anything cbir does not write there (a foreign folder: cbir would overwrite
  or delete files named like its own), or a file that is not of its kind (the catalogue must be
  a DuckDB file, the checkpoint a torch file);

and so is a scans folder that is the file system's root or holds the data folder. A folder is
cbir's when it is empty or holds only the names cbir writes there (`OWN`): no marker file is
needed, so an output restored by `dvc checkout` or written by an earlier version is cbir's too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import layout as L

# What may lie at the top of each output folder. Keep in step with the modules that write there
# (a name missing here makes the next command refuse the folder, so a test run finds it at once).
_ANY = (r"\.tmp-.*", r"\.gitignore", r"\.DS_Store", r"\._.*", r"Thumbs\.db", r"desktop\.ini")


def _names(*names: str) -> tuple[str, ...]:
    return tuple(re.escape(n) for n in names)


OWN: dict[str, tuple[str, ...]] = {
    "manifest_dir": _names(L.FILES, L.QUARANTINE, L.RUNS, L.JOURNAL),
    "embeddings_dir": (r"[0-9a-f]{16}",),  # one folder per model fingerprint
    "index_dir": (
        *_names(
            L.INDEX_FILE,
            L.STAGED_FILE,
            L.SIDECAR_FILE,
            L.DELTA_FILE,
            L.DELTA_STAGED,
            L.NEAR_FILE,
            L.REGION_INDEX,
            L.LOCAL_INDEX,
            L.INDEX_PARTS,
        ),
        re.escape(L.IDS_PREFIX) + r"[0-9a-f]+\.npy",
    ),
    "models_dir": _names(L.LAST, L.HISTORY, L.TRAIN_METRICS, "model.pt"),
    "pairs_dir": _names(
        L.PAIRS,
        L.CLUSTERS,
        L.SEARCHED,
        L.PAIRS_PARTS,
        L.EXACT,
        L.PAIRS_RUNS,
        L.PAIRS_STATE,
        L.PAIRS_NEXT,
        L.SEARCHED_NEXT,
        L.CLUSTERS_NEXT,
    ),
    "decisions_dir": (
        re.escape(L.DECISION_PART_PREFIX) + r"[0-9a-z-]+\.parquet",
        re.escape(L.DECISIONS_README),
    ),
    "reports_dir": (
        *_names(
            L.GALLERY,
            L.PLOTS,
            L.NIGHTLY,
            L.METRICS_JSON,
            L.METRICS_MD,
            L.NEIGHBORS,
            L.CALIBRATION,
            L.CALIBRATION_STATE,
            L.CALIBRATION_CURVE,
        ),
        re.escape(L.PREVIEW_PREFIX) + r".*\.png",
    ),
    "cache_dir": (
        *_names(
            *L.CACHE_TOOLS,
            L.BASELINE_EMBEDDINGS,
            L.REVIEW_CACHE,
            L.FEATURES,
            L.FINGERPRINTS,
            L.STORED_VIEWS,
            L.VECTOR_ORDER,
        ),
        re.escape(L.TRAIN_CACHE_PREFIX) + r"\d+",
    ),
}
# A file output's first bytes, when it exists and is not empty: a DuckDB database ("DUCK" after
# an 8-byte checksum) and a torch checkpoint (a zip archive, or a legacy pickle).
_MAGIC: dict[str, tuple[tuple[int, bytes], ...]] = {
    "catalog": ((8, b"DUCK"),),
    "checkpoint": ((0, b"PK\x03\x04"), (0, b"\x80")),
}


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _refuse(what: str, path: Path, other: str, other_path: Path, hint: str) -> ConfigError:
    return ConfigError(f"{what} {path} overlaps {other} {other_path}: {hint}")


def outputs(settings: Any) -> list[tuple[str, str, Path]]:
    """(params key, kind, real path) of every output: kind is an OWN key, `catalog`,
    `checkpoint` or `state` (the lock file and Prefect's home, beside the manifest folder)."""
    lay = L.layout(settings)
    out = [(f"data.{key}", key, _real(getattr(lay, key))) for key in OWN]
    out.append(("data.catalog", "catalog", _real(lay.catalog)))
    out.append(("model.checkpoint", "checkpoint", _real(lay.checkpoint)))
    out.append(("the writer lock", "state", _real(lay.data) / L.LOCK_NAME))
    out.append(("Prefect's state", "state", _real(lay.data) / L.PREFECT))
    return out


def check_outputs(settings: Any) -> None:
    """Raise ConfigError (one line) when an output could overwrite what cbir does not own."""
    lay = L.layout(settings)
    scans = _real(lay.scans)
    if scans == Path(scans.anchor):
        raise ConfigError(
            f"{settings.params_path}: data.scans_dir is the root of the file "
            f"system ({scans}); point it at the folder that holds the scans"
        )
    data = _real(lay.data)
    if scans == data or scans in data.parents:
        raise ConfigError(
            f"data.scans_dir {scans} contains the workspace's data folder {data} "
            f"(beside data.manifest_dir), where cbir writes: keep the scans apart"
        )
    outs = outputs(settings)
    for key, _, path in outs:
        check_free(settings, key, path)
    for i, (key, kind, path) in enumerate(outs):
        for key2, kind2, path2 in outs[i + 1 :]:
            if _overlap(path, path2) and not _allowed(kind, path, kind2, path2):
                raise _refuse(key, path, key2, path2, "each output needs a place of its own")
    for key, kind, path in outs:
        _check_owned(settings, key, kind, path)


def _inputs(settings: Any) -> list[tuple[str, Path, str]]:
    """What cbir only reads: (name, real path, why no output may overlap it)."""
    out = [
        (
            "data.scans_dir",
            _real(L.layout(settings).scans),
            "the scans are only read; keep the outputs outside it",
        ),
        ("the params file", _real(settings.params_path), "cbir would overwrite it"),
    ]
    if settings.data.ground_truth is not None:
        out.append(
            (
                "data.ground_truth",
                _real(settings.path(settings.data.ground_truth)),
                "cbir would overwrite it",
            )
        )
    return out


def check_free(settings: Any, key: str, path: Path) -> None:
    """Raise ConfigError when the output `path` overlaps the scans, the params or the labels."""
    path = _real(path)
    for name, where, why in _inputs(settings):
        if _overlap(path, where):
            raise _refuse(key, path, name, where, why)


def check_user_file(settings: Any, key: str, path: Path) -> None:
    """Raise ConfigError when a file the user names for cbir to write (an export, a remove
    list) overlaps the scans, the params or the labels, or lies in an output cbir writes
    itself (where it would be a foreign file the next step refuses or overwrites)."""
    check_free(settings, key, path)
    real = _real(path)
    for out_key, _, out in outputs(settings):
        if real == out or out in real.parents:
            raise ConfigError(
                f"refused: {path} lies in {out_key} ({out}), which cbir writes itself; "
                f"write {key} elsewhere"
            )


def _allowed(kind: str, path: Path, kind2: str, path2: Path) -> bool:
    """The checkpoint inside the models folder, the only overlap cbir itself makes."""
    pair = {kind: path, kind2: path2}
    return (
        set(pair) == {"models_dir", "checkpoint"}
        and pair["models_dir"] in pair["checkpoint"].parents
    )


def _check_owned(settings: Any, key: str, kind: str, path: Path) -> None:
    if kind in OWN:
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"{key} {path} is a file, not a folder: point it at a new or empty folder"
            )
        foreign = next(_foreign_entries(settings, kind, path), None)
        if foreign is not None:
            raise ConfigError(
                f"{key} {path} holds {foreign!r}, which cbir did not write: point "
                f"{key} at a new or empty folder (cbir writes only into folders "
                f"that hold nothing but its own outputs)"
            )
    elif kind in _MAGIC and path.exists():
        if not path.is_file():
            raise ConfigError(
                f"{key} {path} is not a regular file: point it at a file of cbir's own"
            )
        if not _has_magic(path, _MAGIC[kind]):
            what = "a DuckDB database" if kind == "catalog" else "a torch checkpoint"
            raise ConfigError(
                f"{key} {path} is not {what}, so cbir did not write it and would "
                f"overwrite it: point {key} at a file of cbir's own"
            )


def _foreign_entries(settings: Any, kind: str, folder: Path) -> Iterator[str]:
    """Names in `folder` that cbir does not write there (stops at the first when iterated)."""
    own = OWN[kind] + _ANY
    checkpoint = _real(L.layout(settings).checkpoint)
    if kind == "models_dir" and folder in checkpoint.parents:  # the checkpoint: any name
        own += (re.escape(checkpoint.relative_to(folder).parts[0]),)
    pattern = re.compile("|".join(f"(?:{p})" for p in own))
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if not pattern.fullmatch(entry.name):
                    yield entry.name
    except FileNotFoundError:
        return
    except OSError:
        return  # unreadable: the step that writes there says so, naming the file


def _has_magic(path: Path, magics: tuple[tuple[int, bytes], ...]) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return True  # unreadable: the step that uses it says so
    return not head or any(head[at : at + len(m)] == m for at, m in magics)
