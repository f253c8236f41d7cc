"""cbir.steps.embed: descriptors of the canonical images in shards named after their content,
resumable (a rerun embeds only what has no embedding yet)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tiny_workspace
import torch

from cbir.model import retrieval_model
from cbir.steps.embed import embed_files, plan_shards, run_embed
from cbir.store.embeddings import embedded_ids, load_embeddings
from cbir.store.layout import SHARD_GLOB, layout

N_IMAGES = tiny_workspace.N_PHOTOS + 1  # the exact copy is one image


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return tiny_workspace.make(tmp_path_factory.mktemp("embed"), steps=("ingest",))


def test_shards_are_planned_by_shard_size_and_named_after_their_content(settings):
    fp = retrieval_model(settings)[2]
    plan = plan_shards(settings, fp)
    assert plan.already == 0 and plan.folder == layout(settings).embeddings(fp)
    assert [len(s.image_ids) for s in plan.shards] == [3, 3, 1]
    assert plan_shards(settings, fp).shards == plan.shards  # the same names for the same work
    assert all(s.name.startswith(f"shard-{s.image_ids[0]}-") for s in plan.shards)


def test_embed_is_resumable(settings):
    first = run_embed(settings)
    assert (first.embedded, first.already, first.shards) == (N_IMAGES, 0, 3)
    folder = first.folder
    shards = sorted(folder.glob(SHARD_GLOB))
    assert len(shards) == 3 and len(embedded_ids(folder)) == N_IMAGES
    ids, vectors = load_embeddings(folder)

    again = run_embed(settings)  # nothing left to do
    assert (again.embedded, again.already) == (0, N_IMAGES)

    lost = next(s for s in shards if "-00001" in s.name)  # as if killed before writing it
    lost.unlink()
    resumed = run_embed(settings)
    assert (resumed.embedded, resumed.already) == (1, N_IMAGES - 1)
    ids2, vectors2 = load_embeddings(folder)
    order = np.argsort(ids), np.argsort(ids2)
    assert sorted(ids) == sorted(ids2)
    assert np.allclose(vectors[order[0]], vectors2[order[1]], atol=1e-5)  # the same vectors


def test_embed_files_reports_unreadable_files(settings, tmp_path):
    model, pp, _, _ = retrieval_model(settings)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    good = layout(settings).scans / "p2.png"
    done, vectors, failed = embed_files(model, [os.fsencode(good), os.fsencode(bad)], pp,
                                        batch_size=2, workers=0, device=torch.device("cpu"))
    assert done == [0] and vectors.shape == (1, model.dim)
    assert [i for i, _ in failed] == [1] and failed[0][1]
