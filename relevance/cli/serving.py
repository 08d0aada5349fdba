"""`ads-relevance score`: batch scoring as a typer command (the registry's commands are in
``relevance.cli.registry``; both share the options and error handling defined here).

The functions are plain typer command callbacks; ``relevance.cli.app`` adds them to its app::

    app.command("score")(score_command)

Heavy modules (mlflow, torch, transformers, pyspark) are imported inside the commands, so ``--help``
stays fast. Where the registry is: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///$ADS_RELEVANCE_HOME/mlflow.db`` (``ADS_RELEVANCE_HOME`` defaults to ``./mlruns-local``).
Errors print one line naming the problem and exit with code 2.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from relevance.cli.common import Precision, Prefix, TrackingUri, cli_errors, fail, market_list, quiet_libraries

class Engine(str, Enum):
    local = "local"
    spark = "spark"



EXIT_PARTIAL = 3  # `score`: some markets had no model, the others were written; 2 stays "error, nothing written"


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
    require_all_markets: Annotated[bool, typer.Option(
        "--require-all-markets", help=(
            "Strict mode: fail (exit 2, nothing written) if any market has no model, instead of scoring "
            "the others and quarantining its rows (exit 3)."
        ))] = False,
    skip_unknown: Annotated[bool, typer.Option(
        "--skip-unknown", hidden=True,
        help="Deprecated: quarantining markets without a model is the default.")] = False,
    spark_master: Annotated[str, typer.Option(help="Spark master for --engine spark.")] = "local[2]",
    batch_size: Annotated[int, typer.Option(
        help="Pairs per forward pass at max_length; shorter pairs fill the same token budget (up to 4x the rows).")] = 64,
    window: Annotated[int, typer.Option(
        help="Rows per streamed record batch (memory bound; length sorting happens within it).")] = 4096,
    precision: Annotated[Precision, typer.Option(
        help=(
            "auto: a market scores in bf16 (weights cast, head in fp32) where the hardware computes bf16 "
            "natively and its model version's fp32/bf16 parity held at registration (|dAUC| <= 0.001), "
            "in fp32 otherwise; fp32 / bf16 force it."
        ))] = Precision.auto,
    bf16: Annotated[bool, typer.Option("--bf16", hidden=True, help="Same as --precision bf16.")] = False,
    prefix: Prefix = "ads-relevance",
    tracking_uri: TrackingUri = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Score every valid query–ad row with its market's <prefix>-<market>@<alias> model; bad rows are quarantined.

    A market without a model does not stop the others: its rows are quarantined (rule market_no_model).

    Exit status:
      0  complete: every market scored
      2  error: nothing written
      3  partial: some markets had no model, the others were written; the
         unscored ones are named on stderr and in _scoring_summary.json
    """
    quiet_libraries()
    from relevance.serving.scoring import score_dataset

    if skip_unknown:
        if require_all_markets:
            fail(ValueError("--skip-unknown contradicts --require-all-markets: pass --require-all-markets only"))
        typer.secho("note: --skip-unknown is deprecated and now the default; drop it", err=True)
    if bf16 and precision is not Precision.auto and precision is not Precision.bf16:
        fail(ValueError(f"--bf16 contradicts --precision {precision.value}: pass --precision only"))
    try:
        summary = score_dataset(input, output, engine=engine.value, tracking_uri=tracking_uri, alias=alias,
                                markets=market_list(markets), resume=resume, require_all=require_all_markets,
                                prefix=prefix, batch_size=batch_size, window=window,
                                precision="bf16" if bf16 else precision.value,
                                spark_master=spark_master, progress=not quiet)
    except cli_errors() as err:
        fail(err)
    _print_scoring_summary(summary)
    if summary["status"] != "complete":
        from relevance.serving.scoring_job import describe_unscored

        typer.secho(f"\nPARTIAL: {describe_unscored(summary)}", err=True, fg=typer.colors.YELLOW, bold=True)
        raise typer.Exit(code=EXIT_PARTIAL)


def _print_scoring_summary(summary: dict) -> None:
    """The per-market table of a finished job; a market without a model says so in the model column."""
    typer.echo(f"{'market':<10}{'rows_in':>10}{'scored':>10}{'quarantined':>13}  model")
    for m, v in summary["markets"].items():
        model = summary["models"].get(m)
        used = (summary.get("precision") or {}).get(m)
        label = f"{model['name']} v{model['version']}" + (f" ({used})" if used else "") if model else "-"
        if m in summary["unscored_markets"]:
            label = f"NOT SCORED: no {summary['prefix']}-{m}@{summary['alias']}"
        typer.echo(f"{m:<10}{v['rows_in']:>10,}{v['scored']:>10,}{sum(v['quarantined'].values()):>13,}  {label}")
    t = summary["totals"]
    typer.echo(f"{'TOTAL':<10}{t['rows_in']:>10,}{t['scored']:>10,}{t['quarantined']:>13,}")
    timings = summary.get("timings_s")  # the local engine's; Spark has none
    if timings:
        typer.echo(f"\ntime: {timings['total']:.1f} s = registry and models {timings['registry_and_models']:.1f} s"
                   f" + scoring {timings['scoring']:.1f} s + read, check, write {timings['read_check_write']:.1f} s")
    typer.echo(f"\nscores: {summary['output']}")
