"""The ``add-market`` flow: launch new markets on a trained run without retraining or touching the others.

ingest the new markets' raw data → add-market (train only their parameters) → evaluate → register and
gate those markets only. Wiring only: the work lives in :mod:`relevance.training.add_market` and
:mod:`relevance.serving.market_models`. Existing markets keep their registered models bit for bit: the
grown run registers only ``run_info["added_markets"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State
from pydantic import BaseModel, Field

from pipelines._policy import PERSIST, retrying
from pipelines.evaluate import evaluate_runs
from pipelines.ingest import run_ingest
from pipelines.register import select_task
from relevance.pipeline_plan import gate_markdown, unserved_markets


class AddMarketParams(BaseModel):
    """Parameters of ``add-market`` (the Prefect UI renders this as a form)."""

    raw: str = Field(description="Raw query–ad Parquet of the new market(s) (market=xx/ partitions)")
    workdir: str = Field(description="Work directory: dataset/ and the grown run go under add-market/<codes>/")
    from_run: str = Field(description="Trained mtl-lora, per-market-lora or moelora run directory to grow")
    markets: list[str] = Field(description="New market codes, e.g. ['it']")
    head: bool = Field(default=False, description="Also train per-market copies of the head (modules_to_save)")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps (default: the run's own)")
    batch_size: int | None = Field(default=None, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    eval_every: int | None = Field(default=None, ge=1)
    seed: int = 0
    split: str = Field(default="0.8,0.1,0.1", description="train,valid,test fractions of the new data")
    n_boot: int = Field(default=1000, ge=100)
    tracking_uri: str | None = Field(default=None, description="MLflow URI (default: SQLite in workdir)")
    prefix: str = Field(default="ads-relevance", description="Registered model names: <prefix>-<market>")
    tolerance: float = Field(default=0.002, ge=0)
    floor: float = Field(default=0.55, ge=0, lt=1, description="Sanity floor of the gate; 0 switches it off")


@task(name="add-market", task_run_name="add-market-{markets}", **retrying())
def add_market_task(from_run: str, data: str, markets: list[str], out: str, head: bool,
                    options: dict[str, Any]) -> dict[str, Any]:
    """Grow ``from_run`` by ``markets``; a retried task resumes from the grown run's last checkpoint."""
    from relevance.training.add_market import add_markets

    result = add_markets(from_run, data, markets, out, head=head, **{**options, "resume": True, "progress": False})
    return {**result.run_info, "run_dir": str(result.run_dir)}


@flow(name="add-market", **PERSIST)
def add_market_flow(params: AddMarketParams) -> dict[str, Any] | State:
    """Ingest the new markets' data, add them to ``from_run``, evaluate, register and gate only them.

    Ends Failed with message ``Partial: …`` (result attached) when an added market is left without a model."""
    from data_contracts.markets import validate_market
    from relevance import settings

    codes = [validate_market(m) for m in params.markets]  # before any code touches a path
    work = Path(params.workdir).absolute() / "add-market" / "-".join(codes)
    uri = settings.tracking_uri(params.tracking_uri, Path(params.workdir).absolute())
    dataset, run_dir = work / "dataset", work / "run"
    summary = run_ingest(params.raw, str(dataset), params.split, params.seed)
    options = {"max_steps": params.max_steps, "batch_size": params.batch_size, "learning_rate": params.learning_rate,
               "eval_every": params.eval_every, "seed": params.seed, "tracking_uri": uri}
    info = add_market_task(params.from_run, str(dataset), codes, str(run_dir), params.head, options)
    metrics = evaluate_runs([info["run_dir"]], params.n_boot, params.seed)
    shipped = select_task([info["run_dir"]], str(dataset), uri, params.prefix, params.tolerance, params.floor,
                          str(work / "gate"))
    registered, decisions = shipped["registered"], shipped["decisions"]
    create_markdown_artifact(
        key="add-market-decisions",
        markdown=gate_markdown(decisions, registered, None, uri, {info["method"]: info.get("mlflow_run_id")}),
        description=f"Added markets {codes} to {params.from_run}: their models and gate decisions",
    )
    result = {"ingest": summary, "run_dir": info["run_dir"], "added_markets": info["added_markets"],
              "metrics": metrics, "registered": registered, "decisions": decisions,
              "unserved": unserved_markets(decisions), "tracking_uri": uri}
    dark = result["unserved"]
    return Failed(message=f"Partial: added markets without a model: {dark}", data=result) if dark else result
