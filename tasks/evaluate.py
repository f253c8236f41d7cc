"""Evaluation against the ground truth as a Prefect task."""

from __future__ import annotations

from cbir.evaluate import EvaluationResult, run_evaluate

from .common import log_lines, settings_for, step_task


@step_task("evaluate")
def evaluate_task(params_path: str) -> EvaluationResult:
    """Precision/Recall/F1/mAP@K with baselines (cbir.evaluate.run_evaluate)."""
    result = run_evaluate(settings_for(params_path))
    log_lines(result.lines())
    return result
