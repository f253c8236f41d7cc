"""What every task shares: loading settings and deciding which failures are worth a retry."""

from __future__ import annotations

from typing import Any

from cbir.config import Settings, load_settings
from cbir.errors import CbirError


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
