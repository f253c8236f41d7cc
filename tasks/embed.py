"""Embedding as Prefect tasks: one plan, then one task per shard (the unit of work).

The shard tasks are mapped; flows/embed.py runs them on the flow's machine or, with
orchestration.dask_address, on a Dask cluster. A worker needs the scans, the params file and the
data folder at the same paths (a shared file system), and cbir installed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger

from cbir.config import Settings
from cbir.errors import CbirError
from cbir.fsutil import clean_stale_tmp
from cbir.model import retrieval_model
from cbir.steps.embed import EmbedPlan, Shard, embed_shard, plan_shards, write_model_card
from cbir.store.layout import layout
from cbir.store.vectors import sync_vectors

from .common import settings_for, step_task


@dataclass
class ShardResult:
    name: str
    embedded: int
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, why)
    pid: int = 0
    host: str = ""
    worker: str | None = None  # the Dask worker's address, when one ran it


@step_task("embed-vectors")
def vector_file_task(folder: str) -> int:
    """The end of the embed step: the new shards' vectors appended to the memory-mapped vector
    file beside them (cbir.store.vectors); the rows written."""
    return sync_vectors(Path(folder))


@step_task("embed-plan")
def plan_embed_task(params_path: str) -> EmbedPlan:
    """The shards still to embed for the current model: canonical images with no embedding."""
    settings = settings_for(params_path)
    model, _, fp, source = retrieval_model(settings)
    plan = plan_shards(settings, fp, source)
    plan.folder.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(plan.folder)
    if plan.region_folder is not None and plan.region_folder.is_dir():
        clean_stale_tmp(plan.region_folder)
    write_model_card(settings, plan, model)
    todo = sum(len(s.image_ids) for s in plan.shards)
    get_run_logger().info(
        f"embed: model {fp} ({source}): {todo} images to embed in "
        f"{len(plan.shards)} shards, {plan.already} already embedded"
    )
    return plan


#: A shard of fewer batches than this decodes in the task's own process (see embed_shard_task).
SMALL_SHARD_BATCHES = 4


def _in_process(settings: Settings) -> Settings:
    return settings.model_copy(update={"embed": settings.embed.model_copy(update={"workers": 0})})


def _dask_worker() -> str | None:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None


@step_task("embed-shard", task_run_name="embed-{shard.name}")
def embed_shard_task(params_path: str, fingerprint: str, shard: Shard) -> ShardResult:
    """Embed one shard (cbir.steps.embed.embed_shard) and write it atomically; a retry redoes it."""
    settings = settings_for(params_path)
    logger = get_run_logger()
    e = settings.embed
    if e.workers and mp.current_process().daemon:
        # A daemonic process (a Dask worker by default) may not start DataLoader processes.
        settings = _in_process(settings)
        logger.info(
            "decoding in the worker's own process (daemonic worker: no DataLoader "
            "processes; set distributed.worker.daemon: false to allow them)"
        )
    elif e.workers and len(shard.image_ids) < SMALL_SHARD_BATCHES * e.batch_size:
        # Beside Prefect's threads a DataLoader process starts by forkserver and imports torch
        # (2-3 s): more than decoding a few batches costs. Same decoding, same vectors.
        settings = _in_process(settings)
    model, pp, fp, _ = retrieval_model(settings)
    if fp != fingerprint:
        raise CbirError(
            f"the model changed while embedding (planned for {fingerprint}, now "
            f"{fp}): run the flow again"
        )
    n, failed = embed_shard(settings, model, pp, layout(settings).embeddings(fp), shard)
    worker = _dask_worker()
    logger.info(
        f"{shard.name}: {n} images embedded"
        f"{f', {len(failed)} unreadable' if failed else ''}"
        f" (pid {os.getpid()}{f', Dask worker {worker}' if worker else ''})"
    )
    return ShardResult(
        name=shard.name,
        embedded=n,
        failed=failed,
        pid=os.getpid(),
        host=socket.gethostname(),
        worker=worker,
    )
