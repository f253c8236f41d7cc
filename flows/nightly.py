"""Nightly re-indexing: the scans that arrived since the last run, and nothing else.

ingest (only new files are decoded) -> embed (only images without an embedding) -> index (new
vectors added; rebuilt only past index.rebuild_factor) -> pairs of the new images against the
whole collection, merged into the recorded ones -> the report of the new pairs -> `dvc commit`
(and `dvc push`), so `dvc status` is clean afterwards. Its cost follows the new scans; the
evaluation and the review gallery, whose cost follows the collection, are left to the build
unless orchestration.nightly_evaluate / nightly_gallery ask for them. The model is not
retrained: that is the build flow (`cbir build`) or `dvc repro`.

`cbir nightly` runs it once; `cbir serve` serves it on orchestration.nightly_cron.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow

from cbir import faults
from cbir.errors import CbirError
from cbir.store.layout import layout
from flows.common import FlowResult, flow_lock, summary_artifact
from flows.embed import run_embed
from tasks.common import configured, settings_for
from tasks.dvc import dvc_commit_task
from tasks.evaluate import evaluate_task
from tasks.index import index_task
from tasks.ingest import ingest_task
from tasks.pairs import pairs_task
from tasks.report import new_pairs_task, nightly_begin_task, report_task

T = TypeVar("T")

DEPLOYMENT = "cbir-nightly"


@flow(name="cbir-nightly")
def nightly(params_path: str = "params.yaml", accept_missing: bool = False) -> FlowResult:
    """Re-index the scans that arrived since the last run (see the module docstring).
    `accept_missing`: record scans gone as missing even where most of them are gone."""
    settings = settings_for(params_path)

    def step(task: T) -> T:  # the task, with the retries of params.yaml
        return configured(task, settings)

    out = FlowResult()
    with flow_lock(settings, "cbir-nightly"):
        since = step(nightly_begin_task)(params_path)
        faults.point("nightly.begun")
        ingest = out.steps["ingest"] = step(ingest_task)(params_path, accept_missing)
        out.steps["embed"] = run_embed(params_path)
        out.steps["index"] = step(index_task)(params_path)
        out.steps["pairs"] = step(pairs_task)(params_path, incremental=True)
        o = settings.orchestration
        if settings.data.ground_truth is not None and o.nightly_evaluate:
            out.steps["evaluate"] = step(evaluate_task)(params_path)
        if o.nightly_gallery:
            out.steps["report"] = step(report_task)(params_path)
        new = out.steps["new pairs"] = step(new_pairs_task)(params_path, ingest.run_id, since)
        if o.dvc_commit:
            out.steps["dvc"] = step(dvc_commit_task)(params_path)
    summary_artifact(
        "cbir-nightly-summary",
        f"cbir nightly, ingest run {ingest.run_id}",
        [(name, s.lines()) for name, s in out.steps.items()],
        extra=new.markdown(),
    )
    return out


def deployment(params_path: str = "params.yaml", name: str = DEPLOYMENT) -> Any:
    """The nightly flow as a deployment: cron orchestration.nightly_cron in
    orchestration.timezone, this params file, at most one run at a time."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    settings = settings_for(params_path)
    o = settings.orchestration
    try:
        ZoneInfo(o.timezone)
        schedule = Cron(o.nightly_cron, timezone=o.timezone)
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise CbirError(
            f"{settings.params_path}: orchestration.nightly_cron / timezone: {exc}"
        ) from None
    return nightly.to_deployment(
        name=name,
        schedule=schedule,
        concurrency_limit=1,
        parameters={"params_path": str(Path(settings.params_path).resolve())},
        description=f"cbir nightly re-indexing of {layout(settings).scans}",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(params_path: str = "params.yaml", name: str = DEPLOYMENT) -> None:
    """Serve the nightly deployment (blocks): one long-running process registers it with the
    configured Prefect API (flows/server.py `served_api`) and starts each scheduled run in a
    subprocess; no work pool or worker."""
    import prefect

    from flows.server import served_api

    url = served_api()
    dep = deployment(params_path, name)
    o = settings_for(params_path).orchestration
    print(
        f"serving the nightly flow of {params_path} with the Prefect API at {url}: "
        f"{o.nightly_cron} ({o.timezone}); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    prefect.serve(dep)


if __name__ == "__main__":  # the same as `cbir nightly` (with its temporary Prefect server)
    from cbir.cli import main

    sys.exit(main(["nightly", *sys.argv[1:]]))
