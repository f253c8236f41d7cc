"""Embedding throughput against the same model's forward pass on pre-decoded tensors.

Run by hand:  .venv/bin/python benchmarks/embed.py [--n 256] [--workers 1] [--resolution 224]

Both sides use the same model, batch size and resolution and are measured interleaved in one run
(medians of --repeat), because this machine is shared and noisy. Target: extraction reaches at
least 0.8 of the forward-only throughput, i.e. decoding is overlapped with inference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from cbir.steps.embed import embed_files
from cbir.model import to_tensor
from cbir.imaging import load_rgb
from cbir.model import ModelConfig, Preprocess, build_model

REPO = Path(__file__).resolve().parent.parent


def image_files(n: int) -> list[Path]:
    shared = REPO.parent / "shared" / "data"
    files = sorted(shared.rglob("*.jpg")) if shared.is_dir() else []
    if not files:
        files = sorted((REPO / "data" / "demo" / "scans").rglob("*.jpg"))
    if not files:
        raise SystemExit("skipped: no images (../shared/data is absent and the demo collection "
                         "has not been generated: run `make demo`)")
    return (files * (n // len(files) + 1))[:n]


def forward_only(model: torch.nn.Module, tensors: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, tensors.shape[0], batch):
            model(tensors[s:s + batch])
    return time.perf_counter() - t0


def extraction(model: torch.nn.Module, files: list[Path], pp: Preprocess, batch: int,
               workers: int) -> float:
    t0 = time.perf_counter()
    done, _, failed = embed_files(model, [os.fsencode(f) for f in files], pp, batch_size=batch,
                                  workers=workers, device=torch.device("cpu"))
    assert not failed and len(done) == len(files)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    files = image_files(args.n)
    pp = Preprocess(resolution=args.resolution, scales=(1.0,))
    model, _ = build_model(ModelConfig(backbone=args.backbone))
    model.eval()
    tensors = torch.stack([to_tensor(load_rgb(f, args.resolution), pp) for f in files])
    forward_only(model, tensors[: args.batch], args.batch)  # warm-up
    fwd, ext = [], []
    for _ in range(args.repeat):
        fwd.append(forward_only(model, tensors, args.batch))
        ext.append(extraction(model, files, pp, args.batch, args.workers))
    f, e = statistics.median(fwd), statistics.median(ext)
    print(f"{len(files)} images, {args.backbone} at {args.resolution}px, batch {args.batch}, "
          f"{args.workers} decode worker(s), {torch.get_num_threads()} torch threads")
    print(f"forward pass on pre-decoded tensors: {f:.2f} s ({len(files) / f:.1f} img/s)")
    print(f"extraction from files (decode + forward): {e:.2f} s ({len(files) / e:.1f} img/s)")
    ratio = f / e
    print(f"throughput ratio extraction/forward: {ratio:.2f}  (target >= 0.80: "
          f"{'PASS' if ratio >= 0.8 else 'FAIL'})")


if __name__ == "__main__":
    main()
