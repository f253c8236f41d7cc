"""Ingest as a Prefect task."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cbir.ingest import IngestSummary, run_ingest

from .common import log_lines, retry_transient, settings_for


@task(name="ingest", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def ingest_task(params_path: str) -> IngestSummary:
    """Add new scans to the manifest (cbir.ingest.run_ingest): only new files are decoded."""
    summary = run_ingest(settings_for(params_path))
    log_lines(summary.lines())
    return summary
