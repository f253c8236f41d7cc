"""A tiny workspace (a few small pictures, an exact and a near copy, a 32 px untrained model)
run through ingest, embed and index: the shared input of the per-module tests of embed, query,
evaluate, the catalogue and the data layer. Seconds, not minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import photo, save, write_params

from cbir.config import Settings, load_settings

N_PHOTOS = 6
TINY = {"embed": {"resolution": 32, "scales": [1.0], "batch_size": 4, "shard_size": 3,
                  "workers": 0, "device": "cpu"},
        "ingest": {"workers": 1}, "search": {"k": 3, "pair_threshold": 0.5,
                                             "cluster_threshold": 0.5},
        "evaluate": {"ks": [1, 3], "baselines": False}}


def make(root: Path, steps: tuple[str, ...] = ("ingest", "embed", "index"),
         **extra: dict[str, Any]) -> Settings:
    scans = root / "scans"
    for i in range(N_PHOTOS):
        save(photo(i), scans / f"p{i}.png")
    save(photo(0), scans / "copies" / "p0-copy.png")  # the same bytes: an exact duplicate
    save(photo(1).resize((80, 54)), scans / "copies" / "p1-small.png")  # a near duplicate
    # four labelled images (the exact copies are one image) in two groups
    (root / "gt.csv").write_text("path,group\np0.png,a\ncopies/p0-copy.png,a\np2.png,a\n"
                                 "p1.png,b\ncopies/p1-small.png,b\n")
    params = {"data": {"scans_dir": "scans", "ground_truth": "gt.csv"}}
    for section, values in {**TINY, **extra}.items():
        params[section] = {**TINY.get(section, {}), **values}
    settings = load_settings(write_params(root, params))
    if "ingest" in steps:
        from cbir.steps.ingest import run_ingest
        run_ingest(settings)
    if "embed" in steps:
        from cbir.steps.embed import run_embed
        run_embed(settings)
    if "index" in steps:
        from cbir.steps.index import run_index
        run_index(settings)
    return settings
