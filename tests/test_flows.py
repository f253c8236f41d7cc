"""The Prefect flows, run in-process against a temporary Prefect server."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from conftest import photo, save


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def test_build_flow_ingests_like_the_cli(prefect_harness, workspace):
    from flows.build import build

    for i in range(3):
        save(photo(i), workspace.scans / f"p{i}.jpg")
    save(photo(0), workspace.scans / "copy.jpg")
    settings = workspace()
    counts = build(str(settings.params_path))
    assert counts["new"] == 4 and counts["new_duplicates"] == 1
    rows = pq.read_table(settings.path(settings.data.manifest_dir) / "files.parquet").to_pylist()
    assert sorted(r["status"] for r in rows) == ["duplicate", "ok", "ok", "ok"]
