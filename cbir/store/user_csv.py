"""CSV files a user asks cbir to write (decisions, the remove list, a query table): where one
may go, and its text. Each is written whole (fsutil.write_text), never over a foreign file."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import CbirError
from .outputs import check_user_file


def csv_target(settings: Any, file: str | os.PathLike[str], header: str) -> Path:
    """Where a CSV may be written: outside the scans, params, labels and cbir's own outputs,
    and not over a file other than an earlier CSV of the same kind (same header)."""
    target = Path(os.path.abspath(Path(file).expanduser()))
    check_user_file(settings, "the CSV", target)
    if os.path.lexists(target):
        if not target.is_file() or target.is_symlink():
            raise CbirError(f"refused: {target} exists and is not a regular file")
        try:
            with open(target, encoding="utf-8") as fh:
                first = fh.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError):
            first = None
        if first != header:
            raise CbirError(
                f"refused: {target} exists and is not a CSV cbir wrote (its first line is "
                f"not {header!r}); choose another name or move it away"
            )
    return target


def csv_text(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    """The CSV of `rows` under `columns` (None as an empty field)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return out.getvalue()
