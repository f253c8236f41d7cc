"""The current model's fingerprint without building the model, when it was computed before.

Every step that opens the embeddings needs the current model's fingerprint (the folder of its
vectors). Building the model to learn it imports torch and torchvision (seconds on a loaded
machine) and loads the weights. The fingerprint is a function of what builds the model, so
`cbir embed` (which builds the model anyway) stores it under a key made of exactly that, and
`current_fingerprint` looks the key up without importing torch:

* the SHA-256 of the checkpoint's bytes when there is one (and of `model.init` when it names a
  local file): a retrained or replaced checkpoint has other bytes;
* the model, embed and train sections of params (more than the fingerprint depends on: a
  change there can only miss the cache);
* the versions of torch and torchvision (a seeded random init and the networks' layouts come
  from them) and the source of cbir/model.py (the network, its preprocessing, the fingerprint).

Any change misses the cache and the model is built as before. The cache is a small JSON file
in data.cache_dir, replaced atomically; a damaged or unwritable one only costs a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..fsutil import atomic_path
from .layout import layout

if TYPE_CHECKING:
    from ..config import Settings

_KEEP = 32  # entries kept: a few models and parameter sets, never a growing file
_MODEL_SOURCE = Path(__file__).resolve().parent.parent / "model.py"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _weight_files(settings: Settings, untrained: bool) -> list[Path]:
    """The files whose bytes the model's weights come from (as retrieval_model chooses)."""
    ckpt = settings.path(settings.model.checkpoint)
    if ckpt.is_file() and not untrained:
        return [ckpt]
    init = Path(settings.model.init)
    init = init if init.is_absolute() else settings.root / init
    return [init] if settings.model.init and init.is_file() else []


def _stats(files: list[Path]) -> list[tuple[int, int, int]]:
    return [(s.st_ino, s.st_size, s.st_mtime_ns) for s in (f.stat() for f in files)]


class ModelKey:
    """What the fingerprint of `retrieval_model(settings, untrained=...)` depends on."""

    def __init__(self, settings: Settings, *, untrained: bool = False) -> None:
        self.cache = layout(settings).fingerprints
        self._settings, self._untrained = settings, untrained
        self.files = _weight_files(settings, untrained)
        self.stats = _stats(self.files)
        parts: dict[str, Any] = {
            "untrained": untrained,
            "files": [[str(f), _sha256(f)] for f in self.files],
            "params": {
                name: getattr(settings, name).model_dump(mode="json")
                for name in ("model", "embed", "train")
            },
            "versions": [_version("torch"), _version("torchvision")],
            "code": _sha256(_MODEL_SOURCE),
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        self.value = hashlib.sha256(text.encode()).hexdigest()

    def unchanged(self) -> bool:
        """Whether the weights come from the same files, as they were when the key was made
        (none replaced, and no checkpoint appeared or went meanwhile)."""
        try:
            same = _weight_files(self._settings, self._untrained) == self.files
            return same and _stats(self.files) == self.stats
        except OSError:
            return False


def _read(cache: Path) -> dict[str, str]:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)}


def current_fingerprint(settings: Settings) -> str:
    """The current model's fingerprint: remembered for exactly these weights, params and code,
    else from the model built (which imports torch; nothing is written then, a step that only
    reads must not write)."""
    try:
        key = ModelKey(settings)
        fp = _read(key.cache).get(key.value)
    except OSError:
        fp = None  # a weights file that cannot be read: building the model says why
    if fp is not None:
        return fp
    from ..model import retrieval_model  # torch: only when the fingerprint is not known

    return retrieval_model(settings)[2]


def remember_fingerprint(key: ModelKey, fingerprint: str) -> None:
    """Store a fingerprint computed from the files `key` was made of (`cbir embed`, once it has
    written the embeddings); skipped when they were replaced meanwhile, or when the cache
    folder cannot be written."""
    if not key.unchanged():
        return
    entries = _read(key.cache)
    if entries.get(key.value) == fingerprint:
        return
    entries.pop(key.value, None)
    entries[key.value] = fingerprint  # newest last
    kept = dict(list(entries.items())[-_KEEP:])
    # read-only or full: a later miss, no more
    with contextlib.suppress(OSError, CbirError), atomic_path(key.cache) as tmp:
        tmp.write_text(json.dumps(kept, indent=1))
