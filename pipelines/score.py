"""Prefect wiring of batch scoring with the champions (the ``score/daily`` deployment).

A market without a champion no longer fails the run: the others are scored, its rows quarantined
(``market_no_model``), and the run says so: an ``unscored-markets`` artifact and a Failed end state
whose message names the markets (:func:`score_flow` says why Failed).
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State

from pipelines._policy import PERSIST, retrying
from relevance.serving.scoring_job import describe_unscored, summary_markets

ARTIFACT_KEY = "unscored-markets"


@task(name="score", **retrying())
def score_task(input: str, output: str, alias: str = "champion", engine: str = "local",
               tracking_uri: str | None = None, markets: list[str] | None = None, prefix: str = "ads-relevance",
               require_all: bool = False, skip_unknown: bool | None = None,
               precision: str = "auto") -> dict[str, Any]:
    """Score with ``--resume`` semantics: a retry continues where the failed attempt stopped.

    Returns the summary whatever its ``status`` (the pipeline embeds it); a partial job is a
    completed task, the flow decides how its run ends. ``skip_unknown`` is the deprecated opposite
    of ``require_all``, kept so older callers still run.
    """
    from relevance.serving.scoring import score_dataset

    options: dict[str, Any] = {} if skip_unknown is None else {"skip_unknown": skip_unknown}
    if require_all or skip_unknown is None:  # an explicit require_all=True is checked against skip_unknown
        options["require_all"] = require_all
    return score_dataset(input, output, engine=engine, tracking_uri=tracking_uri, alias=alias, markets=markets,
                         prefix=prefix, resume=True, precision=precision, **options)


def unscored_markdown(summary: dict[str, Any]) -> str:
    """The ``unscored-markets`` artifact: which markets went unscored, how many rows, what to promote."""
    markets, unscored = summary_markets(summary), summary["unscored_markets"]
    if not unscored:
        return (f"## Scoring complete: all {len(markets)} market(s) scored\n\n{summary['totals']['scored']:,} "
                f"rows scored with `@{summary['alias']}`; output `{summary['output']}`.\n")
    lines = [f"## Scoring partial: {len(unscored)} of {len(markets)} market(s) had no model", "",
             f"Their rows were quarantined under `{summary['output']}/_quarantine/` (rule `market_no_model`), "
             "not scored. Register and promote a model for each, then rescore; or leave them out with `markets`.", "",
             "| market | rows not scored | model looked for |", "| --- | ---: | --- |"]
    prefix, alias = summary["prefix"], summary["alias"]
    lines += [f"| {m} | {n:,} | `models:/{prefix}-{m}@{alias}` |" for m, n in sorted(unscored.items())]
    counts = summary["markets"]
    scored = ", ".join(f"{m} ({counts[m]['scored']:,} rows)" for m in markets if counts[m]["scored"]) or "none"
    return "\n".join([*lines, "", f"Scored: {scored}."]) + "\n"


@flow(name="score", **PERSIST)
def score_flow(input: str, output: str, alias: str = "champion", engine: Literal["local", "spark"] = "local",
               tracking_uri: str | None = None, markets: list[str] | None = None, prefix: str = "ads-relevance",
               require_all: bool = False, precision: Literal["auto", "fp32", "bf16"] = "auto") -> dict[str, Any] | State:
    """Score every query–ad pair of ``input`` with its market's ``models:/<prefix>-<market>@<alias>``.

    Markets without a model are quarantined and listed in the ``unscored-markets`` artifact; with
    ``require_all`` they fail the run before anything is written. ``precision``: ``auto`` scores a
    market in bf16 where the hardware has it natively and its model version's parity held (README).

    End state. Complete: Completed, returning the summary. Partial: **Failed**, message
    ``"Partial: …"`` naming the markets and rows, with the summary as its persisted result (read it
    with ``state.result(raise_on_failure=False)``; the output is written). Why Failed and not
    ``Completed(name="Partial")``: Prefect 3 judges runs by state *type*, and a Completed type of any
    name is a success to ``prefect deployment run --watch`` (exit 0, "finished successfully"), to the
    UI's colours and counts and to ``is_completed()``; the state's *name* is the event name
    (``prefect.flow-run.<name>``), so a custom name would also slip past automations watching
    ``Failed``. Failed with the default name is what Prefect itself ends a flow in when not all of
    its work completed (``return_value_to_state``'s aggregate rule). Cost: a plain in-process
    ``score_flow(...)`` call raises on that state (a ``TypeError`` quoting the summary); call it with
    ``return_state=True``. Deployment runs are unaffected: the engine exits cleanly once it has
    reported the state (checked on Prefect 3.9).
    """
    summary = score_task(input, output, alias, engine, tracking_uri, markets, prefix, require_all,
                         precision=precision)
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=unscored_markdown(summary),
                             description="Markets left unscored for want of a model, with row counts")
    if summary["status"] == "complete":
        return summary
    return Failed(message=f"Partial: {describe_unscored(summary)}", data=summary)
