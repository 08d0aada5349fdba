"""What every `ads-relevance` command group shares: the registry options, the errors a command turns
into one line and exit status 2, market lists, and quiet third-party progress bars."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, NoReturn, Optional

import typer

from relevance import settings

TrackingUri = Annotated[Optional[str], typer.Option("--tracking-uri", help=settings.TRACKING_URI_HELP,
                                                    show_default=False)]
Prefix = Annotated[str, typer.Option(help="Registered model names are <prefix>-<market>.")]


def cli_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException

    from relevance.serving.scoring_input import ScoringError

    return (ValueError, LookupError, FileNotFoundError, FileExistsError, ScoringError, MlflowException)


def fail(err: BaseException) -> NoReturn:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def market_list(text: Optional[str]) -> Optional[list[str]]:
    from data_contracts.markets import parse_markets

    return None if text is None else parse_markets(text)


def quiet_libraries() -> None:
    """No per-file progress bars from transformers / MLflow in command output."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def exit_on_sigterm() -> None:
    """Make SIGTERM exit like Ctrl-C: ``finally`` blocks and ``atexit`` handlers run.

    Why: a scheduler, a container runtime or ``kill`` stops a job with SIGTERM, whose default action
    ends Python at once. Then a scoring job's staging directory is left behind and Prefect's
    ephemeral API server (a uvicorn subprocess that Prefect stops from ``atexit``) keeps running,
    orphaned, holding its port. Exit status 143 (128 + 15), as a shell reports SIGTERM.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def name_list(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(p.strip() for p in text.split(",") if p.strip())
