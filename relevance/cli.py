"""`ads-relevance …`: one subcommand per job. Thin: parse, call the library, print, exit non-zero on error."""

from __future__ import annotations

import json
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
    """Generate realistic multi-market query–ad data with planted relevance signals (see relevance/demo_data.py)."""
    from relevance.demo_data import write_demo_data

    try:
        manifest = write_demo_data(out, markets, rows_per_market, seed, corrupt_fraction, overwrite)
    except (ValueError, FileExistsError) as err:
        _fail(err)
    rows = {m: v["rows"] for m, v in manifest["markets"].items()}
    typer.echo(f"wrote {sum(rows.values()):,} rows to {out}: " + ", ".join(f"{m}={n:,}" for m, n in rows.items()))


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
    from relevance.ingest import IngestError, format_summary
    from relevance.ingest import ingest as run_ingest

    try:
        summary = run_ingest(raw, out, parse_fractions(split), seed, batch_size, progress=not quiet)
    except (IngestError, ValueError) as err:
        _fail(err)
    typer.echo(format_summary(summary))
    typer.echo(f"\nsummary: {out / 'ingest_summary.json'}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Work directory for the demo's data and outputs.")] = Path("demo_workdir"),
    rows_per_market: Annotated[int, typer.Option(help="Rows of the largest market.")] = 2_000,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """The main job on embedded defaults: generate demo data (with 2% bad rows), ingest it, print the summary."""
    from relevance.demo_data import write_demo_data
    from relevance.ingest import format_summary
    from relevance.ingest import ingest as run_ingest

    raw = workdir / "raw"
    write_demo_data(raw, rows_per_market=rows_per_market, seed=seed, corrupt_fraction=0.02, overwrite=True)
    typer.echo(f"demo data: {raw}")
    summary = run_ingest(str(raw), workdir / "dataset", seed=seed)
    typer.echo(format_summary(summary))
    typer.echo(f"\ncurated dataset: {workdir / 'dataset' / 'curated'}")
    typer.echo(f"quarantine:      {workdir / 'dataset' / 'quarantine'}")
    typer.echo(f"summary:         {workdir / 'dataset' / 'ingest_summary.json'}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
