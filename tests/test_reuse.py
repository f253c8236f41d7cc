"""cbir.store.reuse: inside a flow run (`sharing`), the pairs step searches the ids, vectors and
index the index step opened and wrote instead of reading them again, finds exactly what it finds
reading them, and reads them again as soon as one of their files changed; outside, nothing is
kept."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest
import tiny_workspace
from conftest import photo, save

import cbir.store.index as store_index
import cbir.store.vectors as store_vectors
from cbir.steps.embed import run_embed
from cbir.steps.index import run_index
from cbir.steps.ingest import run_ingest
from cbir.steps.pairs import run_pairs
from cbir.store import reuse
from cbir.store.layout import SIDECAR_FILE, layout
from cbir.store.vectors import current_embeddings


@pytest.fixture
def counted(monkeypatch):
    """How often the vectors are opened and the main index is read from disk."""
    calls = {"open_vectors": 0, "load_index": 0}
    open_present, load_index = store_vectors.open_present, store_index.load_index

    def opened(*a, **kw):
        calls["open_vectors"] += 1
        return open_present(*a, **kw)

    def loaded(*a, **kw):
        calls["load_index"] += 1
        return load_index(*a, **kw)

    monkeypatch.setattr(store_vectors, "open_present", opened)
    monkeypatch.setattr(store_index, "load_index", loaded)
    return calls


def _outputs(s) -> tuple[list[dict], list[dict]]:
    lay = layout(s)
    return pq.read_table(lay.pairs).to_pylist(), pq.read_table(lay.clusters).to_pylist()


def test_the_pairs_step_searches_what_the_index_step_opened_and_wrote(tmp_path, counted):
    s = tiny_workspace.make(tmp_path, steps=("ingest", "embed"))
    with reuse.sharing():
        run_index(s)
        assert counted["open_vectors"] == 1
        counted["load_index"] = 0
        run_pairs(s)
        assert counted == {"open_vectors": 1, "load_index": 0}  # nothing read again
    shared = _outputs(s)
    assert sum(r["kind"] == "near" for r in shared[0]) >= 1  # something to compare
    assert not reuse._kept  # forgotten when the flow run ends

    run_pairs(s)  # outside: everything read from disk, and the same pairs and clusters found
    assert counted == {"open_vectors": 2, "load_index": 1}
    assert _outputs(s) == shared
    run_pairs(s)
    assert counted == {"open_vectors": 3, "load_index": 2}


def test_a_file_changed_between_two_steps_is_read_again(tmp_path, counted):
    s = tiny_workspace.make(tmp_path)
    lay = layout(s)
    counted.update(open_vectors=0, load_index=0)  # those of the set-up's index step
    with reuse.sharing():
        _, ids, _, _ = current_embeddings(s)
        assert current_embeddings(s)[1] is ids and counted["open_vectors"] == 1
        # a new scan ingested and embedded: the manifest and the vector files change
        save(photo(77), s.root / "scans" / "new" / "n.png")
        run_ingest(s)
        assert current_embeddings(s)[1] == ids  # the manifest names an image without a vector
        assert counted["open_vectors"] == 2
        run_embed(s)
        now = current_embeddings(s)[1]
        assert counted["open_vectors"] == 3 and len(now) == len(ids) + 1

        # a shard written again (renamed over the old, as cbir writes): its folder changed
        shard = next(iter(sorted(lay.embeddings_dir.glob("*/shard-*.parquet"))))
        shutil.copyfile(shard, shard.with_suffix(".new"))
        os.replace(shard.with_suffix(".new"), shard)
        again = current_embeddings(s)[1]
        assert again == now and again is not now and counted["open_vectors"] == 4  # read again
        assert current_embeddings(s)[1] is again and counted["open_vectors"] == 4  # then kept
        run_index(s)  # adds the new image and saves: the index kept for the next step
        counted["load_index"] = 0
        store_index.open_searcher(s)
        assert counted["load_index"] == 0
        # the sidecar rewritten by someone else (same bytes, a new file): read from disk
        side = lay.index_dir / SIDECAR_FILE
        shutil.copyfile(side, side.with_suffix(".new"))
        os.replace(side.with_suffix(".new"), side)
        searcher = store_index.open_searcher(s)
        assert counted["load_index"] == 1 and searcher.index.ntotal == len(now)


def test_nothing_is_kept_outside_a_flow_run(tmp_path, counted):
    s = tiny_workspace.make(tmp_path)
    counted.update(open_vectors=0, load_index=0)
    current_embeddings(s)
    current_embeddings(s)
    store_index.open_searcher(s)
    assert counted["open_vectors"] == 3 and counted["load_index"] == 1
    assert not reuse._kept
