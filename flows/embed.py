"""Embedding as a (sub)flow: plan the shards, then one mapped task per shard.

With orchestration.dask_address the shards run on that Dask cluster (prefect-dask's
DaskTaskRunner), otherwise in the calling flow's process. A shard already written is never
planned again, so a rerun after a failure embeds only what is still missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefect import flow, unmapped
from prefect.futures import wait

from cbir.embed import EmbedSummary
from flows.common import shard_runner
from tasks.common import configured, log_lines, settings_for
from tasks.embed import ShardResult, embed_shard_task, plan_embed_task


@dataclass
class EmbedRun:
    summary: EmbedSummary
    shards: list[ShardResult] = field(default_factory=list)

    def lines(self) -> list[str]:
        return self.summary.lines()


@flow(name="cbir-embed")
def embed(params_path: str = "params.yaml") -> EmbedRun:
    """Embed every canonical image that has no embedding for the current model."""
    t0 = time.perf_counter()
    settings = settings_for(params_path)
    plan = configured(plan_embed_task, settings)(params_path)
    futures = configured(embed_shard_task, settings).map(
        unmapped(params_path), unmapped(plan.fingerprint), plan.shards)
    wait(futures)  # every shard finishes (and is kept) before a failed one fails the flow
    results = [f.result() for f in futures]
    summary = EmbedSummary(fingerprint=plan.fingerprint, source=plan.source, folder=plan.folder,
                           embedded=sum(r.embedded for r in results), already=plan.already,
                           shards=len(results), failed=[x for r in results for x in r.failed],
                           seconds=time.perf_counter() - t0)
    log_lines(summary.lines())
    return EmbedRun(summary=summary, shards=results)


def run_embed(params_path: str) -> EmbedRun:
    """The embed subflow on the task runner the params ask for (see flows/common.py)."""
    return embed.with_options(task_runner=shard_runner(settings_for(params_path)))(params_path)
