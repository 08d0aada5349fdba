"""Prefect wiring of evaluation and the report: per-market AUC per run, the HTML/MD/PNG report, and a
table artifact of AUC per market and method with deltas vs shared LoRA."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from pipelines._policy import PERSIST, retrying
from relevance.pipeline_plan import BASELINE_METHOD, auc_rows


@task(name="evaluate", task_run_name="evaluate-{run_dir}", **retrying())
def evaluate_task(run_dir: str, split: str = "test", n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    from relevance.evaluation.metrics import evaluate_run

    return evaluate_run(run_dir, n_boot=n_boot, seed=seed, split=split)


@task(name="report", **retrying())
def report_task(run_dirs: list[str], out_dir: str, n_boot: int = 1000, seed: int = 0,
                choices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from relevance.evaluation.report import build_report

    info = build_report(run_dirs, out_dir, baseline_method=BASELINE_METHOD, n_boot=n_boot, seed=seed,
                        choices=choices)
    return {k: info[k] for k in ("report_md", "report_html", "png", "significant", "holm_significant", "notes")}


def publish_auc_table(metrics: list[dict[str, Any]]) -> list[dict[str, str]]:
    rows = auc_rows({m["method"]: m for m in metrics})
    create_table_artifact(key="per-market-auc", table=rows,
                          description=f"Test ROC-AUC per market and method [95% bootstrap interval]; Δ vs {BASELINE_METHOD}.")
    return rows


def evaluate_runs(run_dirs: list[str], n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per-market test AUC of every run (``RUN/metrics.json``), published as the ``per-market-auc`` table."""
    metrics = [evaluate_task(r, n_boot=n_boot, seed=seed) for r in run_dirs]
    publish_auc_table(metrics)
    return metrics


def run_evaluation(run_dirs: list[str], report_dir: str, n_boot: int = 1000, seed: int = 0,
                   choices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    metrics = evaluate_runs(run_dirs, n_boot, seed)
    report = report_task(run_dirs, report_dir, n_boot=n_boot, seed=seed, choices=choices)
    return {"metrics": metrics, "report": report, "table": auc_rows({m["method"]: m for m in metrics})}


@flow(name="evaluate", **PERSIST)
def evaluate_flow(run_dirs: list[str], report_dir: str, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-market test AUC with bootstrap intervals for each run, and the comparison report."""
    return run_evaluation(run_dirs, report_dir, n_boot, seed)
