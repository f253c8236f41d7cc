"""What every task shares: loading settings, logging summaries, and which failures to retry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cbir.config import Settings, load_settings
from cbir.errors import CbirError

T = TypeVar("T")


def settings_for(params_path: str) -> Settings:
    return load_settings(params_path)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is one a user must fix (bad params, missing folder...)."""
    try:
        state.result()
    except CbirError:
        return False
    except Exception:
        return True
    return False


def step_task(name: str, *, retries: int = 2, retry_delay_seconds: float = 5,
              **options: Any) -> Any:
    """@task for a pipeline step: retried on transient failures only (`retry_transient`), never
    cached (every step decides for itself what is already done). Flows override the retries
    from params (`configured`)."""
    return task(name=name, retries=retries, retry_delay_seconds=retry_delay_seconds,
                retry_condition_fn=retry_transient, cache_policy=NO_CACHE, **options)


def log_lines(lines: Iterable[str]) -> None:
    """A step's summary, line by line, into the run's Prefect log."""
    logger = get_run_logger()
    for line in lines:
        if line.strip():
            logger.info(line)


def configured(task: T, settings: Settings) -> T:
    """The task with the retries of orchestration.task_retries / retry_delay_seconds."""
    o = settings.orchestration
    return task.with_options(retries=o.task_retries,  # type: ignore[attr-defined]
                             retry_delay_seconds=o.retry_delay_seconds)
