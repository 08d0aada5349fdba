"""Where things live, resolved in one place: explicit argument, then ``ADS_RELEVANCE_*`` / standard
environment variables, then the embedded defaults (DESIGN.md §5). Nothing here runs at import time."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "ADS_RELEVANCE_HOME"
DEFAULT_HOME = "mlruns-local"
# What every command's --tracking-uri help says; it describes :func:`tracking_uri` without a workdir.
TRACKING_URI_HELP = (f"MLflow tracking/registry URI. Default: $MLFLOW_TRACKING_URI, else "
                     f"sqlite:///${HOME_ENV}/mlflow.db (${HOME_ENV} defaults to ./{DEFAULT_HOME}).")


def home(explicit: str | os.PathLike | None = None) -> Path:
    """The embedded work directory: ``explicit``, else ``$ADS_RELEVANCE_HOME``, else ``./mlruns-local``."""
    return Path(explicit or os.environ.get(HOME_ENV) or DEFAULT_HOME).absolute()


def tracking_uri(explicit: str | None = None, workdir: str | os.PathLike | None = None) -> str:
    """MLflow URI: ``explicit``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir or home>/mlflow.db``.

    A SQLite store keeps its artifacts beside it, under ``mlartifacts/`` (see :func:`artifact_location`).
    """
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{home(workdir) / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, ``mlartifacts/`` beside the database; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").absolute().as_uri()
    return None
