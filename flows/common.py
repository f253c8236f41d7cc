"""What the flows share: the writer lock (and, under it, the steps' openings of the collection),
where embedding shards run, the summary artifact."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from cbir.config import Settings
from cbir.lock import dvc_busy, writer_lock
from cbir.safetext import code_fence, md_cell, printable
from cbir.store.reuse import sharing


@dataclass
class FlowResult:
    """What a flow returns: each step's summary, in the order the steps ran."""

    steps: dict[str, Any] = field(default_factory=dict)  # step name -> its summary

    def lines(self) -> list[str]:
        return [line for summary in self.steps.values() for line in summary.lines()]


@contextlib.contextmanager
def flow_lock(settings: Settings, flow_name: str) -> Iterator[Path]:
    """Hold the data folder's writer lock for the flow run (see cbir/lock.py).

    The library steps the flow calls run in this process under the same hold. The flow also
    waits while a DVC command holds the repository lock, so it never slips in between two
    stages of a running `dvc repro`. While it holds, no other writer changes the data folder,
    so its steps share their openings of the collection (cbir.store.reuse): the pairs step
    searches the ids, vectors and index the index step opened and wrote.
    """
    logger = get_run_logger()
    command = f"Prefect flow {flow_name}" + (f" (run {flow_run.name})" if flow_run.name else "")
    with (
        writer_lock(
            settings, command, blockers=[dvc_busy(settings.root)], notify=logger.warning
        ) as path,
        sharing(),
    ):
        yield path


def shard_runner(settings: Settings) -> TaskRunner:
    """Where the embedding shards run: a Dask cluster when orchestration.dask_address is set,
    else one after the other in the flow's process (each shard already uses every core)."""
    address = settings.orchestration.dask_address
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=1)


def summary_artifact(
    key: str, title: str, sections: Sequence[tuple[str, Sequence[str]]], extra: str = ""
) -> None:
    """The run's summary as a markdown artifact: one block of summary lines per step."""
    md = [f"# {md_cell(title)}", ""]
    for name, lines in sections:
        lines = [printable(line) for line in lines]  # names may hold anything but "/"
        fence = code_fence(lines)  # longer than any backtick run in them: none closes it
        md += [f"## {md_cell(name)}", "", fence, *lines, fence, ""]
    if extra:
        md += [extra, ""]
    create_markdown_artifact(key=key, markdown="\n".join(md), description=title)
