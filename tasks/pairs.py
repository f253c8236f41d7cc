"""Near-duplicate pairs and clusters as a Prefect task."""

from __future__ import annotations

from cbir.steps.pairs import PairsSummary, run_pairs

from .common import log_lines, settings_for, step_task


@step_task("pairs")
def pairs_task(params_path: str, incremental: bool = False) -> PairsSummary:
    """Every near-duplicate pair (cbir.steps.pairs.run_pairs); `incremental`: only the images not
    searched yet, against the whole collection, merged into the recorded pairs."""
    summary = run_pairs(settings_for(params_path), incremental=incremental)
    log_lines(summary.lines())
    return summary
