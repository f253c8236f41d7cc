"""Fault injection: named kill points that tests use to SIGKILL a step at a chosen moment.

Set CBIR_KILL_AT="name:n" (several separated by commas) and the process kills itself with SIGKILL
the n-th time it reaches a point matching `name` (n defaults to 1). `name` may hold shell-style
wildcards (`write.shard-*.parquet:2`: the second shard write); each item counts its own hits.
Unset (always, outside tests) a point costs one dict lookup. Points are only reached in the
step's main process (never in decode workers, whose death would hang their pool).

The points, by step (tests/test_faults.py kills every step at several of them):

* every atomic write (cbir/fsutil.py): `write.<file name>`, reached once the temporary file is
  complete and synced, before it is renamed over the target - e.g. `write.files.parquet`,
  `write.index.faiss.next`, `write.index.json`, `write.model.pt`, `write.last.pt`,
  `write.shard-<first id>-<count>.parquet`, `write.<image id>.jpg` (a thumbnail),
  `write.pairs-0001.html`, `write.catalog.duckdb`, `write.pending.json`, `write.run-00002.md`
* ingest: `ingest.result` (each decoded file), `ingest.commit` (before the commit and after each
  of its three files)
* train: `train.cache` (each image decoded into the training cache), `train.step` (each
  optimiser step), `train.epoch` (an epoch done, before its checkpoint `last.pt` is written)
* embed: `embed.batch` (each batch through the network, mid-shard), `embed.shard` (a shard
  embedded, before it is written)
* index: `index.save` (built or updated, before anything is written), `index.commit` (the new
  sidecar in place, the staged index file, or delta file, not yet renamed over the old one)
* pairs: `pairs.batch` (each batch of neighbour searches), `features.part` (a part of the
  features cache written, its index not yet), `pairs.verify` (each pair verified),
  `pairs.write` (before the pair and cluster tables are written), `pairs.searched` (before the
  list of searched images)
* report: `report.thumb` (each thumbnail made), `report.page` (before each gallery page)
* nightly: `nightly.begun` (the report's start recorded, before ingest; flows/nightly.py),
  `nightly.reported` (the night's report written, its pending marker not yet removed)
"""

from __future__ import annotations

import fnmatch
import os
import signal
from collections import Counter

ENV = "CBIR_KILL_AT"
_hits: Counter[str] = Counter()


def _targets() -> dict[str, int]:
    spec = os.environ.get(ENV, "")
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        out[name] = int(n or 1)
    return out


def point(name: str) -> None:
    """Die here with SIGKILL if CBIR_KILL_AT asks for it (no cleanup, like a power cut)."""
    if ENV not in os.environ:
        return
    for pattern, target in _targets().items():
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        _hits[pattern] += 1
        if _hits[pattern] >= target:
            os.kill(os.getpid(), signal.SIGKILL)
