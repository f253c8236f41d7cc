"""Reading the Parquet outputs cbir keeps between steps back, checked against their schemas.

A stored output can be damaged (truncated, emptied), or replaced by a file that is not what
cbir wrote (another program's Parquet, an earlier `COPY ... TO`). Every step that reads one goes
through `read_table`, and the catalogue checks its views' files with `check_schema` (the footer
only), so such a file stops the step with one line naming it and the command that rebuilds it,
never a traceback from deep inside pyarrow or DuckDB. Kept free of the steps' imports (torch),
so `cbir sql` stays quick.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CbirError


class DamagedFile(CbirError):
    """A stored output cannot be read as what cbir wrote there."""


def damaged(path: str | os.PathLike[str], problem: str, fix: str) -> DamagedFile:
    """The one-line error for a stored output: the file, what is wrong, what rebuilds it."""
    return DamagedFile(f"{path} is unreadable: {one_line(problem)}; {fix}")


def one_line(text: object) -> str:
    """Arrow and DuckDB messages span lines (candidates, carets); one line is enough here."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= 300 else flat[:297] + "..."


def metadata_value(path: str | os.PathLike[str], key: str) -> str | None:
    """The value of `key` in a Parquet file's metadata (None: absent, or the file unreadable)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = meta.get(key.encode())
    return value.decode("utf-8", "replace") if value else None


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    """Whether a stored column can stand for the expected one (same kind of values)."""
    if got == want:
        return True
    kinds = (
        pa.types.is_integer,
        pa.types.is_floating,
        pa.types.is_timestamp,
        lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
    )
    return any(kind(got) and kind(want) for kind in kinds)


def schema_problem(
    schema: pa.Schema, expected: pa.Schema, columns: Sequence[str] | None = None
) -> str | None:
    """Why a file's schema is not `expected` (only `columns` of it, when given), or None."""
    for name in columns or expected.names:
        want = expected.field(name).type
        idx = schema.get_field_index(name)
        if idx < 0:
            return f"it has no column {name!r} (not a file cbir wrote?)"
        if not _compatible(schema.field(idx).type, want):
            return f"column {name!r} holds {schema.field(idx).type}, not {want}"
    return None


def check_schema(path: Path, expected: pa.Schema, fix: str) -> None:
    """Check a stored output's schema from its footer alone (cheap: no data is read)."""
    if not path.is_file():
        raise damaged(path, "it is not a regular file", fix)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise damaged(path, str(exc), fix) from None
    problem = schema_problem(schema, expected)
    if problem:
        raise damaged(path, problem, fix)


def read_table(
    path: Path, expected: pa.Schema, fix: str, columns: Sequence[str] | None = None
) -> pa.Table:
    """A stored output (only `columns`, when given), checked and cast to the expected schema."""
    names = list(columns or expected.names)
    if not path.is_file():  # a folder (pyarrow would read it as a dataset), a dangling link
        raise damaged(path, "it is not a regular file", fix)
    try:
        if columns is not None:  # only those columns read (the footer says whether they fit)
            problem = schema_problem(pq.read_schema(path), expected, names)
            if problem:
                raise damaged(path, problem, fix)
        table = pq.read_table(path, columns=names if columns is not None else None)
        problem = schema_problem(table.schema, expected, names)
        if problem:
            raise damaged(path, problem, fix)
        want = pa.schema([expected.field(n) for n in names])
        table = table.select(names)
        return table if table.schema == want else table.cast(want)
    except (OSError, pa.ArrowException) as exc:  # damaged bytes, or values that do not fit
        raise damaged(path, str(exc), fix) from None


def rows_from(file: pq.ParquetFile, start: int, columns: Sequence[str]) -> pa.Table:
    """The rows of an open Parquet file from row `start` on (`columns` of them), reading only
    the row groups that hold them: a night's rows at the end of 10^7 without the rest."""
    meta = file.metadata
    groups: list[int] = []
    first = skip = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if first + n > start:
            if not groups:
                skip = max(0, start - first)
            groups.append(g)
        first += n
    table = file.read_row_groups(groups, columns=list(columns))
    return table.slice(skip)
