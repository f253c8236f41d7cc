"""The full build as one Prefect flow: ingest -> train -> embed -> index -> pairs -> evaluate
(when data.ground_truth is set) -> report, then the outputs recorded with DVC.

Each step is a task from `tasks/` calling the same library function as its `cbir` subcommand
and its dvc.yaml stage; every step resumes from what is already on disk (the manifest's journal,
the training checkpoint, whole embedding shards), so rerunning a failed build redoes only what
is missing. Run it with `cbir build`.
"""

from __future__ import annotations

import sys
from typing import TypeVar

from prefect import flow

from flows.common import FlowResult, flow_lock, summary_artifact
from flows.embed import run_embed
from tasks.common import configured, settings_for
from tasks.dvc import dvc_commit_task
from tasks.evaluate import evaluate_task
from tasks.index import index_task
from tasks.ingest import ingest_task
from tasks.pairs import pairs_task
from tasks.report import report_task
from tasks.train import train_task

T = TypeVar("T")


@flow(name="cbir-build")
def build(
    params_path: str = "params.yaml",
    train: bool = True,
    rebuild_index: bool = False,
    accept_missing: bool = False,
) -> FlowResult:
    """Every pipeline step, in order. `train=False` embeds with the existing checkpoint (or
    the initial weights); `rebuild_index` retrains the FAISS index from scratch."""
    settings = settings_for(params_path)

    def step(task: T) -> T:  # the task, with the retries of params.yaml
        return configured(task, settings)

    out = FlowResult()
    with flow_lock(settings, "cbir-build"):
        out.steps["ingest"] = step(ingest_task)(params_path, accept_missing)
        if train:
            out.steps["train"] = step(train_task)(params_path)
        out.steps["embed"] = run_embed(params_path)
        out.steps["index"] = step(index_task)(params_path, rebuild=rebuild_index)
        out.steps["pairs"] = step(pairs_task)(params_path)
        if settings.data.ground_truth is not None:
            out.steps["evaluate"] = step(evaluate_task)(params_path)
        out.steps["report"] = step(report_task)(params_path)
        if settings.orchestration.dvc_commit:
            out.steps["dvc"] = step(dvc_commit_task)(params_path)
    evaluation = out.steps.get("evaluate")
    summary_artifact(
        "cbir-build-summary",
        "cbir build",
        [(name, s.lines()) for name, s in out.steps.items()],
        extra=f"## Metrics\n\n{evaluation.table}" if evaluation else "",
    )
    return out


if __name__ == "__main__":  # the same as `cbir build` (with its temporary Prefect server)
    from cbir.cli import main

    sys.exit(main(["build", *sys.argv[1:]]))
