"""The labels evaluation and calibration score against: the `path,group` ground-truth CSV
(`data.ground_truth`) mapped onto the manifest's images, and the reviewers' current decisions
(`data.decisions_dir`), made into groups together (`read_labels`)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CbirError
from ..linkage import DisjointSets
from ..safetext import counted
from ..spelling import Spellings
from .decisions import labels, pair_key
from .layout import layout
from .manifest import PRESENT, load_manifest

if TYPE_CHECKING:
    from ..config import Settings


@dataclass
class GroundTruth:
    group_of: dict[str, str]  # image_id -> group
    n_rows: int
    n_groups: int
    csv_images: int = 0  # images the ground-truth CSV labels
    decided_same: int = 0  # current `same` decisions used (both images present)
    decided_different: int = 0  # current `different` decisions used
    overridden: int = 0  # CSV pairs (same group) a `different` decision split
    contradicted: int = 0  # `different` decisions whose images other labels keep together
    csv_gone: int = 0  # CSV paths of scans ingested once and gone since: left out

    @property
    def positive_pairs(self) -> int:
        """The labelled duplicate pairs: every pair of images within a group."""
        sizes: dict[str, int] = {}
        for g in self.group_of.values():
            sizes[g] = sizes.get(g, 0) + 1
        return sum(n * (n - 1) // 2 for n in sizes.values())

    def to_json(self) -> dict[str, int]:
        return {
            "images": len(self.group_of),
            "groups": self.n_groups,
            "positive_pairs": self.positive_pairs,
            "csv_images": self.csv_images,
            "decided_same": self.decided_same,
            "decided_different": self.decided_different,
            "overridden": self.overridden,
            "contradicted": self.contradicted,
            "csv_gone": self.csv_gone,
        }

    def basis(self) -> str:
        """What the labels rest on, in words."""
        out = (
            f"{counted(self.positive_pairs, 'labelled duplicate pair')} in "
            f"{counted(self.n_groups, 'group')}"
        )
        parts = []
        if self.csv_images:
            parts.append(f"{counted(self.csv_images, 'image')} of the ground-truth CSV")
        if self.decided_same or self.decided_different:
            parts.append(
                f"{counted(self.decided_same, 'pair')} decided same, "
                f"{self.decided_different} different"
            )
        if parts:
            out += f" (from {'; '.join(parts)})"
        if self.csv_gone:
            out += (
                f"; {self.csv_gone} paths of the CSV name scans gone from the scans folder "
                f"since they were ingested: left out"
            )
        if self.overridden:
            out += f"; {self.overridden} CSV pairs split by a `different` decision"
        if self.contradicted:
            out += (
                f"; {self.contradicted} `different` decisions contradicted by other labels "
                f"(their images stay in one group)"
            )
        return out


class NoLabels(CbirError):
    """The ground truth labels no group of two or more ingested images: nothing to score."""


def read_ground_truth(settings: Settings) -> GroundTruth:
    """Map a `path,group` CSV onto the manifest's images; refuse what cannot be mapped.

    A path is looked up relative to the CSV's folder, then relative to the scans folder (the
    manifest's own paths); absolute paths work too. Every path must name an image ingested
    inside the scans folder. A label is about a picture: a path whose scan was moved since
    labels the picture where it is now, and one whose picture is gone from the collection is
    left out and counted (an archive's labels outlive some scans); a path never ingested is
    refused (a typo would silently shrink the labels). Images the CSV does not name are
    unlabelled: evaluation and calibration leave them out (a partial ground truth is fine).
    """
    lay = layout(settings)
    csv_path = lay.ground_truth
    if csv_path is None:
        raise CbirError("no ground truth configured (data.ground_truth in params)")
    if not csv_path.is_file():
        raise CbirError(f"ground truth not found: {csv_path} (data.ground_truth in params)")
    scans = os.path.realpath(lay.scans)
    rows = load_manifest(settings, ["image_id", "path", "status", "version"]).to_pylist()
    id_of = {r["path"]: r["image_id"] for r in rows if r["status"] in PRESENT}
    # paths no file holds now: the picture each held last (None where that picture is gone)
    present_ids = set(id_of.values())
    former: dict[str, str | None] = {}
    for r in sorted((r for r in rows if r["path"] not in id_of), key=lambda r: r["version"]):
        former[r["path"]] = r["image_id"] if r["image_id"] in present_ids else None
    gone = 0
    spelt = Spellings([*id_of, *former])

    def lookup(raw: str) -> tuple[str | None, bool, bool]:
        """(image id or None, whether the path escapes the scans folder: it names an existing
        file outside it, or a path outside it in every reading; whether it names a scan that
        was ingested and whose picture is gone)."""
        escapes, readings, was = False, 0, False
        for base in (str(csv_path.parent), scans):
            joined = os.path.join(base, raw)
            full = os.path.realpath(joined)
            if os.path.commonpath([scans, full]) != scans:
                escapes = escapes or os.path.lexists(joined)
                continue
            readings += 1
            rel = os.path.relpath(full, scans)
            if rel not in id_of and rel not in former:  # typed where a Mac's name decomposes
                rel = spelt.same(rel) or rel
            image_id = id_of.get(rel) or former.get(rel)
            if image_id is not None:
                return image_id, False, False
            was = was or rel in former
        return None, escapes or readings == 0, was

    group_of: dict[str, str] = {}
    outside: list[str] = []
    unknown: list[str] = []
    n = 0
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:  # an empty file: nothing labelled yet
                return GroundTruth(group_of={}, n_rows=0, n_groups=0)
            if not {"path", "group"} <= set(reader.fieldnames):
                raise CbirError(
                    f"{csv_path}: expected a header with columns path,group "
                    f"(got {reader.fieldnames})"
                )
            for row in reader:
                n += 1
                raw, group = (row["path"] or "").strip(), (row["group"] or "").strip()
                if not raw or not group:
                    raise CbirError(f"{csv_path}, line {reader.line_num}: empty path or group")
                image_id, escapes, was = lookup(raw)
                if image_id is None and was:
                    gone += 1
                    continue
                if image_id is None:
                    (outside if escapes else unknown).append(raw)
                    continue
                group_of.setdefault(image_id, group)
    except UnicodeDecodeError:
        raise CbirError(f"{csv_path} is not UTF-8 text") from None
    if outside:
        raise CbirError(
            f"{csv_path}: {len(outside)} {'path lies' if len(outside) == 1 else 'paths lie'} "
            f"outside the scans folder {scans}, "
            f"e.g. {outside[0]!r}"
        )
    if unknown:
        guess = spelt.suggest(os.path.normpath(unknown[0]))
        meant = f" (did you mean {guess!r}?)" if guess is not None else ""
        n = len(unknown)
        what = "1 path is not an ingested image" if n == 1 else f"{n} paths are not ingested images"
        raise CbirError(
            f"{csv_path}: {what} (quarantined or never ingested), e.g. {unknown[0]!r}{meant}; "
            f"see the quarantine table or run `cbir ingest`"
        )
    return GroundTruth(
        group_of=group_of, n_rows=n, n_groups=len(set(group_of.values())), csv_gone=gone
    )


def read_labels(settings: Settings, present: set[str] | None = None) -> GroundTruth:
    """The labels evaluation and calibration score against: the ground-truth CSV (when one is
    configured) and the reviewers' current decisions, together.

    The metrics work on groups (a query is an image whose group has another member; a result is
    right when it is in the query's group), so the decisions become groups too: images joined by
    a `same` decision, or by a CSV group, form one group (connected components); a `different`
    decision on two images of one CSV group overrides the CSV for that pair (the group is joined
    only through its other pairs); an image only ever decided `different` is labelled alone (a
    group of one: it is ranked among the labelled images, and retrieving it is wrong). `unsure`
    decisions say nothing. `present`: the image ids that can be labelled (default: all).
    """
    lay = layout(settings)
    if lay.ground_truth is not None:
        csv_gt = read_ground_truth(settings)
    else:
        csv_gt = GroundTruth(group_of={}, n_rows=0, n_groups=0)
    decided = labels(lay.decisions_dir)
    if present is not None:
        decided = decided.only(present)
        csv_groups = {i: g for i, g in csv_gt.group_of.items() if i in present}
    else:
        csv_groups = dict(csv_gt.group_of)
    if not decided:
        return GroundTruth(
            group_of=csv_groups,
            n_rows=csv_gt.n_rows,
            n_groups=len(set(csv_groups.values())),
            csv_images=len(csv_groups),
            csv_gone=csv_gt.csv_gone,
        )
    sets = DisjointSets()
    find, join = sets.find, sets.join
    members: dict[str, list[str]] = {}
    for image_id, g in sorted(csv_groups.items()):
        members.setdefault(g, []).append(image_id)
        find(image_id)
    overridden = 0
    for group in members.values():
        split = [(a, b) for a, b in decided.different if a in group and b in group]
        overridden += len(split)
        if not split:  # every pair of the group is a duplicate pair: a chain joins them
            for other in group[1:]:
                join(group[0], other)
            continue
        apart = set(split)
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if pair_key(a, b) not in apart:
                    join(a, b)
    for a, b in decided.same:
        join(a, b)
    for a, b in decided.different:
        find(a), find(b)
    contradicted = sum(1 for a, b in decided.different if find(a) == find(b))
    group_of = {x: f"group:{find(x)}" for x in sets}
    return GroundTruth(
        group_of=group_of,
        n_rows=csv_gt.n_rows,
        n_groups=len(set(group_of.values())),
        csv_images=len(csv_groups),
        decided_same=len(decided.same),
        decided_different=len(decided.different),
        overridden=overridden,
        contradicted=contradicted,
        csv_gone=csv_gt.csv_gone,
    )
