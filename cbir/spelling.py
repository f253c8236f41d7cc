"""A person's spelling of a scan's path against the file system's: the same name in another
Unicode form, or a near miss worth a "did you mean".

A file copied from a Mac keeps its name decomposed (NFD: `u` + combining diaeresis) where a
keyboard, a spreadsheet or a catalogue writes it composed (NFC: `ü`); Linux compares the bytes,
so `Mühle.jpg` typed in labels.csv does not name the `Mühle.jpg` on disk. Both are the same
text, so they are taken as one wherever the form alone differs and one path matches. Other
differences are a person's to confirm: a Windows spreadsheet's backslashes, another letter case.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable


def composed(text: str) -> str:
    """The NFC form of `text`."""
    return unicodedata.normalize("NFC", text)


class Spellings:
    """Known paths, looked up by the other ways a person may spell them. The tables are made
    on the first lookup, so a caller that never misses pays nothing."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._paths = paths
        self._composed: dict[str, str | None] | None = None
        self._folded: dict[str, str | None] | None = None

    def _tables(self) -> tuple[dict[str, str | None], dict[str, str | None]]:
        if self._composed is None or self._folded is None:
            comp: dict[str, str | None] = {}
            fold: dict[str, str | None] = {}
            for p in self._paths:
                c = composed(p)
                f = c.casefold()
                comp[c] = p if comp.get(c, p) == p else None  # two files, one text: ambiguous
                fold[f] = p if fold.get(f, p) == p else None
            self._composed, self._folded = comp, fold
        return self._composed, self._folded

    def same(self, raw: str) -> str | None:
        """The one known path that is `raw` in another Unicode form, or None."""
        if raw.isascii():
            return None  # one form only: an exact match alone names it
        return self._tables()[0].get(composed(raw))

    def suggest(self, raw: str) -> str | None:
        """A known path `raw` may mean, written with / for \\ or in another letter case."""
        comp, fold = self._tables()
        text = composed(raw.replace("\\", "/"))
        return comp.get(text) or fold.get(text.casefold())
