"""Ingest as a Prefect task."""

from __future__ import annotations

from cbir.steps.ingest import IngestSummary, run_ingest

from .common import log_lines, settings_for, step_task


@step_task("ingest")
def ingest_task(params_path: str, accept_missing: bool = False) -> IngestSummary:
    """Add new scans to the manifest (cbir.steps.ingest.run_ingest): only new files are decoded."""
    summary = run_ingest(settings_for(params_path), accept_missing=accept_missing)
    log_lines(summary.lines())
    return summary
