"""Reports as Prefect tasks: the review gallery, and the nightly list of new pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cbir.steps.nightly import NightlyReport, begin_nightly, nightly_report

from .common import log_lines, settings_for, step_task

if TYPE_CHECKING:
    from cbir.steps.report import ReportSummary


@step_task("report")
def report_task(params_path: str) -> ReportSummary:
    """The HTML review gallery and plots (cbir.steps.report.run_report); thumbnails are reused."""
    from cbir.steps.report import run_report  # here: matplotlib loads only for a gallery

    summary = run_report(settings_for(params_path))
    log_lines(summary.lines())
    return summary


@step_task("nightly-begin")
def nightly_begin_task(params_path: str) -> int:
    """The ingest run after which this nightly run's report starts
    (cbir.steps.nightly.begin_nightly): the latest one, or where an earlier nightly run that
    never wrote its report started."""
    return begin_nightly(settings_for(params_path))


@step_task("new-pairs-report")
def new_pairs_task(params_path: str, run_id: int, since_run: int) -> NightlyReport:
    """The duplicate pairs of the images ingested in runs (since_run, run_id], from the
    catalogue's `new_pairs` view (cbir.steps.nightly.nightly_report)."""
    report = nightly_report(settings_for(params_path), run_id, since_run)
    log_lines(report.lines())
    return report
