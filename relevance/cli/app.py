"""`ads-relevance …`: one subcommand per job. Thin: parse, call the library, print, exit non-zero on error."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Train, evaluate, register and serve per-market query–ad relevance models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _every_command() -> None:
    from relevance.cli.common import exit_on_sigterm

    exit_on_sigterm()  # a stopped job cleans up (staging, Prefect's local API) instead of leaving orphans


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Directory to write raw Parquet into (market=xx/ partitions).")],
    markets: Annotated[str, typer.Option(help="Comma-separated market codes.")] = "us,gb,de,fr,jp",
    rows_per_market: Annotated[int, typer.Option(help="Rows of the first market; others are scaled (unequal sizes).")] = 2_000,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
    corrupt_fraction: Annotated[float, typer.Option(help="Fraction of bad rows to plant (every contract rule).")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Generate realistic multi-market query–ad data with planted relevance signals (see relevance/data/demo_data.py)."""
    from relevance.data.demo_data import write_demo_data

    try:
        manifest = write_demo_data(out, markets, rows_per_market, seed, corrupt_fraction, overwrite)
    except (ValueError, FileExistsError) as err:
        _fail(err)
    rows = {m: v["rows"] for m, v in manifest["markets"].items()}
    typer.echo(f"wrote {sum(rows.values()):,} rows to {out}: " + ", ".join(f"{m}={n:,}" for m, n in rows.items()))


@app.command("build-qa-benchmark")
def build_qa_benchmark(
    squad: Annotated[Path, typer.Option(help="SQuAD-format JSON file (XQuAD, JSQuAD, …).")],
    market: Annotated[str, typer.Option(help="Market code the rows belong to (e.g. en, de, jp).")],
    out: Annotated[Path, typer.Option(help="Raw dataset directory; rows go to OUT/market=CODE/.")],
    seed: Annotated[int, typer.Option(help="Seed of the negative sampling: same seed, same rows.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace this market's partition if it exists.")] = False,
    max_questions: Annotated[Optional[int], typer.Option(help="Keep a seeded random subset of this many questions.")] = None,
    policy: Annotated[str, typer.Option(help="What the market calls relevant: strict (own paragraph only), topical (also a same-article paragraph; local language only), exact-any (own paragraph in any language; needs --foreign-squad).")] = "strict",
    foreign_squad: Annotated[Optional[Path], typer.Option(help="Parallel SQuAD file of another language: adds per question its own paragraph in that language (a 'foreign' row, labelled by --policy).")] = None,
) -> None:
    """Turn QA data into raw query–ad rows: per question a positive, a same-article and an other-article negative
    (and a foreign-language row with --foreign-squad), labelled by the market's --policy."""
    from relevance.data.qa_benchmark import write_qa_benchmark

    try:
        info = write_qa_benchmark(squad, market, out, seed, overwrite, max_questions, policy, foreign_squad)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(err)
    typer.echo(f"{info['market']}: {info['rows']:,} rows from {info['questions']:,} questions in "
               f"{info['articles']} articles ({info['hard_negatives']:,} same-article, {info['easy_negatives']:,} "
               f"other-article, {info['foreign']:,} foreign-language rows; policy {info['policy']}: "
               f"{info['positives']:,} relevant) -> {info['path']}")


