"""Archive workspaces: `cbir init DIR --scans PATH` makes a self-contained folder to run cbir in.

A workspace holds `params.yaml` (every setting, documented, pointing at the scans, which stay
where they are and are only read), `dvc.yaml` (the pipeline: the repository's own, shipped as
`cbir/templates/dvc.yaml`, less its code deps, see `workspace_pipeline`), a labels file, a short
README, and git + DVC, so that `dvc repro`, `dvc exp run`, `dvc metrics show`, `cbir nightly`
and `cbir serve` work there. The repository is itself the workspace of the demo collection.

params.yaml is rendered from the typed settings (cbir/config.py), which hold every default and
its description: there is no second copy of the defaults to keep in step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .config import Settings
from .errors import CbirError
from .fsutil import write_text
from .paramsfile import set_params

#: The settings sections a workspace's params.yaml holds, in pipeline order (`demo` is only for
#: `cbir demo-data`, and takes its defaults).
SECTIONS = (
    "data",
    "ingest",
    "model",
    "train",
    "embed",
    "index",
    "search",
    "calibrate",
    "evaluate",
    "report",
    "review",
    "orchestration",
)
README_MARK = "<!-- written by `cbir init`"
LABELS = "labels.csv"
GITIGNORE_LINES = ("/data/",)
COMMENT_COLUMN = 29
WIDTH = 100

_HEADER = """\
# cbir parameters: the single source of settings for the `cbir` commands, dvc.yaml and the
# Prefect flows. Relative paths resolve against this file's folder. Every key is shown with its
# default; edit freely (`cbir` refuses unknown keys and wrong values with one line).
"""


# --------------------------------------------------------------------------- params.yaml


def _scalar(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


def _entry(key: str, value: Any, description: str | None, indent: str = "  ") -> list[str]:
    """`key: value` with its description beside it (wrapped under it), or above it when the
    line is too long to leave room."""
    line = f"{indent}{key}: {_scalar(value)}"
    if not description:
        return [line]
    if len(line) >= COMMENT_COLUMN:
        above = textwrap.wrap(description, width=WIDTH - len(indent) - 2)
        return [f"{indent}# {text}" for text in above] + [line]
    wrapped = textwrap.wrap(description, width=WIDTH - COMMENT_COLUMN - 2) or [""]
    out = [f"{line.ljust(COMMENT_COLUMN)}# {wrapped[0]}"]
    out += [f"{' ' * COMMENT_COLUMN}# {more}" for more in wrapped[1:]]
    return out


def render_params(scans_dir: str, ground_truth: str | None) -> str:
    """A documented params.yaml with every default, for these scans and labels."""
    lines = [_HEADER.rstrip("\n")]
    for name in SECTIONS:
        model = Settings.model_fields[name].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)  # every section is one
        doc = " ".join((model.__doc__ or "").split())
        lines += [""] + [f"# {text}" for text in textwrap.wrap(doc, width=WIDTH - 2)]
        lines.append(f"{name}:")
        for key, info in model.model_fields.items():
            value = info.get_default(call_default_factory=True)
            if name == "data" and key == "scans_dir":
                value = scans_dir
            elif name == "data" and key == "ground_truth":
                value = ground_truth
            lines += _entry(key, value, info.description)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- init


@dataclass
class InitSummary:
    folder: Path
    scans: Path
    labels: Path | None
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"workspace {self.folder}: scans {self.scans} (read only)"]
        if self.written:
            out.append(f"  wrote {', '.join(self.written)}")
        if self.kept:
            out.append(f"  kept {', '.join(self.kept)}")
        out += [f"  {n}" for n in self.notes]
        out += [
            f"  labels: {self.labels}" if self.labels else "",
            f"  next: cd {self.folder} && dvc repro   (README.md says what each command does)",
        ]
        return [x for x in out if x]


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _refuse_overlaps(folder: Path, scans: Path, data_dir: Path) -> None:
    if scans == Path(scans.anchor):
        raise CbirError(
            f"refused: the scans folder {scans} is the root of the file system; "
            f"point --scans at the folder that holds the archive's scans"
        )
    if _inside(folder, scans):
        raise CbirError(
            f"refused: the workspace {folder} would lie inside the scans folder "
            f"{scans}, which cbir only reads; choose a folder outside it"
        )
    if _inside(scans, data_dir):
        raise CbirError(
            f"refused: the scans folder {scans} lies inside the workspace's data "
            f"folder {data_dir}, which holds what cbir writes (and DVC may replace); "
            f"keep the scans outside it"
        )


def _relative_or_absolute(path: Path, folder: Path) -> str:
    """Inside the workspace: relative (the workspace can move); elsewhere: absolute."""
    return str(path.relative_to(folder)) if _inside(path, folder) else str(path)


def template(name: str) -> str:
    return resources.files("cbir").joinpath("templates", name).read_text(encoding="utf-8")


def init_workspace(
    folder: str | os.PathLike[str],
    scans: str | os.PathLike[str],
    ground_truth: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
) -> InitSummary:
    """Create (or with `force`, update) an archive workspace in `folder` for `scans`.

    Refused, with one line: `folder` inside the scans folder, the scans inside the workspace's
    data folder, and an existing workspace unless `force` (which keeps params other than the
    scans and labels paths, keeps every output under data/, and keeps a copy of a dvc.yaml it
    replaces).
    """
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    scans_path = Path(os.path.realpath(Path(scans).expanduser()))
    if not scans_path.is_dir():
        raise CbirError(f"scans folder not found: {scans_path}")
    gt = Path(os.path.realpath(Path(ground_truth).expanduser())) if ground_truth else None
    if gt is not None and not gt.is_file():
        raise CbirError(f"ground truth not found: {gt}")
    real = Path(os.path.realpath(folder))
    _refuse_overlaps(real, scans_path, real / "data")
    params, dvc_file = folder / "params.yaml", folder / "dvc.yaml"
    existing = [p.name for p in (params, dvc_file) if p.exists()]
    if existing and not force:
        raise CbirError(
            f"{folder} already holds a workspace ({', '.join(existing)}); "
            f"`cbir init --force` updates it and keeps its data"
        )
    folder.mkdir(parents=True, exist_ok=True)
    summary = InitSummary(folder=folder, scans=scans_path, labels=None)
    labels = gt if gt is not None else folder / LABELS
    summary.labels = labels
    scans_text = _relative_or_absolute(scans_path, real)
    labels_text = _relative_or_absolute(labels, real)

    if gt is None and not labels.exists():
        write_text("path,group\n", labels)
        summary.written.append(LABELS)
    if params.exists():
        set_params(params, {"data.scans_dir": scans_text, "data.ground_truth": labels_text})
        summary.kept.append("params.yaml (scans and labels paths set)")
    else:
        write_text(render_params(scans_text, labels_text), params)
        summary.written.append("params.yaml")
    _write_dvc_yaml(dvc_file, summary)
    _write_readme(folder, scans_path, labels_text, summary)
    created = _git(folder)
    _update_gitignore(folder, summary)
    _dvc(folder, created, summary)
    return summary


#: A code dependency in dvc.yaml: a list item naming a path in the cbir package's source.
_CODE_DEP = re.compile(r"^\s*- cbir/\S*\s*(#.*)?$")


def workspace_pipeline(text: str) -> str:
    """The repository's dvc.yaml as a workspace gets it: without the code deps.

    In the repository every stage depends on the cbir modules it runs, so editing them makes
    `dvc repro` rerun it. A workspace runs the installed cbir and has no cbir/ source folder
    (DVC would refuse the missing deps), so its copy drops the lines naming `cbir/...` deps and
    keeps every other line as it is (params, outs, comments); a `deps:` left with no item (a
    stage whose only deps are code) goes too.
    """
    lines = [line for line in text.splitlines(keepends=True) if not _CODE_DEP.match(line)]
    out = []
    for i, line in enumerate(lines):
        if line.strip() == "deps:":
            indent = len(line) - len(line.lstrip())
            rest = (x for x in lines[i + 1 :] if x.strip() and not x.lstrip().startswith("#"))
            after = next(rest, "")
            if not (after.lstrip().startswith("- ") and len(after) - len(after.lstrip()) > indent):
                continue
        out.append(line)
    return "".join(out)


def is_workspace(folder: Path) -> bool:
    """Whether `folder` looks like a workspace: a params.yaml beside a dvc.yaml."""
    return (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file()


def workspaces_in(folder: Path) -> list[Path]:
    """The workspaces among `folder`'s subfolders, by name: where `cbir find-duplicates SCANS`
    left one, for a command run beside it rather than in it."""
    try:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    return [p for p in subs if is_workspace(p)]


def _write_dvc_yaml(target: Path, summary: InitSummary) -> None:
    text = workspace_pipeline(template("dvc.yaml"))
    if target.exists() and target.read_text(encoding="utf-8") == text:
        summary.kept.append("dvc.yaml (current)")
        return
    if target.exists():  # an older or edited pipeline: kept beside, never lost
        backup = target.with_name("dvc.yaml.before-init")
        shutil.copy2(target, backup)
        summary.notes.append(f"the previous dvc.yaml is kept as {backup.name}")
    write_text(text, target)
    summary.written.append("dvc.yaml")


def _write_readme(folder: Path, scans: Path, labels: str, summary: InitSummary) -> None:
    target = folder / "README.md"
    if target.exists() and not target.read_text(encoding="utf-8", errors="replace").startswith(
        README_MARK
    ):
        summary.kept.append("README.md (not cbir's)")
        return
    write_text(
        template("workspace-README.md").format(name=folder.name, scans=scans, labels=labels), target
    )
    summary.written.append("README.md")


def _update_gitignore(folder: Path, summary: InitSummary) -> None:
    """Make git ignore data/ (DVC versions it), unless a rule already does."""
    if _run(["git", "check-ignore", "-q", "data/manifest"], folder).returncode == 0:
        return
    target = folder / ".gitignore"
    old = target.read_text(encoding="utf-8") if target.exists() else ""
    sep = "" if not old or old.endswith("\n") else "\n"
    write_text(
        old
        + sep
        + "# cbir: everything the pipeline writes (DVC versions it)\n"
        + "\n".join(GITIGNORE_LINES)
        + "\n",
        target,
    )
    summary.written.append(".gitignore")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)


def _checked(args: list[str], cwd: Path) -> str:
    out = _run(args, cwd)
    if out.returncode != 0:
        text = (out.stderr or out.stdout).strip()
        first = next((ln for ln in text.splitlines() if ln.strip()), "failed")
        raise CbirError(
            f"`{' '.join(args[-3:] if args[0] == sys.executable else args)}` failed "
            f"in {cwd}: {first}"
        )
    return out.stdout


def _git(folder: Path) -> bool:
    """A git repository for the workspace: a new one, unless DIR is inside one already.
    Returns whether it was created here."""
    if shutil.which("git") is None:
        raise CbirError(
            "git is not installed: a workspace needs git for DVC (e.g. `apt install git`)"
        )
    if _run(["git", "rev-parse", "--show-toplevel"], folder).returncode == 0:
        return False
    _checked(["git", "init", "-q"], folder)
    return True


def _dvc(folder: Path, created: bool, summary: InitSummary) -> None:
    """DVC in the workspace (a subdirectory project inside a larger git repository), analytics
    off; in a repository created here, the workspace files committed so `dvc exp run` works."""
    root = Path(_checked(["git", "rev-parse", "--show-toplevel"], folder).strip())
    dvc = [sys.executable, "-m", "dvc"]
    if not (folder / ".dvc").is_dir():
        subdir = Path(os.path.realpath(root)) != Path(os.path.realpath(folder))
        _checked(dvc + ["init", "-q"] + (["--subdir"] if subdir else []), folder)
        summary.written.append(".dvc/")
        _checked([*dvc, "config", "core.analytics", "false"], folder)
    if created:
        files = [
            f
            for f in (
                "params.yaml",
                "dvc.yaml",
                "README.md",
                LABELS,
                ".gitignore",
                ".dvc",
                ".dvcignore",
            )
            if (folder / f).exists()
        ]
        _checked(["git", "add", "--", *files], folder)
        ident = (
            []
            if _run(["git", "config", "user.email"], folder).stdout.strip()
            else ["-c", "user.name=cbir", "-c", "user.email=cbir@localhost"]
        )
        _checked(["git", *ident, "commit", "-q", "-m", "cbir workspace"], folder)
        summary.notes.append("git repository created, workspace files committed; DVC initialised")
    else:
        summary.notes.append(
            f"inside the git repository {root}: commit the workspace files "
            f"(git add, git commit) before `dvc exp run`"
        )


if __name__ == "__main__":  # `python -m cbir.workspace SCANS [LABELS] > params.yaml`
    print(render_params(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None), end="")
