"""The end-to-end pipeline: ingest → train MTL-LoRA and the baselines on the same data and budget →
evaluate and report → register → promotion gate → optionally score. Wiring only: every decision lives
in ``relevance/`` (see :mod:`relevance.pipeline_plan`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from pipelines._policy import PERSIST
from pipelines.evaluate import run_evaluation
from pipelines.ingest import run_ingest
from pipelines.register import promote_task, register_task
from pipelines.score import score_task
from pipelines.train import train_task
from relevance.pipeline_plan import ALL_METHODS, BASELINE_METHOD, gate_markdown, training_plan


class PipelineParams(BaseModel):
    """Parameters of ``relevance-pipeline`` (the Prefect UI renders this as a form)."""

    raw: str = Field(description="Raw query–ad Parquet (market=xx/ partitions): local path or pyarrow URI")
    workdir: str = Field(description="Work directory: dataset/, runs/, report/, and the default MLflow store")
    base_model: str = Field(description="Encoder directory (or offline model name) to fine-tune")
    methods: list[str] = Field(default=list(ALL_METHODS), description="Methods trained under one budget")
    register_method: str = Field(default="mtl-lora", description="Whose merged models are registered")
    max_steps: int = Field(default=150, ge=1, description="Optimizer steps per method (same for all)")
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=64, ge=8, description="Max tokens of a (query, ad) pair")
    learning_rate: float = Field(default=1e-3, gt=0)
    eval_every: int = Field(default=50, ge=1, description="Evaluate on valid every K steps (best kept)")
    seed: int = 0
    split: str = Field(default="0.8,0.1,0.1", description="train,valid,test fractions")
    n_boot: int = Field(default=1000, ge=100, description="Bootstrap resamples of the AUC intervals")
    tracking_uri: str | None = Field(default=None, description="MLflow URI (default: SQLite in workdir)")
    prefix: str = Field(default="ads-relevance", description="Registered model names: <prefix>-<market>")
    tolerance: float = Field(default=0.002, ge=0, description="Gate: candidate AUC ≥ champion's − tolerance")
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
def relevance_pipeline(params: PipelineParams) -> dict[str, Any]:
    """Ingest, train every method, evaluate and report, register, run the promotion gate, optionally score."""
    from prefect.runtime import flow_run

    from relevance import settings

    work = Path(params.workdir).absolute()
    uri = settings.tracking_uri(params.tracking_uri, work)
    dataset, report_dir = work / "dataset", work / "report"
    runs = work / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{str(flow_run.id or 'local')[:8]}"
    summary = run_ingest(params.raw, str(dataset), params.split, params.seed)

    plan = training_plan(dataset, params.base_model, runs, params.methods, tracking_uri=uri,
                         max_steps=params.max_steps, batch_size=params.batch_size, max_length=params.max_length,
                         learning_rate=params.learning_rate, eval_every=params.eval_every, seed=params.seed)
    infos = _train_all(params, [c.to_dict() for c in plan])
    run_dirs = {i["method"]: i["run_dir"] for i in infos}
    evaluation = run_evaluation(list(run_dirs.values()), str(report_dir), params.n_boot, params.seed)

    main = run_dirs.get(params.register_method) or next(iter(run_dirs.values()))
    registered = register_task(main, uri, params.prefix, run_dirs.get(BASELINE_METHOD))
    decisions = promote_task(str(dataset), uri, params.prefix, params.tolerance, str(report_dir / "gate"))
    create_markdown_artifact(
        key="gate-decisions",
        markdown=gate_markdown(decisions, registered, evaluation["report"]["report_html"], uri,
                               {i["method"]: i.get("mlflow_run_id") for i in infos}),
        description="Promotion gate decisions and where the report, MLflow runs and model versions are",
    )
    # a market whose candidate the gate refused has no champion yet: its rows are quarantined, with why
    scores = score_task(params.score_input, str(work / "scores"), tracking_uri=uri, prefix=params.prefix,
                        skip_unknown=True) if params.score_input else None
    return {"ingest": summary, "runs": run_dirs, "metrics": evaluation["metrics"], "auc_table": evaluation["table"],
            "report": evaluation["report"], "registered": registered, "decisions": decisions, "scores": scores,
            "tracking_uri": uri}
