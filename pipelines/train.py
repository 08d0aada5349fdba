"""Prefect wiring of training: one method per task; a retried task resumes from its last checkpoint."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from pipelines._policy import PERSIST, retrying


@task(name="train", task_run_name="train-{config[method]}", **retrying())
def train_task(config: dict[str, Any]) -> dict[str, Any]:
    """Train one method (``config`` is ``TrainConfig.to_dict()``); returns run_info plus ``run_dir``."""
    from relevance.training.loop import TrainConfig, train

    result = train(TrainConfig.from_dict({**config, "resume": True, "progress": False}))
    return {**result.run_info, "run_dir": str(result.run_dir)}


@flow(name="train", **PERSIST)
def train_flow(data: str, method: str, base_model: str, out: str, max_steps: int | None = None, epochs: int = 1,
               batch_size: int = 32, max_length: int = 128, learning_rate: float = 5e-4, eval_every: int | None = None,
               seed: int = 0, tracking_uri: str | None = None) -> dict[str, Any]:
    """Fine-tune the cross-encoder on the curated dataset ``data`` with one adapter ``method``."""
    from relevance.training.config import TrainConfig

    config = TrainConfig(data=data, method=method, base_model=base_model, out=out, max_steps=max_steps, epochs=epochs,
                         batch_size=batch_size, max_length=max_length, learning_rate=learning_rate,
                         eval_every=eval_every, seed=seed, tracking_uri=tracking_uri)
    return train_task(config.to_dict())
