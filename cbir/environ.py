"""Nothing outside the workspace: where the libraries cbir uses keep their state, and that they
send nothing.

matplotlib (its font cache), anything else that caches under XDG_CACHE_HOME, and Prefect (its
home: a database, a memo store) write under the user's home unless told otherwise; Prefect and
DVC send usage analytics unless told not to. Every cbir command, and a flow module run as a
script, runs with these set where the user has not set them: caches under `data.cache_dir` (but
torchvision's downloaded weights stay where torch keeps them for every program, ~/.cache/torch:
a user who placed them there expects them found), Prefect's home in `<data folder>/prefect` (the
user's Prefect profile, holding a configured PREFECT_API_URL, is still read from where it is),
analytics off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .store.layout import layout


def workspace_environ(settings: Any) -> dict[str, str]:
    """The environment variables that keep a command's state in its workspace."""
    lay = layout(settings)
    cache = lay.cache_dir
    user_prefect = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return {
        "MPLCONFIGDIR": str(cache / "matplotlib"),
        "TORCH_HOME": str(user_cache / "torch"),  # torch's own default, kept under XDG below
        "XDG_CACHE_HOME": str(cache / "xdg"),
        "PREFECT_HOME": str(lay.prefect_home),  # flows/server.py prefect_home
        "PREFECT_PROFILES_PATH": str(user_prefect / "profiles.toml"),
        "PREFECT_LOGGING_COLORS": "false",  # cbir's output escapes control characters
        "DO_NOT_TRACK": "1",  # Prefect's client analytics
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
    }


@contextlib.contextmanager
def confined(settings: Any) -> Iterator[None]:
    """Run the block with `workspace_environ` (each variable only where it is not set), and
    restore the environment afterwards."""
    with defaults(workspace_environ(settings)):
        yield


@contextlib.contextmanager
def defaults(wanted: dict[str, str]) -> Iterator[None]:
    """Run the block with `wanted` set where the variables are not set, then restore them."""
    before = {key: os.environ.get(key) for key in wanted}
    os.environ.update({k: v for k, v in wanted.items() if not os.environ.get(k)})
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
