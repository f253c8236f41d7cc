"""Indexing as a Prefect task."""

from __future__ import annotations

from cbir.steps.index import IndexSummary, run_index

from .common import log_lines, settings_for, step_task


@step_task("index")
def index_task(params_path: str, rebuild: bool = False) -> IndexSummary:
    """Add new embeddings to the FAISS index, rebuilding only when index.rebuild_factor says
    so or the model changed (cbir.steps.index.run_index)."""
    summary = run_index(settings_for(params_path), rebuild=rebuild)
    log_lines(summary.lines())
    return summary
