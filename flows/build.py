"""The full build: every pipeline step, in order, as one Prefect flow."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from tasks.ingest import ingest_task


@flow(name="cbir-build")
def build(params_path: str = "params.yaml") -> dict[str, int]:
    """ingest (later: train, embed, index, pairs, evaluate, report)."""
    summary = ingest_task(params_path)
    create_markdown_artifact(
        key="cbir-build-summary",
        markdown="\n".join(["# cbir build", "", "```", *summary.lines(), "```"]),
        description="cbir build summary",
    )
    return summary.counts


if __name__ == "__main__":
    build()
