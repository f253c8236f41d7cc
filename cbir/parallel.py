"""Choosing how to start worker processes."""

from __future__ import annotations

import multiprocessing as mp
import threading


def start_method(preload: list[str] | None = None) -> str:
    """fork is the cheapest start, but unsafe once other threads exist (a Prefect task runs beside
    several): then forkserver, whose server process imports only `preload`."""
    if threading.active_count() == 1:
        return "fork"
    if preload:
        mp.set_forkserver_preload(preload)
    return "forkserver"
