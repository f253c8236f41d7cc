"""Errors a user can act on. The CLI prints them as one line, without a traceback."""

from __future__ import annotations


class CbirError(Exception):
    """A problem the user can fix (bad params, missing folder, stale index...)."""


class ConfigError(CbirError):
    """params.yaml is missing, malformed, or has a wrong value."""


class IncompatibleCheckpoint(CbirError):
    """`cbir train --resume` refuses the last epoch checkpoint (models_dir/last.pt): it is not a
    training state, or it was trained with other params or on other images. Training without
    --resume starts again from the beginning."""
