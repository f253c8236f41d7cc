"""Progress bars for long steps (on a terminal), silent elsewhere (CI logs, Prefect)."""

from __future__ import annotations

from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    import sys

    from tqdm import tqdm

    from .safetext import raw

    # the terminal itself: a bar redraws with carriage returns, which cbir's output escapes
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=raw(sys.stderr))
