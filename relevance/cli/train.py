"""``ads-relevance train``: fine-tune a cross-encoder with one adapter method (relevance.training.loop).

``relevance/cli/app.py`` registers :func:`train_command` as ``ads-relevance train``; for DDP this module
also runs on its own:

    python -m relevance.cli.train --data DS --method mtl-lora --base-model PATH --out RUN
    torchrun --standalone --nproc_per_node=2 -m relevance.cli.train --data DS ... --out RUN
"""

from __future__ import annotations

import json
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from relevance import settings
from relevance.cli.common import Precision, name_list

_HYPER = "Adapter"
_OPT = "Optimisation"
_EVAL = "Evaluation, checkpoints, early stopping"
_RUN = "Runtime and tracking"


class Method(str, Enum):
    mtl_lora = "mtl-lora"
    lora = "lora"
    lora_market_token = "lora-market-token"
    per_market_lora = "per-market-lora"
    multilora = "multilora"
    moelora = "moelora"
    separate = "separate"


class Sampling(str, Enum):
    proportional = "proportional"
    temperature = "temperature"


def train_command(
    data: Annotated[Path, typer.Option(help="Curated dataset: the output directory of `ads-relevance ingest` (holds curated/ and ingest_summary.json).")],
    method: Annotated[Method, typer.Option(help="mtl-lora: MTL-LoRA, per-market Λ and mixing over shared A, B_i. lora: one shared LoRA, no market input. lora-market-token: shared LoRA, query prefixed '\\[de] …'. per-market-lora: an independent LoRA per market, trained jointly under one shared head (each market's adapter sees only its share of every batch, about 1/T of the updates). separate: one model per market, its own LoRA and head, each step on one market's rows (as if fine-tuned alone; one process). multilora (baseline): MultiLoRA, n parallel LoRAs with learnable per-channel scales, no market input. moelora (baseline): MOELoRA, experts of rank r/N mixed by a per-market gate (r must be divisible by the expert count, 4 by default).")],
    base_model: Annotated[str, typer.Option(help="Base encoder: a local transformers model directory (config.json, weights, tokenizer), or a model name already in the offline cache.")],
    out: Annotated[Path, typer.Option(help="Run directory to create (must be new or empty), or to continue with --resume.")],
    markets: Annotated[Optional[str], typer.Option(help="Comma-separated market codes to train on (default: every market in the train split).")] = None,
    r: Annotated[int, typer.Option(help="LoRA rank r.", rich_help_panel=_HYPER)] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (update scaled by alpha/r).", rich_help_panel=_HYPER)] = 16.0,
    n_up: Annotated[int, typer.Option(help="MTL-LoRA: number of up-projections B_i.", rich_help_panel=_HYPER)] = 3,
    mtl_temperature: Annotated[float, typer.Option(help="MTL-LoRA: softmax temperature τ of the mixing weights.", rich_help_panel=_HYPER)] = 0.1,
    uniform_mixing_init: Annotated[Optional[bool], typer.Option("--uniform-mixing-init/--random-mixing-init", help="MTL-LoRA: start every market's mixing weights uniform (w_t = 0), or random U(±s/√n)/τ (default: the library's).", rich_help_panel=_HYPER)] = None,
    mixing_init_scale: Annotated[Optional[float], typer.Option(help="MTL-LoRA: s of the random mixing init; 1 is the reference code's (near one-hot at τ = 0.1), 0 uniform.", rich_help_panel=_HYPER)] = None,
    task_lr_scale: Annotated[Optional[float], typer.Option(help="Learning-rate multiple of each market's own adapter parameters. mtl-lora: Λ_t and w_t, which get no weight decay (default: the number of markets, at least 3). per-market-lora: A_t and B_t (default 1).", rich_help_panel=_HYPER)] = None,
    task_decay: Annotated[Optional[float], typer.Option(help="mtl-lora: after each step pull each market's Λ_t (and/or w_t, see --task-decay-only) toward --task-decay-target by this × their learning rate (default: off; 10 is the measured setting, README). per-market-lora: pull each market's departure ΔA_t, ΔB_t toward 0, i.e. toward the shared adapter (default: 200); with --no-shared-adapter each market's A_t, B_t toward their mean over markets, every market starting from one adapter (default: off; 50 is the measured setting, README).", rich_help_panel=_HYPER)] = None,
    task_decay_only: Annotated[Optional[str], typer.Option(help="lam: pull only the Λ_t (the default; the mixing stays free to specialise); mix: only the mixing logits w_t; both.", rich_help_panel=_HYPER)] = None,
    task_decay_target: Annotated[Optional[str], typer.Option(help="identity: Λ_t toward I and the mixing toward uniform (shared LoRA's point; the default); mean: toward the layer's mean over markets (per-market-lora: the only target).", rich_help_panel=_HYPER)] = None,
    b_lr_ratio: Annotated[Optional[float], typer.Option(help="LoRA+: learning-rate multiple of every adapter's up-projections B over the rest, for every method (default 12 / the number of markets, between 1 and 4; 1 is one rate for all).", rich_help_panel=_HYPER)] = None,
    shared_start: Annotated[Optional[float], typer.Option(help="per-market-lora with --no-shared-adapter only: fraction of the steps in which the markets train one shared adapter before each continues on its own copy of it (default 0: own adapters from the first step).", rich_help_panel=_HYPER)] = None,
    head_start: Annotated[Optional[int], typer.Option(help="Before the first step, fit the classifier as a linear probe (L2 logistic regression) on the frozen encoder's first-token features of this many training rows, read through the pooler as it is (linear probing, then fine-tuning; BERT-style heads; a market with its own head gets its own probe), its logits then shrunk toward their mean by 0.2 so the first steps do not swing them. Default: off.", rich_help_panel=_OPT)] = None,
    shared_adapter: Annotated[Optional[bool], typer.Option("--shared-adapter/--no-shared-adapter", help="per-market-lora only: each market's A_t, B_t is one shared adapter (trained on every row) plus the market's own departure, pulled toward 0 by --task-decay (default: on; --no-shared-adapter: the paper's independent per-market adapters).", rich_help_panel=_HYPER)] = None,
    market_prior: Annotated[Optional[bool], typer.Option("--market-prior/--no-market-prior", help="Add each market's prior log-odds (its train share of relevant rows) to its training logits, so no market fits its base rate by moving all its inputs (default: on).", rich_help_panel=_HYPER)] = None,
    multilora_n: Annotated[Optional[int], typer.Option(help="MultiLoRA: number of parallel LoRAs (default 3).", rich_help_panel=_HYPER)] = None,
    n_experts: Annotated[Optional[int], typer.Option(help="MOELoRA: experts of rank r / n (must divide r; default 4).", rich_help_panel=_HYPER)] = None,
    adapter_dropout: Annotated[float, typer.Option(help="Dropout on the adapter input.", rich_help_panel=_HYPER)] = 0.05,
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated linear layers to adapt (default: attention query,key,value,output dense).", rich_help_panel=_HYPER)] = None,
    modules_to_save: Annotated[Optional[str], typer.Option(help="Comma-separated modules trained fully (default: classifier). Add 'pooler' for a model whose pooler is untrained.", rich_help_panel=_HYPER)] = None,
    learning_rate: Annotated[float, typer.Option("--lr", "--learning-rate", help="Peak AdamW learning rate.", rich_help_panel=_OPT)] = 5e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel=_OPT)] = 0.01,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps with linear warmup, then linear decay to 0.", rich_help_panel=_OPT)] = 0.06,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm.", rich_help_panel=_OPT)] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Examples per step (per process under DDP).", rich_help_panel=_OPT)] = 32,
    epochs: Annotated[int, typer.Option(help="Epochs over the train split (ignored with --max-steps).", rich_help_panel=_OPT)] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Total optimizer steps (overrides --epochs).", rich_help_panel=_OPT)] = None,
    max_length: Annotated[int, typer.Option(help="Max tokens per (query, ad) pair; only the ad is truncated.", rich_help_panel=_OPT)] = 128,
    sampling: Annotated[Sampling, typer.Option(help="Market mix per epoch: proportional to size, or temperature p_t ∝ n_t^(1/T).", rich_help_panel=_OPT)] = Sampling.proportional,
    sampling_temperature: Annotated[float, typer.Option(help="T for --sampling temperature (larger: closer to uniform).", rich_help_panel=_OPT)] = 2.0,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, sampling and dropout.", rich_help_panel=_OPT)] = 0,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate per-market valid AUC every K steps (and at the end); the best evaluation's weights ship and the divergence guard goes back to them. Default: a quarter of the run's steps, at most 200.", rich_help_panel=_EVAL)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every K steps (default: --eval-every).", rich_help_panel=_EVAL)] = None,
    keep_checkpoints: Annotated[int, typer.Option(help="Newest checkpoints kept.", rich_help_panel=_EVAL)] = 2,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many evaluations without improvement of the mean valid AUC (default: never).", rich_help_panel=_EVAL)] = None,
    min_delta: Annotated[float, typer.Option(help="Smallest mean-AUC gain that counts as an improvement.", rich_help_panel=_EVAL)] = 0.0,
    max_rollbacks: Annotated[Optional[int], typer.Option(help="Divergence guard: when a market whose valid scores were spread at the best evaluation scores every row alike (std < 0.01), go back to the best weights with fresh AdamW moments at half the learning rate (per-market-lora, separate: only the collapsed markets' own adapters go back, at the same rate), at most this many times (default 2; 0: off, the best weights still ship).", rich_help_panel=_EVAL)] = None,
    eval_batch_size: Annotated[int, typer.Option(help="Batch size for scoring valid and test.", rich_help_panel=_EVAL)] = 128,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint (same hyper-parameters required).", rich_help_panel=_RUN)] = False,
    precision: Annotated[Precision, typer.Option(help="auto: bf16 autocast where the hardware computes bf16 natively (CUDA; CPUs with AMX, AMD CPUs with AVX512-BF16), fp32 elsewhere.", rich_help_panel=_RUN)] = Precision.auto,
    device: Annotated[Optional[str], typer.Option(help="torch device (default: cuda:LOCAL_RANK when available, else cpu).", rich_help_panel=_RUN)] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help=settings.TRACKING_URI_HELP, rich_help_panel=_RUN)] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.", rich_help_panel=_RUN)] = "ads-relevance",
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name (default: the --out directory's name).", rich_help_panel=_RUN)] = None,
    track: Annotated[bool, typer.Option(help="Log to MLflow.", rich_help_panel=_RUN)] = True,
    progress: Annotated[bool, typer.Option(help="Show the progress bar (loss, examples/s, ETA).", rich_help_panel=_RUN)] = True,
) -> None:
    """Fine-tune a cross-encoder on the curated dataset with one adapter method and write the run directory.

    RUN gets adapter/ (best weights), train_config.json, run_info.json, predictions/valid.parquet and
    predictions/test.parquet (best weights) and checkpoints/. Under torchrun it trains with DDP.
    """
    from relevance.training.loop import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = TrainConfig(
            data=str(data), method=method.value, base_model=base_model, out=str(out), markets=name_list(markets),
            r=r, alpha=alpha, n_up=n_up, mtl_temperature=mtl_temperature, adapter_dropout=adapter_dropout,
            multilora_n=multilora_n, n_experts=n_experts, uniform_mixing_init=uniform_mixing_init,
            mixing_init_scale=mixing_init_scale, task_lr_scale=task_lr_scale, task_decay=task_decay,
            task_decay_target=task_decay_target, task_decay_only=task_decay_only, b_lr_ratio=b_lr_ratio,
            shared_start=shared_start, shared_adapter=shared_adapter, market_prior=market_prior, head_start=head_start,
            target_modules=name_list(target_modules), modules_to_save=name_list(modules_to_save),
            learning_rate=learning_rate, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
            max_grad_norm=max_grad_norm, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
            max_length=max_length, sampling=sampling.value, sampling_temperature=sampling_temperature,
            eval_every=eval_every, checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
            patience=patience, min_delta=min_delta, max_rollbacks=max_rollbacks, eval_batch_size=eval_batch_size, seed=seed,
            precision=precision.value, device=device, tracking_uri=tracking_uri, experiment=experiment,
            run_name=run_name, track=track, progress=progress, resume=resume,
        )
        result = train(config)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports
    info = result.run_info
    typer.echo(f"run: {result.run_dir}  (best step {info['best_step']}, "
               f"{info['trainable_params']:,} trainable params, {info['examples_per_s']:.0f} examples/s)")
    typer.echo(json.dumps(info, indent=2))


def main() -> None:  # pragma: no cover - torchrun / python -m entry
    typer.run(train_command)


if __name__ == "__main__":  # pragma: no cover
    main()
