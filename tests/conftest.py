"""Test-wide settings: no network, one torch thread for tiny models, shared MLflow store template."""

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine an OpenMP barrier that
    waits for a preempted thread turns every op into a scheduler quantum (suites ran 5x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fresh_store(tmp_path_factory):
    """Factory: a migrated SQLite MLflow store at ``dest``, copied from a session-wide template
    (creating the schema costs ~7 s; a server started on a copy runs no migrations)."""
    template = tmp_path_factory.getbasetemp() / "mlflow-template.db"

    def make(dest) -> str:
        from mlflow import MlflowClient

        if not template.exists():
            MlflowClient(f"sqlite:///{template}").search_experiments()
        shutil.copy(template, dest)
        return f"sqlite:///{dest}"

    return make
