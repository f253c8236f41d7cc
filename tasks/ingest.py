"""Ingest as a Prefect task."""

from __future__ import annotations

from prefect import get_run_logger, task

from cbir.ingest import IngestSummary, run_ingest

from .common import retry_transient, settings_for


@task(name="ingest", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def ingest_task(params_path: str) -> IngestSummary:
    """Add new scans to the manifest (cbir.ingest.run_ingest)."""
    summary = run_ingest(settings_for(params_path))
    logger = get_run_logger()
    for line in summary.lines():
        logger.info(line)
    return summary
