"""MLflow tracking for training runs, through an explicit ``MlflowClient`` (no global state).

Why a client and not ``mlflow.start_run``: the fluent API keeps a process-wide active run and
tracking URI, which leaks between runs in one process (tests, notebooks, a pipeline training four
methods). Nothing here touches MLflow at import time.

Where runs go: ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else the embedded default
``sqlite:///<RUN parent>/mlflow.db`` with artifacts under ``<RUN parent>/mlartifacts`` (DESIGN.md §5).
Per-step metrics are buffered and sent in batches: one SQLite transaction per step would cost more
than a tiny model's training step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from relevance import settings

_BATCH = 900  # MLflow accepts at most 1,000 metrics per log_batch call
logger = logging.getLogger(__name__)


def market_aucs(preds: pd.DataFrame) -> tuple[dict[str, float | None], float | None, float]:
    """(AUC per market — ``None`` for a one-class market —, their mean or ``None``, log loss)."""
    from relevance.evaluation.metrics import auc_table

    table = auc_table(preds, n_boot=1)
    p, y = preds["score"].to_numpy().clip(1e-7, 1 - 1e-7), preds["label"].to_numpy()
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {m: e["auc"] for m, e in table["markets"].items()}, table["macro"]["auc"], loss


def degenerate_flags(preds: Mapping[str, pd.DataFrame], run: str, warn: bool = True, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """``{split: {market: reasons}}`` of the degenerate markets (``{}`` per split when none), each
    logged as a WARNING naming the run, split and market when ``warn``.

    Same ``n_boot`` and seed as ``ads-relevance evaluate``'s defaults, so training and ``metrics.json``
    flag the same markets (:mod:`relevance.evaluation.degenerate` has the definition).
    """
    from relevance.evaluation.degenerate import degenerate_markets, describe
    from relevance.evaluation.metrics import auc_table

    out = {split: degenerate_markets(auc_table(p, n_boot=n_boot, seed=seed)) for split, p in preds.items()}
    for split, flagged in out.items() if warn else ():
        for market, reasons in flagged.items():
            logger.warning("%s", describe(market, reasons, split, run))
    return out


def degenerate_tags(flags: Mapping[str, Mapping[str, list[str]]]) -> dict[str, str]:
    """MLflow tags: ``degenerate.<split>`` = comma-separated markets or ``none``, and
    ``degenerate.<split>.<market>`` = its reasons."""
    tags = {f"degenerate.{split}": ",".join(sorted(flagged)) or "none" for split, flagged in flags.items()}
    tags.update({f"degenerate.{split}.{m}": "; ".join(r) for split, flagged in flags.items() for m, r in flagged.items()})
    return tags


class NullTracker:
    """Tracking switched off (``--no-track``) or a non-zero DDP rank: every call is a no-op."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    """One MLflow run: created, or re-attached when ``run_id`` is given (a resumed training)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        from mlflow import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._buffer: list[Any] = []
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=settings.artifact_location(tracking_uri))
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {})).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, "None" if v is None else str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, params=items[i: i + 90])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics of ``step`` (sent by :meth:`flush`); ``None`` values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None)
        if len(self._buffer) >= 10 * _BATCH:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:_BATCH], self._buffer[_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 90):  # MLflow accepts at most 100 tags per log_batch call
            self.client.log_batch(self.run_id, tags=items[i: i + 90])

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def log_final(tracker: NullTracker, run_dir: Path, step: int, test_aucs: Mapping[str, float | None],
              test_mean: float | None, run_info: Mapping[str, Any]) -> None:
    """Final metrics (test AUC per market, cost), the degenerate markets as tags (:func:`degenerate_tags`
    of ``run_info["degenerate"]``) and the run directory's artifacts, checkpoints excluded (they are
    large and only matter to a resume); then the run is marked FINISHED."""
    tracker.log_metrics({**{f"test_auc_{m}": v for m, v in test_aucs.items()}, "test_auc_mean": test_mean,
                         "trainable_params": run_info["trainable_params"], "train_time_s": run_info["train_time_s"],
                         "examples_per_s": run_info["examples_per_s"], "best_step": run_info["best_step"]}, step)
    tracker.flush()
    tracker.set_tags(degenerate_tags(run_info.get("degenerate") or {}))
    for name in ("adapter", "predictions"):
        tracker.log_artifacts(run_dir / name, name)
    for name in ("train_config.json", "run_info.json"):
        tracker.log_artifact(run_dir / name)
    tracker.end("FINISHED")