@app.command()
def ingest(
    raw: Annotated[str, typer.Option(help="Raw dataset: a local directory or a pyarrow filesystem URI (s3://…).")],
    out: Annotated[Path, typer.Option(help="Output directory (replaced atomically on success).")],
    split: Annotated[str, typer.Option(help="train,valid,test fractions.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Seed of the split hash.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Rows per streamed record batch.")] = 65_536,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Validate raw query–ad Parquet against the contract, quarantine bad rows, split by query, write curated data."""
    from data_contracts.splits import parse_fractions
    from relevance.data.ingest import IngestError, format_summary
    from relevance.data.ingest import ingest as run_ingest

    try:
        summary = run_ingest(raw, out, parse_fractions(split), seed, batch_size, progress=not quiet)
    except (IngestError, ValueError) as err:
        _fail(err)
    typer.echo(format_summary(summary))
    typer.echo(f"\nsummary: {out / 'ingest_summary.json'}")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option(help="Training run directory (holds predictions/<split>.parquet).")],
    split: Annotated[str, typer.Option(help="Split to evaluate: test or valid.")] = "test",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of the intervals.")] = 1000,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Per-market ROC-AUC and PR-AUC with 95% cluster-bootstrap intervals (over query_id); writes RUN/metrics.json."""
    from relevance.evaluation.degenerate import degenerate_markets, describe
    from relevance.evaluation.metrics import evaluate_run, metrics_path
    from relevance.evaluation.report import format_auc_table

    try:
        metrics = evaluate_run(run, n_boot=n_boot, seed=seed, split=split)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(format_auc_table({metrics["method"]: metrics}))
    for market, reasons in degenerate_markets(metrics).items():  # loud: a macro AUC can hide one dead market
        typer.secho(f"⚠ WARNING: {describe(market, reasons, split, str(run))}", fg=typer.colors.RED, bold=True)
    typer.echo(f"\nmetrics: {metrics_path(run, split)}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Option("--runs", help="Run directories to compare (repeat the option).")],
    out: Annotated[Path, typer.Option(help="Directory for report.md, report.html, auc_by_market.png.")],
    baseline: Annotated[str, typer.Option(help="Method the deltas are taken against.")] = "lora",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
) -> None:
    """Markets × methods AUC report with deltas vs shared LoRA, significance marks, cost, and a chart."""
    from relevance.evaluation.report import build_report, format_auc_table

    try:
        info = build_report(runs, out, baseline_method=baseline, n_boot=n_boot)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    typer.echo(format_auc_table(info["metrics"]))
    typer.echo(f"\nreport: {info['report_html']}\nchart:  {info['png']}")


@app.command()
def pipeline(
    demo: Annotated[bool, typer.Option("--demo", help="Generate demo data and fine-tune MiniLM-L6 (the main job).")] = False,
    raw: Annotated[Optional[str], typer.Option(help="Raw Parquet (market=xx/); generated with --demo.")] = None,
    workdir: Annotated[Path, typer.Option(help="Work directory: data, runs, report, MLflow store, Prefect home.")] = Path("demo_workdir"),
    base_model: Annotated[Optional[str], typer.Option(help="Encoder directory; --demo uses MiniLM-L6 from its PyPI package.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods, trained under one budget.")] = "mtl-lora,lora,lora-market-token,per-market-lora",
    max_steps: Annotated[int, typer.Option(help="Optimizer steps per method.")] = 150,
    rows_per_market: Annotated[int, typer.Option(help="--demo: rows of the largest market.")] = 2_000,
    task_runner: Annotated[str, typer.Option(help="in-process or dask (needs the dask extra).")] = "in-process",
    seed: Annotated[int, typer.Option()] = 0,
    head_start: Annotated[Optional[int], typer.Option(help="Before each method's first step, fit its classifier as a linear probe on this many train rows (as train --head-start). Default: off.")] = None,
) -> None:
    """Run the relevance-pipeline flow on embedded defaults: ephemeral Prefect, SQLite MLflow in --workdir."""
    workdir = workdir.absolute()
    os.environ.setdefault("PREFECT_HOME", str(workdir / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's 20 s default for starting its local API is too short on a busy 2-core laptop.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    for quiet in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "HF_HUB_DISABLE_PROGRESS_BARS"):  # keep the log readable
        os.environ.setdefault(quiet, "false" if quiet.startswith("MLFLOW") else "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # A line per evaluation of each training run, through the console handler Prefect puts on the root logger
    # (which passes WARNING and up from other loggers): minutes of training are otherwise silent.
    logging.getLogger("relevance.training.loop").setLevel(logging.INFO)
    from relevance.pipeline_plan import demo_base_model, pipeline_summary

    if demo:
        from relevance.data.demo_data import write_demo_data

        raw = raw or str(workdir / "raw")
        write_demo_data(raw, rows_per_market=rows_per_market, seed=seed, corrupt_fraction=0.02, overwrite=True)
        base_model = base_model or demo_base_model()
        typer.echo(f"demo data: {raw}\nbase model: {base_model}")
    if raw is None or base_model is None:
        _fail(ValueError("give --raw and --base-model, or --demo"))
    from pipelines.relevance_pipeline import PipelineParams, relevance_pipeline

    params = PipelineParams(raw=raw, workdir=str(workdir), base_model=base_model, methods=methods.split(","),
                            max_steps=max_steps, seed=seed, task_runner=task_runner, head_start=head_start,
                            score_input=raw if demo else None)
    state = relevance_pipeline(params, return_state=True)
    partial = state.is_failed() and (state.message or "").startswith("Partial:")
    if not state.is_completed() and not partial:
        _fail(RuntimeError(f"relevance-pipeline ended {state.name}: {state.message}"))
    typer.echo(pipeline_summary(state.result(raise_on_failure=False)))
    if partial:  # the other markets shipped and were scored; this one needs attention
        typer.secho(f"error: {state.message}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=3)


# Jobs whose code lives in their own modules (heavy imports happen inside the commands).
from relevance.cli.add_market import add_market_command  # noqa: E402
from relevance.cli.registry import promote_command, register_command, select_command  # noqa: E402
from relevance.cli.serving import score_command  # noqa: E402
from relevance.cli.train import train_command  # noqa: E402

app.command("train")(train_command)
app.command("add-market")(add_market_command)
app.command("register")(register_command)
app.command("select")(select_command)
app.command("promote")(promote_command)
app.command("score")(score_command)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
