"""What every task shares: loading settings, logging summaries, and which failures to retry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar, cast

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


def step_task(name: str, **options: Any) -> Any:
    """@task for a pipeline step: retried on transient failures only (`retry_transient`), never
    cached (every step decides for itself what is already done). How often and after how long
    is orchestration.task_retries / retry_delay_seconds, which flows set (`configured`): no
    second default here."""
    return task(name=name, retry_condition_fn=retry_transient, cache_policy=NO_CACHE, **options)


def log_lines(lines: Iterable[str]) -> None:
    """A step's summary, line by line, into the run's Prefect log."""
    logger = get_run_logger()
    for line in lines:
        if line.strip():
            logger.info(line)


def configured(task: T, settings: Settings) -> T:
    """The task with the retries of orchestration.task_retries / retry_delay_seconds."""
    o = settings.orchestration
    prefect_task: Any = task  # a prefect Task: the flows pass their tasks through as they are
    return cast(
        T,
        prefect_task.with_options(
            retries=o.task_retries,
            retry_delay_seconds=o.retry_delay_seconds,
        ),
    )
