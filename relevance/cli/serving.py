"""`ads-relevance register | promote | score`: the registry and scoring jobs as typer commands.

The functions are plain typer command callbacks; ``relevance.cli.app`` adds them to its app::

    app.command("register")(register_command)
    app.command("promote")(promote_command)
    app.command("score")(score_command)

Heavy modules (mlflow, torch, transformers, pyspark) are imported inside the commands, so ``--help``
stays fast. Where the registry is: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///$ADS_RELEVANCE_HOME/mlflow.db`` (``ADS_RELEVANCE_HOME`` defaults to ``./mlruns-local``).
Errors print one line naming the problem and exit with code 2.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from relevance import settings

TrackingUri = Annotated[Optional[str], typer.Option("--tracking-uri", help=settings.TRACKING_URI_HELP,
                                                    show_default=False)]
Prefix = Annotated[str, typer.Option(help="Registered model names are <prefix>-<market>.")]


class Engine(str, Enum):
    local = "local"
    spark = "spark"


def _errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException

    from relevance.serving.scoring_input import ScoringError

    return (ValueError, LookupError, FileNotFoundError, FileExistsError, ScoringError, MlflowException)


def _fail(err: BaseException) -> NoReturn:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def _markets(text: Optional[str]) -> Optional[list[str]]:
    from data_contracts.markets import parse_markets

    return None if text is None else parse_markets(text)


def _quiet_libraries() -> None:
    """No per-file progress bars from transformers / MLflow in command output."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _auc(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "  n/a "


