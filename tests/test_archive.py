"""README "Your own archive", run as written: `cbir init` on a copy of real photographs with no
ground truth, `dvc repro`, the catalogue, a nightly run (a real Prefect flow, recorded with
DVC), review, labels, calibration, a DVC experiment and plots."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cbir import lock
from cbir.paramsfile import set_params
from conftest import REPO, shared_photos

pytestmark = pytest.mark.slow

# Small and short, so the walk-through fits in the suite (the commands are the README's).
TINY = {"train.epochs": 2, "train.resolution": 32, "train.batch_size": 32, "train.workers": 0,
        "embed.resolution": 64, "embed.workers": 0, "calibrate.copies": 40,
        "evaluate.baselines": False, "report.thumb_size": 64, "ingest.workers": 2}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own archive"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start:section.index("\n```", start)]
    commands = []
    for line in block.splitlines():
        # drop a trailing comment (two spaces, then #) outside the quoted SQL
        command = re.sub(r"\s{2,}#.*$", "", line).strip()
        if command:
            commands.append(command)
    return commands


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (lock.ENV, "DVC_STAGE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp / "home")  # `~/archive-ws`; nothing else may land there
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def test_the_readme_walkthrough_on_a_real_archive(tmp_path):
    photos = shared_photos()
    paintings = sorted((photos[0].parents[2] / "distractors").rglob("*.jpg"))
    scans = tmp_path / "mnt" / "scans" / "photo-archive"
    for src in photos[::4] + paintings[::4]:  # a copy of ../shared/data (a quarter of it)
        dst = scans / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    env = _env(tmp_path)
    home = Path(env["HOME"])
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = Archivist\n\temail = a@example.org\n")
    cwd = tmp_path
    ws = home / "archive-ws"
    ran: dict[str, str] = {}
    arrived: list[Path] = []
    for command in readme_commands():
        command = command.replace("/mnt/scans/photo-archive", str(scans))
        command = command.replace("~/archive-ws", str(ws))
        args = shlex.split(command)
        if args[0] == "cd":
            cwd = Path(args[1])
            continue
        if args[:2] == ["cbir", "nightly"]:
            arrived = _new_scans(scans)
        if args[:2] == ["cbir", "calibrate"]:
            _label(ws, arrived)
        out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
        assert out.returncode == 0, (command, out.stdout[-3000:], out.stderr[-3000:])
        assert "Traceback" not in out.stderr, (command, out.stderr[-3000:])
        ran[args[0] + " " + args[1]] = out.stdout
        if args[:2] == ["cbir", "init"]:
            set_params(ws / "params.yaml", TINY)
            subprocess.run(["git", "commit", "-qam", "small and short"], cwd=ws, env=env,
                           check=True, capture_output=True)

    stages = re.findall(r"Running stage '(\w+)'", ran["dvc repro"])
    assert stages == ["ingest", "decisions", "train", "embed", "index", "calibrate", "pairs",
                      "evaluate", "report"]
    assert "pair_threshold" in ran["dvc metrics"] and "estimated_precision" in ran["dvc metrics"]
    assert "near-duplicate pairs" not in ran["cbir sql"]  # it printed a table, not a summary
    # the rescan is searched; the byte-identical copy is known by its hash
    assert "1 new image searched against the collection" in ran["cbir nightly"], \
        ran["cbir nightly"]
    assert "dvc: outputs committed" in ran["cbir nightly"]
    assert "ground truth: threshold" in ran["cbir calibrate"]
    assert "held-out copies: threshold" in ran["cbir calibrate"]
    assert "pairs:" in ran["cbir pairs"] and "(ground truth)" in ran["cbir pairs"]
    assert (ws / "dvc_plots" / "index.html").is_file() or "dvc_plots" in ran["dvc plots"]
    assert (ws / "data" / "reports" / "gallery" / "index.html").is_file()
    # nothing landed outside the workspace and the scans were only read
    assert sorted(p.name for p in home.iterdir()) == [".gitconfig", "archive-ws"]
    assert not any(p.name.startswith(".tmp-") for p in scans.rglob("*"))


def _new_scans(scans: Path) -> list[Path]:
    """The night's arrivals: a rescan of a known photograph and a byte-identical copy."""
    from PIL import Image

    first = sorted((scans / "fsa-owi").glob("*.jpg"))[0] if (scans / "fsa-owi").is_dir() \
        else sorted(scans.rglob("*.jpg"))[0]
    new = scans / "arrived"
    new.mkdir()
    with Image.open(first) as im:
        im.convert("RGB").resize((im.width * 4 // 5, im.height * 4 // 5)).save(
            new / f"{first.stem}-rescan.jpg", quality=80)
    shutil.copyfile(first, new / f"{first.stem}-copy.jpg")
    return [first, new / f"{first.stem}-rescan.jpg"]


def _label(ws: Path, group: list[Path]) -> None:
    """An archivist labels one group (paths relative to the scans folder) and two others."""
    scans = Path(shlex.split((ws / "params.yaml").read_text().split("scans_dir:")[1]
                             .splitlines()[0].split("#")[0])[0])
    rows = ["path,group"] + [f"{p.relative_to(scans)},g1" for p in group]
    others = [p for p in sorted(scans.rglob("*.jpg")) if p not in group][:2]
    rows += [f"{p.relative_to(scans)},single{i}" for i, p in enumerate(others)]
    (ws / "labels.csv").write_text("\n".join(rows) + "\n")
