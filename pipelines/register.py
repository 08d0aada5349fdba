"""Prefect wiring of the registry: register runs' merged per-market models, choose each market's model,
and the promotion gate."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from pipelines._policy import PERSIST, retrying


@task(name="register", **retrying())
def register_task(run_dir: str, tracking_uri: str | None = None, prefix: str = "ads-relevance",
                  baseline_run: str | None = None, markets: list[str] | None = None) -> list[dict[str, Any]]:
    from relevance.serving.registry import register

    return register(run_dir, markets, tracking_uri=tracking_uri, prefix=prefix, baseline_run=baseline_run)


@task(name="promote", **retrying())
def promote_task(data: str, tracking_uri: str | None = None, prefix: str = "ads-relevance", tolerance: float = 0.002,
                 report_dir: str | None = None, force: bool = False, reason: str | None = None) -> list[dict[str, Any]]:
    from relevance.serving.promotion import promote_all

    return promote_all(data, tracking_uri=tracking_uri, prefix=prefix, tolerance=tolerance, force=force,
                       reason=reason, report_dir=report_dir)


@task(name="select-models", **retrying())
def select_task(run_dirs: list[str], data: str, tracking_uri: str | None = None, prefix: str = "ads-relevance",
                tolerance: float = 0.002, floor: float = 0.55, report_dir: str | None = None) -> dict[str, Any]:
    """Register every run and decide each market on valid (relevance.serving.market_models)."""
    from relevance.serving.market_models import select_models

    return select_models(run_dirs, data, tracking_uri=tracking_uri, prefix=prefix, tolerance=tolerance, floor=floor,
                         report_dir=report_dir)


@flow(name="register", **PERSIST)
def register_flow(run_dir: str, data: str, tracking_uri: str | None = None, prefix: str = "ads-relevance",
                  baseline_run: str | None = None, tolerance: float = 0.002, promote: bool = True) -> dict[str, Any]:
    """Register ``run_dir``'s merged models as ``candidate``; optionally run the gate on ``data``'s valid split."""
    registered = register_task(run_dir, tracking_uri, prefix, baseline_run)
    decisions = promote_task(data, tracking_uri, prefix, tolerance) if promote else []
    return {"registered": registered, "decisions": decisions}
