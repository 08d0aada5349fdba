"""The end-to-end pipeline: ingest → train MTL-LoRA and the baselines on the same data and budget →
evaluate → register every method and choose each market's model on valid (gate included) → report →
optionally score. Wiring only: every decision lives in ``relevance/`` (see :mod:`relevance.pipeline_plan`
and :mod:`relevance.serving.market_models`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State
from pydantic import BaseModel, Field

from pipelines._policy import PERSIST
from pipelines.evaluate import evaluate_runs, report_task
from pipelines.ingest import run_ingest
from pipelines.register import select_task
from pipelines.score import ARTIFACT_KEY, score_task, unscored_markdown
from pipelines.train import train_task
from relevance.pipeline_plan import ALL_METHODS, gate_markdown, pipeline_problem, training_plan, unserved_markets


class PipelineParams(BaseModel):
    """Parameters of ``relevance-pipeline`` (the Prefect UI renders this as a form)."""

    raw: str = Field(description="Raw query–ad Parquet (market=xx/ partitions): local path or pyarrow URI")
    workdir: str = Field(description="Work directory: dataset/, runs/, report/, and the default MLflow store")
    base_model: str = Field(description="Encoder directory (or offline model name) to fine-tune")
    methods: list[str] = Field(default=list(ALL_METHODS), description="Methods trained under one budget")
    floor: float = Field(default=0.55, ge=0, lt=1, description="Sanity floor: a model needs valid AUC above it and "
                         "non-degenerate valid predictions; 0 switches both checks off (smoke tests)")
    max_steps: int = Field(default=150, ge=1, description="Optimizer steps per method (same for all)")
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=64, ge=8, description="Max tokens of a (query, ad) pair")
    learning_rate: float = Field(default=1e-3, gt=0)
    eval_every: int = Field(default=50, ge=1, description="Evaluate on valid every K steps (best kept)")
    head_start: int | None = Field(default=None, ge=0, description="Fit each method's classifier as a linear probe "
                                   "on this many train rows before the first step (train --head-start); off by default")
    seed: int = 0
    split: str = Field(default="0.8,0.1,0.1", description="train,valid,test fractions")
    n_boot: int = Field(default=1000, ge=100, description="Bootstrap resamples of the AUC intervals")
    tracking_uri: str | None = Field(default=None, description="MLflow URI (default: SQLite in workdir)")
    prefix: str = Field(default="ads-relevance", description="Registered model names: <prefix>-<market>")
    tolerance: float = Field(default=0.002, ge=0, description="Gate: chosen valid AUC ≥ champion's and shared LoRA's − tolerance")
    score_input: str | None = Field(default=None, description="Optional Parquet to score with the champions")
    task_runner: Literal["in-process", "dask"] = Field(default="in-process", description="Fan out training via Dask")
    dask_workers: int = Field(default=2, ge=1)


@flow(name="train-methods", **PERSIST)
def train_methods(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train every config concurrently on this flow's task runner (Dask when fanned out)."""
    return [f.result() for f in train_task.map(configs)]


def _train_all(params: PipelineParams, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if params.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(cluster_kwargs={"n_workers": params.dask_workers, "threads_per_worker": 1,
                                                "processes": True, "dashboard_address": None})
        return train_methods.with_options(task_runner=runner)(configs)
    return [train_task(c) for c in configs]


@flow(name="relevance-pipeline", **PERSIST)
def relevance_pipeline(params: PipelineParams) -> dict[str, Any] | State:
    """Ingest, train every method, evaluate, choose and gate each market's model, report, optionally score.

    Ends Failed with message ``Partial: …`` (the result still attached) when a market is left without a
    model or scoring was partial; Completed otherwise."""
    from prefect.runtime import flow_run

    from relevance import settings

    work = Path(params.workdir).absolute()
    uri = settings.tracking_uri(params.tracking_uri, work)
    dataset, report_dir = work / "dataset", work / "report"
    runs = work / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{str(flow_run.id or 'local')[:8]}"
    summary = run_ingest(params.raw, str(dataset), params.split, params.seed)

    plan = training_plan(dataset, params.base_model, runs, params.methods, tracking_uri=uri,
                         max_steps=params.max_steps, batch_size=params.batch_size, max_length=params.max_length,
                         learning_rate=params.learning_rate, eval_every=params.eval_every, seed=params.seed,
                         head_start=params.head_start)
    infos = _train_all(params, [c.to_dict() for c in plan])
    run_dirs = {i["method"]: i["run_dir"] for i in infos}
    metrics = evaluate_runs(list(run_dirs.values()), params.n_boot, params.seed)
    shipped = select_task(list(run_dirs.values()), str(dataset), uri, params.prefix, params.tolerance, params.floor,
                          str(report_dir / "gate"))
    registered, decisions = shipped["registered"], shipped["decisions"]
    report = report_task(list(run_dirs.values()), str(report_dir), params.n_boot, params.seed, decisions)
    create_markdown_artifact(
        key="gate-decisions",
        markdown=gate_markdown(decisions, registered, report["report_html"], uri,
                               {i["method"]: i.get("mlflow_run_id") for i in infos}),
        description="Model per market: chosen method, evidence, gate decisions, and where everything is",
    )
    scores = None
    if params.score_input:
        scores = score_task(params.score_input, str(work / "scores"), tracking_uri=uri, prefix=params.prefix)
        create_markdown_artifact(key=ARTIFACT_KEY, markdown=unscored_markdown(scores),
                                 description="Markets left unscored for want of a model, with row counts")
    result = {"ingest": summary, "runs": run_dirs, "metrics": metrics, "report": report, "registered": registered,
              "decisions": decisions, "unserved": unserved_markets(decisions), "scores": scores, "tracking_uri": uri}
    problem = pipeline_problem(result)
    # a market left dark must not look like a clean success (pipelines/score.py says why Failed)
    return Failed(message=f"Partial: {problem}", data=result) if problem else result
