"""Evaluation against the ground truth as a Prefect task."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import log_lines, settings_for, step_task

if TYPE_CHECKING:
    from cbir.steps.evaluate import EvaluationResult


@step_task("evaluate")
def evaluate_task(params_path: str) -> EvaluationResult:
    """Precision/Recall/F1/mAP@K with baselines (cbir.steps.evaluate.run_evaluate)."""
    from cbir.steps.evaluate import run_evaluate  # here: a nightly run evaluates only when asked

    result = run_evaluate(settings_for(params_path))
    log_lines(result.lines())
    return result
