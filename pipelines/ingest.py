"""Prefect wiring of ingest: raw Parquet → curated + quarantine + summary, cached by input fingerprint."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from pipelines._policy import PERSIST, retrying
from relevance.pipeline_plan import output_matches, raw_fingerprint


def _cache_key(context, parameters) -> str:
    return "ingest-" + raw_fingerprint(parameters["raw"], parameters["out"], parameters["split"], parameters["seed"])


@task(name="ingest", cache_key_fn=_cache_key, **retrying())
def ingest_task(raw: str, out: str, split: str = "0.8,0.1,0.1", seed: int = 0) -> dict:
    from data_contracts.splits import parse_fractions
    from relevance.data.ingest import ingest

    return ingest(raw, out, parse_fractions(split), seed, progress=False)


def run_ingest(raw: str, out: str, split: str = "0.8,0.1,0.1", seed: int = 0) -> dict:
    """The ingest task, cached by input fingerprint; re-run when the output no longer matches the cache."""
    summary = ingest_task(raw, out, split, seed)
    if not output_matches(out, summary):  # output deleted or overwritten since the cached run
        summary = ingest_task.with_options(refresh_cache=True)(raw, out, split, seed)
    create_table_artifact(
        key="ingest-summary",
        table=[{"market": m, "rows_in": v["rows_in"], **v["curated"], "quarantined": sum(v["quarantined"].values())}
               for m, v in summary["markets"].items()],
        description=f"Rows per market and split ({summary['contract_version']}); rows_in = curated + quarantined.",
    )
    return summary


@flow(name="ingest", **PERSIST)
def ingest_flow(raw: str, out: str, split: str = "0.8,0.1,0.1", seed: int = 0) -> dict:
    """Validate raw query–ad Parquet, quarantine bad rows, split by query, write the curated dataset."""
    return run_ingest(raw, out, split, seed)
