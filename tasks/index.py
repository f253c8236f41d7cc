"""Indexing as a Prefect task."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cbir.index import IndexSummary, run_index

from .common import log_lines, retry_transient, settings_for


@task(name="index", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def index_task(params_path: str, rebuild: bool = False) -> IndexSummary:
    """Add new embeddings to the FAISS index, rebuilding only when index.rebuild_factor says
    so or the model changed (cbir.index.run_index)."""
    summary = run_index(settings_for(params_path), rebuild=rebuild)
    log_lines(summary.lines())
    return summary
