"""``ads-relevance add-market``: launch a market on a trained run (relevance.training.add_market).

The other markets are not retrained and not moved: only the new markets' own adapter parameters
(and, with ``--head``, their copies of the head) train, so every existing market's merged model stays
bit-identical and ``register`` of the new run registers only the added markets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from relevance import settings
from relevance.cli.common import Precision, name_list

_OPT = "Training (default: the --from run's value)"
_RUN = "Runtime and tracking"


def add_market_command(
    from_run: Annotated[Path, typer.Option("--from", help="Training run directory to grow (the --out of `train` or `add-market`; not a merged model).")],
    data: Annotated[Path, typer.Option(help="Curated dataset (`ads-relevance ingest` output) with the new markets' train and valid rows; every market's valid and test rows are predicted.")],
    market: Annotated[str, typer.Option(help="Comma-separated new market code(s), not yet in the run.")],
    out: Annotated[Path, typer.Option(help="New run directory to create (must be new or empty), or to continue with --resume.")],
    head: Annotated[bool, typer.Option("--head", help="Also give each new market its own copy of the classification head, trained with it (the shared head stays frozen).")] = False,
    base_model: Annotated[Optional[str], typer.Option(help="Base encoder; must be the one the --from run was trained on (default: the recorded one).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", "--steps", help="Total optimizer steps.", rich_help_panel=_OPT)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs over the new markets' train rows (ignored with --max-steps).", rich_help_panel=_OPT)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per step.", rich_help_panel=_OPT)] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", "--learning-rate", help="Peak AdamW learning rate.", rich_help_panel=_OPT)] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Max tokens per (query, ad) pair (scoring uses it for every market of the new run).", rich_help_panel=_OPT)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation, sampling and dropout.", rich_help_panel=_OPT)] = None,
    precision: Annotated[Optional[Precision], typer.Option(help="auto: bf16 autocast where the hardware computes bf16 natively (CUDA; CPUs with AMX, AMD CPUs with AVX512-BF16), fp32 elsewhere.", rich_help_panel=_OPT)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate the new markets' valid AUC every K steps (and at the end).", rich_help_panel=_OPT)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every K steps (default: --eval-every).", rich_help_panel=_OPT)] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many evaluations without improvement.", rich_help_panel=_OPT)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint (same settings required).", rich_help_panel=_RUN)] = False,
    device: Annotated[Optional[str], typer.Option(help="torch device (default: cuda when available, else cpu).", rich_help_panel=_RUN)] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help=settings.TRACKING_URI_HELP, rich_help_panel=_RUN)] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.", rich_help_panel=_RUN)] = "ads-relevance",
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name (default: the --out directory's name).", rich_help_panel=_RUN)] = None,
    track: Annotated[bool, typer.Option(help="Log to MLflow.", rich_help_panel=_RUN)] = True,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.", rich_help_panel=_RUN)] = True,
) -> None:
    """Add market(s) to a trained mtl-lora, per-market-lora or moelora run, training only theirs.

    OUT is a complete run directory (adapter/, run_info.json with added_markets and from_run,
    train_config.json, predictions/ of every market, checkpoints/) that evaluate, report and register
    accept; register registers only the added markets unless --markets says otherwise.
    """
    from relevance.training.add_market import add_markets

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = add_markets(
            str(from_run), str(data), name_list(market) or (), str(out), head=head, base_model=base_model,
            max_steps=max_steps, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            max_length=max_length, seed=seed, precision=precision.value if precision else None,
            eval_every=eval_every, checkpoint_every=checkpoint_every, patience=patience, resume=resume,
            device=device, tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, track=track,
            progress=progress,
        )
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    info = result.run_info
    typer.echo(f"run: {result.run_dir}  (added {','.join(info['added_markets'])} to {info['from_run']}, best step "
               f"{info['best_step']}, {info['trainable_params']:,} trainable params)")
    typer.echo(json.dumps(info, indent=2))
