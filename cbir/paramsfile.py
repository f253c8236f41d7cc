"""Editing a params file in place: one `section.key: value` line at a time, comments kept.

Used where cbir writes a setting for the user (`cbir calibrate --write`, `cbir init --force`):
the file is the user's, so everything else in it (comments, order, layout) stays as it was, and
the edited text must still load as valid settings before it replaces the file atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .config import load_settings
from .errors import CbirError, ConfigError
from .fsutil import atomic_path


def yaml_value(value: Any) -> str:
    """A scalar as YAML text: numbers as Python writes them, strings always quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a YAML string


_TOP_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w-]*)\s*:(?P<rest>.*)$")


def _set_line(lines: list[str], section: str, key: str, value: str) -> list[str]:
    """Set `section.key: value` in block-style YAML lines, keeping indentation and comments."""
    start = None
    for i, line in enumerate(lines):
        m = _TOP_KEY.match(line)
        if m and m["key"] == section:
            rest = m["rest"].strip()
            if rest and not rest.startswith("#"):
                raise CbirError(
                    f"`{section}:` is not a block of `key: value` lines; set "
                    f"{section}.{key} by hand"
                )
            start = i
            break
    if start is None:  # no such section yet: add one at the end
        tail = "" if not lines or lines[-1].endswith("\n") else "\n"
        return [*lines, f"{tail}\n{section}:\n  {key}: {value}\n"]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        end += 1
    indent = None
    pat = re.compile(
        rf"(?P<ind>[ \t]+){re.escape(key)}(?P<sep>[ \t]*:[ \t]*)"
        rf"(?P<val>[^#\s][^#]*?)?(?P<pad>[ \t]*)(?P<comment>#.*)?"
    )
    for i in range(start + 1, end):
        body = lines[i].rstrip("\r\n")
        eol = lines[i][len(body) :]
        if indent is None and body.strip() and not body.lstrip().startswith("#"):
            indent = body[: len(body) - len(body.lstrip())]
        m = pat.fullmatch(body)
        if m and m["ind"] == indent:
            old = m["val"] or ""
            # keep a trailing comment in its column where the new value fits
            pad = " " * max(1, len(old) + len(m["pad"]) - len(value)) if m["comment"] else ""
            lines[i] = f"{m['ind']}{key}{m['sep']}{value}{pad}{m['comment'] or ''}{eol}"
            return lines
    lines.insert(start + 1, f"{indent or '  '}{key}: {value}\n")
    return lines


def set_params(params_path: Path, updates: dict[str, Any]) -> None:
    """Set dotted keys (`section.key`) in a params file in place, preserving everything else.

    The edited text is validated (it must load as settings and hold the new values) before it
    atomically replaces the file.
    """
    text = params_path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    for dotted, value in updates.items():
        section, key = dotted.split(".")
        lines = _set_line(lines, section, key, yaml_value(value))
    new_text = "".join(lines)
    with atomic_path(params_path) as tmp:
        tmp.write_text(new_text, encoding="utf-8")
        try:
            check = load_settings(tmp)
        except ConfigError as exc:
            raise CbirError(
                f"editing {params_path} would break it ({exc}); left unchanged"
            ) from None
        for dotted, value in updates.items():
            section, key = dotted.split(".")
            got = getattr(getattr(check, section), key)
            if (str(got) if isinstance(got, Path) else got) != value:
                raise CbirError(f"could not set {dotted} in {params_path}; set it by hand")
