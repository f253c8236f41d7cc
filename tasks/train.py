"""Training as a Prefect task (its own flow step; never part of the nightly run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger

from .common import log_lines, settings_for, step_task

if TYPE_CHECKING:
    from cbir.steps.train import TrainSummary


@step_task("train", retries=1, retry_delay_seconds=10)
def train_task(params_path: str) -> TrainSummary:
    """Fine-tune the descriptor (cbir.steps.train.run_train), resuming from the last epoch
    checkpoint.

    A retry or a rerun of the flow continues from `models_dir/last.pt`; when that checkpoint
    belongs to other params or other images (`IncompatibleCheckpoint`), training starts again
    from the beginning.
    """
    from cbir.steps.train import resume_or_restart  # here: the nightly flow never trains

    summary = resume_or_restart(settings_for(params_path), log=get_run_logger().info)
    log_lines(summary.lines())
    return summary
