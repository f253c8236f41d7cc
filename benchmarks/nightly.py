"""What a nightly run costs next to a full build: cost must follow the new work.

Run by hand:  .venv/bin/python benchmarks/nightly.py [--groups 1000] [--distractors 1000]
                  [--size 256] [--resolution 128] [--new 0.01] [--flow]

A demo collection of a few thousand scans (cached under data/cache/bench-nightly) is built in full
without training - ingest, embed, index, pairs, evaluate, report: the library calls of `cbir
build --no-train` and `dvc repro` - while a fraction of the scans (--new, 1 %) is held back. Those
then arrive, and the library calls of the nightly flow are timed: ingest, embed, index,
incremental pairs, the new-pairs report (`dvc commit` is left out: this workspace is no DVC
project). Target: at most 5 % of the full build. A second nightly run, with no new scans, must
decode and embed nothing. The nightly flow's optional steps (evaluate, gallery) are timed apart.
`--flow` also times the same through the Prefect flows: `cbir build --no-train`, then
`cbir nightly`, on a second workspace.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cbir.config import load_settings
from cbir.steps.demo import generate_demo_collection
from cbir.steps.embed import run_embed
from cbir.steps.evaluate import run_evaluate
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.steps.nightly import begin_nightly, nightly_report
from cbir.store.manifest import latest_run
from cbir.steps.report import run_report
from cbir.steps.pairs import run_pairs

REPO = Path(__file__).resolve().parent.parent


def timed(steps: list[tuple[str, Callable[[], Any]]]) -> tuple[dict[str, float], dict[str, Any]]:
    times, results = {}, {}
    for name, fn in steps:
        t0 = time.perf_counter()
        results[name] = fn()
        times[name] = time.perf_counter() - t0
    return times, results


def workspace(ws: Path, demo: Path, new_fraction: float, resolution: int,
              ) -> tuple[Path, list[Path]]:
    """A fresh workspace with every demo scan but the held-back ones; returns (params, held)."""
    shutil.rmtree(ws, ignore_errors=True)
    scans = sorted((demo / "scans").rglob("scan-*"))
    step = max(1, round(1 / new_fraction))
    held = set(scans[step // 2::step])
    for f in scans:
        if f not in held:
            target = ws / "scans" / f.relative_to(demo / "scans")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
    # ground truth of the images present at the full build (the arrivals are not in it)
    with open(demo / "ground_truth.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if (demo / r["path"]) not in held]
    with open(ws / "ground_truth.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "group"])
        w.writeheader()
        w.writerows(rows)  # paths relative to the CSV: the same layout as the demo folder
    params = {"data": {"scans_dir": "scans", "ground_truth": "ground_truth.csv"},
              "embed": {"resolution": resolution, "shard_size": 1000, "workers": 1},
              "orchestration": {"dvc_commit": False}}
    path = ws / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path, sorted(held)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256, help="long side of the demo scans, px")
    ap.add_argument("--resolution", type=int, default=128, help="embed.resolution")
    ap.add_argument("--new", type=float, default=0.01, help="fraction of scans that arrive")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "cache" / "bench-nightly")
    ap.add_argument("--flow", action="store_true", help="also time the Prefect flows")
    args = ap.parse_args()

    demo = args.work / f"demo-{args.groups}-{args.distractors}-{args.size}"
    t0 = time.perf_counter()
    info = generate_demo_collection(demo, n_groups=args.groups, n_distractors=args.distractors,
                                    size=args.size, seed=0)
    print(f"demo collection: {info.n_images} scans of {args.size} px in {demo} "
          f"({time.perf_counter() - t0:.1f} s, cached between runs)")
    params, held = workspace(args.work / "ws", demo, args.new, args.resolution)
    s = load_settings(params)
    print(f"embed.resolution {args.resolution}, resnet18 (model.init none), "
          f"{os.cpu_count()} CPU cores; {len(held)} scans held back, then they arrive")

    full, res = timed([("ingest", lambda: run_ingest(s)), ("embed", lambda: run_embed(s)),
                       ("index", lambda: run_index(s)), ("pairs", lambda: run_pairs(s)),
                       ("evaluate", lambda: run_evaluate(s)), ("report", lambda: run_report(s))])

    def nightly_steps() -> list[tuple[str, Callable[[], Any]]]:
        since: list[int] = []
        return [("begin", lambda: since.append(begin_nightly(s))),
                ("ingest", lambda: run_ingest(s)), ("embed", lambda: run_embed(s)),
                ("index", lambda: run_index(s)),
                ("pairs", lambda: run_pairs(s, incremental=True)),
                ("new pairs", lambda: nightly_report(s, latest_run(s), since[0]))]

    arrive(held, demo, s)
    night, nres = timed(nightly_steps())
    idle, ires = timed(nightly_steps())
    optional, _ = timed([("evaluate", lambda: run_evaluate(s)), ("report", lambda: run_report(s))])

    print(f"\n{'step':<10} {'full build':>11} {'nightly':>9} {'no new scans':>13}")
    for n in dict.fromkeys([*full, *night]):
        cell = lambda d: f"{d[n]:.2f} s" if n in d else "-"  # noqa: E731
        print(f"{n:<10} {cell(full):>11} {cell(night):>9} {cell(idle):>13}")
    tf, tn, ti = sum(full.values()), sum(night.values()), sum(idle.values())
    print(f"{'total':<10} {tf:>9.2f} s {tn:>7.2f} s {ti:>11.2f} s")
    print(f"\nfull build: {res['embed'].embedded} images embedded; nightly: "
          f"{nres['ingest'].counts.get('new', 0)} new scans, {nres['ingest'].decoded} decoded, "
          f"{nres['embed'].embedded} embedded, index "
          f"{'rebuilt' if nres['index'].rebuilt else 'updated'} (+{nres['index'].added}), "
          f"{nres['pairs'].searched} images searched, {nres['pairs'].added} new pairs, "
          f"{len(nres['new pairs'].pairs)} in the report")
    print(f"no new scans: {ires['ingest'].decoded} decoded, {ires['embed'].embedded} embedded, "
          f"{ires['pairs'].searched} searched")
    core = sum(full[n] for n in ("ingest", "embed", "index", "pairs"))
    ratio = tn / tf
    print(f"\nnightly / full build (no training) = {ratio:.3f}: {100 * ratio:.1f} % for "
          f"{100 * args.new:g} % new scans (target <= 5 %): {'PASS' if ratio <= 0.05 else 'FAIL'}")
    print(f"nightly / full build's ingest+embed+index+pairs = {tn / core:.3f}")
    print(f"optional nightly steps (cost follows the collection, off by default): evaluate "
          f"{optional['evaluate']:.2f} s (orchestration.nightly_evaluate), gallery "
          f"{optional['report']:.2f} s (orchestration.nightly_gallery)")

    if args.flow:  # the same again as users run it: the Prefect flows, through the CLI
        params, held = workspace(args.work / "ws-flow", demo, args.new, args.resolution)
        b_wall, b_run = cli("build", "--no-train", params=params, work=args.work)
        arrive(held, demo, load_settings(params))
        n_wall, n_run = cli("nightly", params=params, work=args.work)
        print(f"\nas Prefect flows (`cbir build --no-train`, then `cbir nightly`; flow run "
              f"durations from their logs, temporary Prefect server): build {b_run:.1f} s, "
              f"nightly {n_run:.1f} s = {n_run / b_run:.3f} of the build "
              f"({'PASS' if n_run / b_run <= 0.05 else 'FAIL'}); with Python, Prefect and its "
              f"server starting: {b_wall:.1f} s and {n_wall:.1f} s")


def arrive(batch: list[Path], demo: Path, s: Any) -> None:
    """The day's scans land in the scans folder."""
    for f in batch:
        target = s.path(s.data.scans_dir) / f.relative_to(demo / "scans")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)


def cli(*command: str, params: Path, work: Path) -> tuple[float, float]:
    """`cbir COMMAND` as a user runs it: (wall seconds, seconds of the flow run in its log)."""
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_LOGGING_LEVEL": "INFO"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cbir.cli", *command, "--params", str(params)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"cbir {command[0]} failed: {out.stderr[-2000:]}")
    from flows.server import prefect_home  # the flow run's log: <data>/prefect/<command>.log

    flow = f"cbir-{command[0]}"
    log = prefect_home(load_settings(params)) / f"{command[0]}.log"
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
              for line in log.read_text(encoding="utf-8").splitlines()
              if f"for flow '{flow}'" in line
              or ("Finished in state" in line and "Flow run" in line)]
    return wall, (stamps[-1] - stamps[0]).total_seconds()


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
