"""A person's spelling of a scan's path: another Unicode form is the same name; a Windows
spreadsheet's backslashes or another letter case get a "did you mean"."""

from __future__ import annotations

import unicodedata

import pytest

from cbir.errors import CbirError
from cbir.spelling import Spellings
from cbir.steps.decisions import Resolver
from cbir.steps.ingest import run_ingest
from cbir.store.labels import read_ground_truth
from conftest import photo, save

COMPOSED = "Mühle 1931/Ölmühle.jpg"  # as a keyboard or a spreadsheet writes it (NFC)
DECOMPOSED = unicodedata.normalize("NFD", COMPOSED)  # as a Mac's files keep it


def test_another_unicode_form_is_the_same_name_and_other_misses_are_suggested():
    assert COMPOSED != DECOMPOSED
    known = Spellings([DECOMPOSED, "box-12/0042.jpg", "IMG_0001.JPG"])
    assert known.same(COMPOSED) == DECOMPOSED
    assert known.same(DECOMPOSED) == DECOMPOSED
    assert known.same("box-12/0043.jpg") is None and known.same("box-12/0042.jpg") is None
    assert known.suggest("box-12\\0042.jpg") == "box-12/0042.jpg"
    assert known.suggest("img_0001.jpg") == "IMG_0001.JPG"
    assert known.suggest("nope.jpg") is None
    # two files whose names are one text: neither is guessed
    both = Spellings([COMPOSED, DECOMPOSED])
    assert both.same(unicodedata.normalize("NFKD", COMPOSED)) is None
    assert Spellings(["a.jpg", "A.jpg"]).suggest("a.JPG") is None


@pytest.fixture
def mac_scans(workspace):
    s = workspace.scans
    save(photo(1), s / DECOMPOSED)
    save(photo(2), s / "Mühle 1931" / "copy.jpg")
    save(photo(3), s / "box-12" / "0042.jpg")
    settings = workspace()
    run_ingest(settings)
    return workspace, settings


def test_decide_and_labels_take_a_composed_name_for_a_macs_decomposed_file(mac_scans):
    # Scans copied from a Mac keep decomposed names; every path typed or exported from a
    # spreadsheet is composed, and was "no ingested image" though the file was there.
    workspace, settings = mac_scans
    names = Resolver.of(settings)
    assert names.resolve(COMPOSED) == names.resolve(DECOMPOSED)
    assert names.resolve(COMPOSED)[1] == DECOMPOSED
    with pytest.raises(CbirError, match=r"did you mean 'box-12/0042.jpg'\? \(paths are "
                                        r"written with /, as"):
        names.resolve("box-12\\0042.jpg")
    with pytest.raises(CbirError, match=r"did you mean 'box-12/0042.jpg'\? \(paths are as"):
        names.resolve("BOX-12/0042.jpg")

    labels = workspace.root / "labels.csv"
    labels.write_text(f"path,group\n{COMPOSED},g1\nMühle 1931/copy.jpg,g1\n", encoding="utf-8")
    gt = read_ground_truth(workspace(data={"ground_truth": "labels.csv"}))
    assert gt.n_groups == 1 and len(gt.group_of) == 2
    assert names.resolve(DECOMPOSED)[0] in gt.group_of

    labels.write_text("path,group\nbox-12\\0042.jpg,g1\nMühle 1931/copy.jpg,g1\n")
    with pytest.raises(CbirError, match=r"1 path is not an ingested image \(quarantined or "
                                        r"never ingested\), e\.g\. 'box-12\\\\0042\.jpg' "
                                        r"\(did you mean 'box-12/0042\.jpg'\?\)"):
        read_ground_truth(workspace(data={"ground_truth": "labels.csv"}))
