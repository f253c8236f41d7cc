"""Fault injection: named kill points that tests use to SIGKILL a step at a chosen moment.

Set CBIR_KILL_AT="name:n" (several separated by commas) and the process kills itself with SIGKILL
the n-th time it reaches `point(name)`. Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CBIR_KILL_AT"
_hits: Counter[str] = Counter()


def _targets() -> dict[str, int]:
    spec = os.environ.get(ENV, "")
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        out[name] = int(n or 1)
    return out


def point(name: str) -> None:
    """Die here with SIGKILL if CBIR_KILL_AT asks for it (no cleanup, like a power cut)."""
    if ENV not in os.environ:
        return
    target = _targets().get(name)
    if target is None:
        return
    _hits[name] += 1
    if _hits[name] >= target:
        os.kill(os.getpid(), signal.SIGKILL)
