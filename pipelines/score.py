"""Prefect wiring of batch scoring with the champions (the ``score/daily`` deployment)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, task

from pipelines._policy import PERSIST, retrying


@task(name="score", **retrying())
def score_task(input: str, output: str, alias: str = "champion", engine: str = "local",
               tracking_uri: str | None = None, markets: list[str] | None = None, prefix: str = "ads-relevance",
               skip_unknown: bool = False) -> dict[str, Any]:
    """Score with ``--resume`` semantics: a retry continues where the failed attempt stopped."""
    from relevance.serving.scoring import score_dataset

    return score_dataset(input, output, engine=engine, tracking_uri=tracking_uri, alias=alias, markets=markets,
                         prefix=prefix, skip_unknown=skip_unknown, resume=True)


@flow(name="score", **PERSIST)
def score_flow(input: str, output: str, alias: str = "champion", engine: Literal["local", "spark"] = "local",
               tracking_uri: str | None = None, markets: list[str] | None = None, prefix: str = "ads-relevance",
               skip_unknown: bool = False) -> dict[str, Any]:
    """Score every query–ad pair of ``input`` with its market's ``models:/<prefix>-<market>@<alias>``."""
    return score_task(input, output, alias, engine, tracking_uri, markets, prefix, skip_unknown)
