"""Errors a user can act on. The CLI prints them as one line, without a traceback."""

from __future__ import annotations


class CbirError(Exception):
    """A problem the user can fix (bad params, missing folder, stale index...)."""


class ConfigError(CbirError):
    """params.yaml is missing, malformed, or has a wrong value."""
