"""Threshold help: the pair score threshold that reaches a target precision on the ground truth.

The threshold is read off the same ranking `cbir evaluate` scores
(:func:`cbir.evaluate.rank_model`), so it equals metrics.json's `threshold@pNN` for the same
precision. `--write` puts it into the params file's `search.pair_threshold` by editing that one
line, so comments and layout survive.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics
from .config import Settings, load_settings
from .errors import CbirError, ConfigError
from .fsutil import atomic_path


@dataclass
class Calibration:
    target_precision: float
    threshold: float  # accept pairs scored >= this; inf when the target cannot be reached
    recall: float
    precision: float  # reached at `threshold` (the best precision seen when unreachable)
    n_queries: int
    n_pairs: int  # pooled (query, neighbour) pairs the curve was computed from

    @property
    def reached(self) -> bool:
        return math.isfinite(self.threshold)


def calibrate(ranked: metrics.RankedResults, precision: float = 0.9) -> Calibration:
    """The highest-recall threshold whose precision over pooled pairs is >= `precision`."""
    recall, threshold = metrics.recall_at_precision(ranked, precision)
    prec, rec, thr = metrics.pr_curve(ranked)
    if math.isfinite(threshold):
        reached = float(prec[np.nonzero(thr == threshold)[0][0]])
    else:
        reached = float(prec.max()) if prec.size else float("nan")
    return Calibration(target_precision=precision, threshold=threshold, recall=recall,
                       precision=reached, n_queries=ranked.n_queries,
                       n_pairs=int((~np.isnan(ranked.scores)).sum()))


def param_value(threshold: float) -> float:
    """The threshold as written to params: 6 decimals, rounded down so that no pair the
    calibration accepted falls below it."""
    return math.floor(threshold * 1e6) / 1e6


# --------------------------------------------------------------------------- params editing

_TOP_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w-]*)\s*:(?P<rest>.*)$")


def _set_line(lines: list[str], section: str, key: str, value: str) -> list[str]:
    """Set `section.key: value` in block-style YAML lines, keeping indentation and comments."""
    start = None
    for i, line in enumerate(lines):
        m = _TOP_KEY.match(line)
        if m and m["key"] == section:
            rest = m["rest"].strip()
            if rest and not rest.startswith("#"):
                raise CbirError(f"`{section}:` is not a block of `key: value` lines; set "
                                f"{section}.{key} by hand")
            start = i
            break
    if start is None:  # no such section yet: add one at the end
        tail = "" if not lines or lines[-1].endswith("\n") else "\n"
        return lines + [f"{tail}\n{section}:\n  {key}: {value}\n"]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        end += 1
    indent = None
    pat = re.compile(rf"(?P<ind>[ \t]+){re.escape(key)}(?P<sep>[ \t]*:[ \t]*)"
                     rf"(?P<val>[^#\s][^#]*?)?(?P<pad>[ \t]*)(?P<comment>#.*)?")
    for i in range(start + 1, end):
        body = lines[i].rstrip("\r\n")
        eol = lines[i][len(body):]
        if indent is None and body.strip() and not body.lstrip().startswith("#"):
            indent = body[:len(body) - len(body.lstrip())]
        m = pat.fullmatch(body)
        if m and m["ind"] == indent:
            old = m["val"] or ""
            # keep a trailing comment in its column where the new value fits
            pad = " " * max(1, len(old) + len(m["pad"]) - len(value)) if m["comment"] else ""
            lines[i] = f"{m['ind']}{key}{m['sep']}{value}{pad}{m['comment'] or ''}{eol}"
            return lines
    lines.insert(start + 1, f"{indent or '  '}{key}: {value}\n")
    return lines


def set_params(params_path: Path, updates: dict[str, float]) -> None:
    """Set dotted keys (`section.key`) in a params file in place, preserving everything else.

    The edited text is validated (it must load as settings and hold the new values) before it
    atomically replaces the file.
    """
    text = params_path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    for dotted, value in updates.items():
        section, key = dotted.split(".")
        lines = _set_line(lines, section, key, repr(value))
    new_text = "".join(lines)
    with atomic_path(params_path) as tmp:
        tmp.write_text(new_text, encoding="utf-8")
        try:
            check = load_settings(tmp)
        except ConfigError as exc:
            raise CbirError(f"editing {params_path} would break it ({exc}); left unchanged") \
                from None
        for dotted, value in updates.items():
            section, key = dotted.split(".")
            if getattr(getattr(check, section), key) != value:
                raise CbirError(f"could not set {dotted} in {params_path}; set it by hand")


# --------------------------------------------------------------------------- the step

@dataclass
class CalibrateResult:
    calibration: Calibration
    current: float
    written: dict[str, float] | None = None
    params_path: Path | None = None

    def lines(self) -> list[str]:
        c = self.calibration
        out = [f"calibrate: {c.n_queries} queries, {c.n_pairs} scored pairs (the top K of each "
               f"query)"]
        if not c.reached:
            out.append(f"  no score threshold reaches precision {c.target_precision:g}; the best "
                       f"precision is {c.precision:.4f}")
            return out
        out.append(f"  threshold {param_value(c.threshold):.6f} reaches precision "
                   f"{c.precision:.4f} (target {c.target_precision:g}) with recall {c.recall:.4f}")
        if self.written:
            for key, value in self.written.items():
                out.append(f"  wrote {key}: {value:g} in {self.params_path}")
            out.append("  run `cbir pairs` to apply it")
        else:
            out.append(f"  search.pair_threshold is {self.current:g}; --write sets it")
        return out


def run_calibrate(settings: Settings, precision: float | None = None, write: bool = False,
                  ) -> CalibrateResult:
    """Calibrate on the ground truth with the current model; optionally write the threshold."""
    from .evaluate import rank_model  # torch and faiss load only when calibrating

    target = settings.evaluate.precision_target if precision is None else precision
    if not 0.0 < target <= 1.0:
        raise CbirError(f"--precision must be in (0, 1], got {target}")
    cal = calibrate(rank_model(settings).ranked, target)
    result = CalibrateResult(calibration=cal, current=settings.search.pair_threshold)
    if write:
        if not cal.reached:
            raise CbirError(f"no score threshold reaches precision {target:g}: params left "
                            f"unchanged")
        value = param_value(cal.threshold)
        updates = {"search.pair_threshold": value}
        if settings.search.cluster_threshold < value:  # `cbir pairs` refuses that combination
            updates["search.cluster_threshold"] = value
        set_params(settings.params_path, updates)
        result.written, result.params_path = updates, settings.params_path
    return result
