"""Recording the pipeline's outputs with DVC as a Prefect task."""

from __future__ import annotations

from cbir.steps.nightly import DvcRecord, record_with_dvc

from .common import log_lines, settings_for, step_task


@step_task("dvc-commit")
def dvc_commit_task(params_path: str) -> DvcRecord:
    """`dvc commit -f` (and `dvc push` to the default remote) when the workspace is a DVC
    project, so that `dvc status` is clean and `dvc repro` has nothing to redo; a busy DVC
    repository lock is retried, other DVC errors are not."""
    record = record_with_dvc(settings_for(params_path))
    log_lines(record.lines())
    return record
