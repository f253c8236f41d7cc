"""Evaluation against the ground truth as a Prefect task."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from cbir.evaluate import EvaluationResult, run_evaluate

from .common import log_lines, retry_transient, settings_for


@task(name="evaluate", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def evaluate_task(params_path: str) -> EvaluationResult:
    """Precision/Recall/F1/mAP@K with baselines (cbir.evaluate.run_evaluate)."""
    result = run_evaluate(settings_for(params_path))
    log_lines(result.lines())
    return result
