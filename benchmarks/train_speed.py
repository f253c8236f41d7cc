"""Training speed on a busy CPU machine: epoch time idle and beside busy processes, side by side.

Run by hand (about 20-40 minutes on 2 cores):
    .venv/bin/python benchmarks/train_speed.py [--out /tmp/train-bench] [--busy 0 1 2] [--repeat 2]

Builds (once) about 1,000 images from ../shared/data with benchmarks/quality.py's generator, then
times one epoch of the default recipe (112 px, batch 64, heritage augmentation, 25 planned epochs)
per variant, each in a fresh process (OpenMP reads its settings when torch loads), idle and beside
N processes that spin on the CPU (`while 1: pass`, killed afterwards). Variants run interleaved
within each load level, so they see the same machine; the table gives medians over --repeat runs:

* before: what cbir did until now: fp32, one torch thread per core of the machine
  (os.cpu_count()), OpenMP's default waits (threads spin before they sleep);
* fp32: fp32 with this version's threads (the available CPUs less the augmentation workers)
  and sleeping OpenMP waits;
* after: this version's defaults (also train.precision auto: a bf16 trunk where the CPU has
  native bf16 and training runs one torch thread);
* all-cpus: the same with one torch thread per available CPU beside the augmentation worker
  (so fp32: bf16 needs one thread);
* bf16-2t (not run by default): a bf16 trunk on 2 threads, to see why not.

"slower" is the epoch time over the variant's idle one; "fair" is what a fair share of the CPU
predicts: with t torch threads and k spinning processes on c cores, max(1, (t + k) / c) (the
augmentation worker, busy a tenth of the time, left out). CPU is the process' user + sys seconds
(augmentation workers included) per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, dict[str, Any]] = {
    "before": {"train": {"precision": "fp32"}, "torch_first": True, "threads": "cpu_count"},
    "fp32": {"train": {"precision": "fp32"}},
    "after": {"train": {}},
    "all-cpus": {"train": {}, "threads": "available"},
    "bf16-2t": {"train": {}, "threads": "available", "bf16": True},
}
DEFAULT_VARIANTS = ["before", "fp32", "after", "all-cpus"]


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(params: Path, variant: str, epochs: int) -> None:
    """One measurement, in its own process: prints a JSON line."""
    spec = VARIANTS[variant]
    if not spec.get("torch_first"):
        import cbir.steps.train  # noqa: F401  (first: it asks OpenMP for sleeping waits)
    import torch  # when first, OpenMP keeps its default waits (spin, then sleep)

    import cbir.steps.train as train
    from cbir.config import load_settings
    from cbir.training import cpu

    if spec.get("threads") == "cpu_count":  # the old thread count: all the machine's cores
        train.torch_threads = lambda cpus, workers, ranks=1: (os.cpu_count() or 1) // ranks
    elif spec.get("threads") == "available":  # ignoring the augmentation workers
        train.torch_threads = lambda cpus, workers, ranks=1: cpus // ranks
    if spec.get("bf16"):  # whatever the thread count
        train.cpu_bf16 = lambda device, precision, threads: cpu._native_bf16()
    mark: dict[str, float] = {}

    def log(line: str) -> None:
        if line.startswith("train: ") and "steps an epoch" in line:
            mark.setdefault("cpu", _cpu())  # training starts: setup and imports excluded

    summary = train.run_train(load_settings(params), max_epochs=epochs, log=log)
    print(json.dumps({"seconds": [h["seconds"] for h in summary.history],
                      "cpu": (_cpu() - mark["cpu"]) / max(1, len(summary.history)),
                      "threads": torch.get_num_threads(), "precision": summary.precision,
                      "omp": "default" if spec.get("torch_first")
                      else os.environ.get("OMP_WAIT_POLICY", "default")}), flush=True)


def prepare(out: Path, copies: int) -> Path:
    """The benchmark collection, ingested, with its decoded training cache; its params file."""
    ws = out / "ws"
    params = ws / "params.yaml"
    if (ws / "ready").exists():
        return params
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality import build_benchmark

    from cbir.config import load_settings
    from cbir.steps.ingest import run_ingest
    from cbir.steps.train import build_cache

    scans, _, n = build_benchmark(out, copies, 0)
    print(f"collection: {sum(n.values())} images in {scans}", flush=True)
    ws.mkdir(parents=True, exist_ok=True)
    params.write_text(yaml.safe_dump({"data": {"scans_dir": str(scans), "ground_truth": None}}))
    settings = load_settings(params)
    run_ingest(settings)
    build_cache(settings)
    (ws / "ready").touch()
    return params


def variant_params(ws: Path, variant: str) -> Path:
    """A params file sharing the collection's manifest and cache, with its own models folder."""
    d = ws / "data"
    params = {"data": {"scans_dir": str(ws.parent / "scans"), "ground_truth": None,
                       "manifest_dir": str(d / "manifest"), "catalog": str(d / "catalog.duckdb"),
                       "cache_dir": str(d / "cache"), "models_dir": f"models-{variant}"},
              "train": {"time_budget_minutes": 0, **VARIANTS[variant]["train"]}}
    path = ws / f"params-{variant}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def measure(params: Path, variant: str, epochs: int, busy: int) -> dict[str, Any]:
    spinners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(busy)]
    try:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--params",
                              str(params), "--epochs", str(epochs)], cwd=REPO,
                             capture_output=True, text=True, check=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/train-bench"))
    ap.add_argument("--copies", type=int, default=5, help="near-duplicates per photo, at most")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1, help="epochs per measurement")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--params", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.params, args.child, args.epochs)
        return

    ws = prepare(args.out, args.copies).parent
    cores = len(os.sched_getaffinity(0))
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(args.repeat):
        for busy in args.busy:
            for variant in args.variants:
                load = os.getloadavg()[0]
                m = measure(variant_params(ws, variant), variant, args.epochs, busy)
                runs.setdefault((variant, busy), []).append(m)
                print(f"run {r + 1}, {busy} busy, {variant}: epoch {m['seconds']} s, "
                      f"{m['cpu']:.0f} CPU s/epoch, {m['threads']} threads, {m['precision']}, "
                      f"OpenMP waits {m['omp']} (load before {load:.1f})",
                      flush=True)

    def median(variant: str, busy: int, key: str) -> float:
        vals = [statistics.median(m["seconds"]) if key == "seconds" else m[key]
                for m in runs[(variant, busy)]]
        return statistics.median(vals)

    print(f"\nmedian of {args.repeat} runs, one epoch of "
          f"{args.epochs} each, {cores} cores:\n")
    head = "| variant | " + " | ".join(
        f"{b} busy: epoch s (slower, fair) | CPU s" for b in args.busy) + " |"
    print(head)
    print("|---" * (1 + 2 * len(args.busy)) + "|")
    for variant in args.variants:
        idle = median(variant, args.busy[0], "seconds")
        threads = runs[(variant, args.busy[0])][0]["threads"]
        cells = []
        for b in args.busy:
            s = median(variant, b, "seconds")
            fair = max(1.0, (threads + b) / cores)
            cells.append(f"{s:.1f} ({s / idle:.2f}x, {fair:.2f}x)"
                         f" | {median(variant, b, 'cpu'):.0f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    (args.out / "train_speed.json").write_text(json.dumps(
        {f"{v} busy={b}": m for (v, b), m in runs.items()}, indent=1))
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}; raw runs in {args.out / 'train_speed.json'}")


if __name__ == "__main__":
    main()
