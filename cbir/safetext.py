"""Text that holds file names, made safe to show: a scan's name is data, never a command.

A name may hold any character but `/` and NUL: ANSI escape sequences (which recolour, retitle or
rewrite a terminal), other control characters, line breaks, bidirectional overrides, and
markdown or HTML. On a terminal every line cbir prints goes through `Escaping` (installed by
the CLI around each command), which shows control characters as JSON-style escapes (`\\u001b`,
`\\n`: still valid inside the JSON cbir prints); in reports, names are escaped for their format
(`md_cell` for markdown; the HTML gallery escapes its own).
"""

from __future__ import annotations

import contextlib
import html
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO

# C0 and C1 control characters, DEL, and the bidirectional embeddings, overrides and isolates
# (which reorder what a terminal or an editor shows).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
# Characters that mean something in a markdown table cell (and `\` itself).
_MARKDOWN = re.compile(r"([\\`*_\[\]()!|~])")


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or f"\\u{ord(c):04x}"


def printable(text: object, *, newlines: bool = False) -> str:
    """`text` with its control characters escaped; line breaks kept only with `newlines`."""
    return (_CONTROL_BUT_NEWLINE if newlines else _CONTROL).sub(_escape, str(text))


def md_cell(value: object) -> str:
    """A value for a markdown table cell or line: on one line, no HTML, no markdown."""
    text = html.escape(printable("" if value is None else value), quote=True)
    return _MARKDOWN.sub(r"\\\1", text)


def code_fence(lines: list[str]) -> str:
    """The fence for a code block holding `lines`: longer than any run of backticks in them, so
    no line can close it."""
    longest = max((len(run) for line in lines for run in re.findall("`+", line)), default=0)
    return "`" * max(3, longest + 1)


class Escaping:
    """A text stream that writes through to `raw` with control characters escaped (line breaks
    kept)."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(printable(text, newlines=True))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding...
        return getattr(self.raw, name)


def raw(stream: Any) -> Any:
    """The stream under an `Escaping` one (progress bars draw with carriage returns)."""
    return stream.raw if isinstance(stream, Escaping) else stream


@contextlib.contextmanager
def escaped_output() -> Iterator[None]:
    """sys.stdout and sys.stderr escaped for the block (every print, log line and error)."""
    before = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Escaping(raw(sys.stdout)), Escaping(raw(sys.stderr))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = before


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`1 page`, `2 pages`: a count with its noun (`plural` where it is not the noun + s)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