def register_command(
    run: Annotated[Path, typer.Option(
        help="Training run directory (the --out of `train`): adapter/, run_info.json, metrics.json.")],
    markets: Annotated[Optional[str], typer.Option(
        help="Comma-separated markets to register. Default: every market of the run.")] = None,
    baseline_run: Annotated[Optional[Path], typer.Option(
        help=(
            "The shared-LoRA (method lora) run the gate compares with. Default: the run itself if it "
            "is lora, else the one lora sibling of RUN with the same data fingerprint."
        ))] = None,
    prefix: Prefix = "ads-relevance",
    tracking_uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Merge the run's adapter per market and register each as <prefix>-<market> with alias `candidate`.

    Idempotent: registering the same run again creates no new version (it re-points `candidate`).
    """
    _quiet_libraries()
    from relevance.serving.registry import register

    try:
        rows = register(run, _markets(markets), tracking_uri=tracking_uri, prefix=prefix, baseline_run=baseline_run)
    except _errors() as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'model':<28}{'version':>8}{'new':>6}{'test AUC':>10}{'baseline':>10}")
    for r in rows:
        typer.echo(f"{r['name']:<28}{r['version']:>8}{'yes' if r['created'] else 'no':>6}"
                   f"{_auc(r['test_auc']):>10}{_auc(r['baseline_auc']):>10}")


def promote_command(
    data: Annotated[Path, typer.Option(
        help="Curated dataset (ingest output): every model is scored on its current test split.")],
    market: Annotated[Optional[str], typer.Option(help="The market whose candidate to promote.")] = None,
    all_markets: Annotated[bool, typer.Option("--all", help="Every market that has a candidate.")] = False,
    tolerance: Annotated[float, typer.Option(
        help="Candidate AUC may trail the champion's by at most this much.")] = 0.002,
    force: Annotated[bool, typer.Option(
        help="Promote even if the gate refuses (needs --reason; recorded on the version).")] = False,
    reason: Annotated[Optional[str], typer.Option(help="Why --force overrides the gate.")] = None,
    report_dir: Annotated[Optional[Path], typer.Option(
        help=(
            "Where decision JSONs go. Default: $ADS_RELEVANCE_HOME/promotions "
            "(./mlruns-local/promotions)."
        ))] = None,
    prefix: Prefix = "ads-relevance",
    tracking_uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decisions as JSON.")] = False,
) -> None:
    """Promotion gate: `candidate` becomes `champion` only if, on the current test data, its AUC is
    >= the champion's - tolerance and >= the shared-LoRA baseline's (the first model of a market needs
    only the baseline check). Decisions and reasons go to version tags and a JSON file.
    """
    _quiet_libraries()
    from relevance.serving.promotion import promote, promote_all

    if all_markets == (market is not None):
        _fail(ValueError("pass exactly one of --market M or --all"))
    options = {"tracking_uri": tracking_uri, "prefix": prefix, "tolerance": tolerance, "force": force,
               "reason": reason, "report_dir": report_dir}
    try:
        decisions = promote_all(data, **options) if all_markets else [promote(market, data, **options)]  # type: ignore[arg-type]
    except _errors() as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(decisions, indent=2, default=str))
        return
    for d in decisions:
        auc = {k: _auc((d["auc"].get(k) or {}).get("auc")) for k in ("candidate", "champion", "baseline")}
        typer.echo(f"{d['name']}: v{d['candidate_version']} {d['decision'].upper()} (candidate {auc['candidate']}, "
                   f"champion {auc['champion']}, baseline {auc['baseline']})")
        for r in d["reasons"]:
            typer.echo(f"  - {r}")
        typer.echo(f"  decision: {d['report']}")


def score_command(
    input: Annotated[str, typer.Option(
        "--input", help=(
            "Scoring input: Parquet under market=xx/ (the query–ad contract, label not needed); a "
            "local path or a pyarrow URI (s3://…)."
        ))],
    output: Annotated[Path, typer.Option(
        "--output", help=(
            "Output directory (local): market=xx/part-*.parquet, _quarantine/, _scoring_summary.json; "
            "replaced atomically on success."
        ))],
    alias: Annotated[str, typer.Option(help="Registry alias to score with.")] = "champion",
    markets: Annotated[Optional[str], typer.Option(
        help="Comma-separated markets to score; rows of other markets are left out. Default: all.")] = None,
    engine: Annotated[Engine, typer.Option(
        help="local: streaming in this process; spark: mlflow spark_udf per market.")] = Engine.local,
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted local job: finished input files are kept, the rest redone.")] = False,
    skip_unknown: Annotated[bool, typer.Option(
        help="Quarantine rows of markets without a model instead of failing.")] = False,
    spark_master: Annotated[str, typer.Option(help="Spark master for --engine spark.")] = "local[2]",
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 64,
    window: Annotated[int, typer.Option(
        help="Rows per streamed record batch (memory bound; length sorting happens within it).")] = 4096,
    bf16: Annotated[bool, typer.Option(
        help=(
            "bfloat16 autocast: 1.56x the fp32 rate on this 2-core bf16 CPU (MiniLM-L6); score "
            "correlation 0.99994, max |diff| 3e-4, AUC within 4e-4 (benchmarks/scoring_speed.py)."
        ))] = False,
    prefix: Prefix = "ads-relevance",
    tracking_uri: TrackingUri = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Score every valid query–ad row with its market's <prefix>-<market>@<alias> model; bad rows are quarantined."""
    _quiet_libraries()
    from relevance.serving.scoring import score_dataset

    try:
        summary = score_dataset(input, output, engine=engine.value, tracking_uri=tracking_uri, alias=alias,
                                markets=_markets(markets), resume=resume, skip_unknown=skip_unknown, prefix=prefix,
                                batch_size=batch_size, window=window, bf16=bf16, spark_master=spark_master,
                                progress=not quiet)
    except _errors() as err:
        _fail(err)
    typer.echo(f"{'market':<10}{'rows_in':>10}{'scored':>10}{'quarantined':>13}  model")
    for m, v in summary["markets"].items():
        model = summary["models"].get(m)
        label = f"{model['name']} v{model['version']}" if model else "-"
        typer.echo(f"{m:<10}{v['rows_in']:>10,}{v['scored']:>10,}{sum(v['quarantined'].values()):>13,}  {label}")
    t = summary["totals"]
    typer.echo(f"{'TOTAL':<10}{t['rows_in']:>10,}{t['scored']:>10,}{t['quarantined']:>13,}")
    typer.echo(f"\nscores: {summary['output']}")
