"""The embed step of the flows: plan the shards, then one mapped task per shard.

The shard tasks run on the task runner that orchestration.dask_address asks for (flows/common.py
`shard_runner`): a Dask cluster through prefect-dask's DaskTaskRunner, or one after the other in
the flow's process. They are task runs of the calling flow run either way. A shard already
written is never planned again, so a rerun after a failure embeds only what is still missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prefect import unmapped
from prefect.futures import wait

from cbir.steps.embed import EmbedSummary
from flows.common import shard_runner
from tasks.common import configured, log_lines, settings_for
from tasks.embed import ShardResult, embed_shard_task, plan_embed_task, vector_file_task


@dataclass
class EmbedRun:
    summary: EmbedSummary
    shards: list[ShardResult] = field(default_factory=list)

    def lines(self) -> list[str]:
        return self.summary.lines()


def run_embed(params_path: str) -> EmbedRun:
    """Embed every canonical image that has no embedding for the current model (in a flow)."""
    t0 = time.perf_counter()
    settings = settings_for(params_path)
    plan = configured(plan_embed_task, settings)(params_path)
    results: list[ShardResult] = []
    if plan.shards:
        with shard_runner(settings) as runner:
            futures = runner.map(
                configured(embed_shard_task, settings),
                parameters={
                    "params_path": unmapped(params_path),
                    "fingerprint": unmapped(plan.fingerprint),
                    "shard": plan.shards,
                },
            )
            wait(futures)  # every shard finishes (and is kept) before a failed one fails the run
            # prefect's TaskRunner.map says PrefectFutureList[F]: a list of futures of futures
            results = [f.result() for f in futures]  # type: ignore[misc]  # prefect's annotation
    vectors = configured(vector_file_task, settings)(str(plan.folder))
    summary = EmbedSummary(
        fingerprint=plan.fingerprint,
        source=plan.source,
        folder=plan.folder,
        embedded=sum(r.embedded for r in results),
        already=plan.already,
        shards=len(results),
        failed=[x for r in results for x in r.failed],
        seconds=time.perf_counter() - t0,
        vectors_written=vectors,
    )
    log_lines(summary.lines())
    return EmbedRun(summary=summary, shards=results)
