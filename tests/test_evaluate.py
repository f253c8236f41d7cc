"""cbir.steps.evaluate: the ground truth mapped onto the manifest, exact top-k, and the metrics
of the current model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_workspace

from cbir.errors import CbirError
from cbir.steps.evaluate import exact_topk, run_evaluate
from cbir.store.labels import read_ground_truth
from cbir.store.layout import layout


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return tiny_workspace.make(tmp_path_factory.mktemp("evaluate"))


def test_exact_topk_ranks_by_inner_product():
    v = np.eye(4, dtype=np.float32)
    v[1] = [0.8, 0.6, 0, 0]
    idx, scores = exact_topk(v, np.array([0, 2]), k=2)
    assert idx[0].tolist() == [0, 1] and np.allclose(scores[0], [1.0, 0.8])
    assert idx[1, 0] == 2
    idx, _ = exact_topk(v, np.array([0]), k=5, candidates=np.array([1, 3]))
    assert idx.shape == (1, 2) and idx[0].tolist() == [1, 3]  # only candidates, k clipped


def test_the_ground_truth_maps_paths_onto_images(settings):
    gt = read_ground_truth(settings)
    assert len(gt.group_of) == 4 and len(set(gt.group_of.values())) == 2


@pytest.mark.parametrize("text,fragment", [
    (None, "ground truth not found"),
    ("path,group\nnot-a-scan.png,a\n", "not-a-scan.png"),
])
def test_a_ground_truth_that_cannot_be_mapped_is_refused(settings, tmp_path, text, fragment):
    from cbir.config import load_settings

    csv = tmp_path / "gt.csv"
    if text is not None:
        csv.write_text(text)
    other = load_settings(settings.params_path, {"data.ground_truth": str(csv)})
    with pytest.raises(CbirError, match=fragment):
        read_ground_truth(other)


def test_labels_follow_a_moved_scan_and_leave_out_a_deleted_one(tmp_path):
    """A label is about a picture: after the archive moved one labelled scan and deleted
    another (found in the trial on a real archive: evaluation refused the whole labels file),
    the moved one keeps its label under its old path, the deleted one is left out and counted,
    and a path never ingested is still refused."""
    from cbir.steps.ingest import run_ingest

    s = tiny_workspace.make(tmp_path, steps=("ingest",))
    before = read_ground_truth(s)
    scans = tmp_path / "scans"
    (scans / "moved").mkdir()
    (scans / "p2.png").rename(scans / "moved" / "p2.png")
    (scans / "copies" / "p1-small.png").unlink()
    run_ingest(s)
    gt = read_ground_truth(s)
    gone = set(before.group_of) - set(gt.group_of)  # p1-small's picture; p2's is kept
    assert len(gone) == 1 and before.group_of[gone.pop()] == "b" and gt.csv_gone == 1
    assert gt.group_of.items() <= before.group_of.items() and len(gt.group_of) == 3
    assert "1 paths of the CSV name scans gone from the scans folder" in gt.basis()
    csv = tmp_path / "gt.csv"
    csv.write_text(csv.read_text() + "p9.png,b\n")
    with pytest.raises(CbirError, match="p9.png"):
        read_ground_truth(s)


def test_run_evaluate_writes_the_metrics_of_the_model(settings):
    result = run_evaluate(settings)
    assert result.n_labelled == 4 and result.n_queries == 4
    metrics = json.loads((layout(settings).reports_dir / "metrics.json").read_text())
    assert set(metrics) == {"model", "labels"}  # evaluate.baselines: false
    assert metrics["labels"]["positive_pairs"] == 2 and metrics["labels"]["queries"] == 4
    for key in ("precision@1", "recall@3", "map@3"):
        assert 0.0 <= metrics["model"][key] <= 1.0
    assert "| Model |" in result.table and result.lines()[0].startswith("evaluate: 4 queries")
