"""Training as a Prefect task (its own flow step; never part of the nightly run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger

from cbir.errors import IncompatibleCheckpoint

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
    from cbir.steps.train import run_train  # here: the nightly flow never trains

    settings = settings_for(params_path)
    logger = get_run_logger()
    try:
        summary = run_train(settings, resume=True, log=logger.info)
    except IncompatibleCheckpoint as exc:  # any other error is a real one
        logger.info(f"{exc}: training from the beginning")
        summary = run_train(settings, resume=False, log=logger.info)
    log_lines(summary.lines())
    return summary
