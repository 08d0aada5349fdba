"""The training loop and the run directory it produces.

``train(TrainConfig(...))`` fine-tunes a cross-encoder with one adapter method on the curated
dataset and writes the run directory that ``evaluate``, ``report`` and the registry read — keep it
exactly:

    RUN/train_config.json          this config (resume refuses a run made with other hyper-parameters)
    RUN/adapter/                   save_adapter output of the *best* evaluation's weights
    RUN/run_info.json              method, run_name, base_model, trainable_params, train_time_s,
                                   examples_per_s, mlflow_run_id, data_fingerprint, best_step,
                                   markets, task_map, degenerate ({split: {market: [reasons]}}),
                                   market_prior_offsets, prior_logit, models_to_serve,
                                   precision (what ``auto`` resolved to: bf16 or fp32),
                                   task_lr_multiplier, shared_steps (per-market-lora's shared start),
                                   task_decay, task_decay_only (MTL-LoRA's pull, as resolved),
                                   rollbacks (the divergence guard's: step, to_step, markets, lr_scale;
                                   scope "markets" when only those markets' adapters went back)
    RUN/predictions/valid.parquet  example_id, market, label, score, query_id (best weights)
    RUN/predictions/test.parquet
    RUN/checkpoints/step-NNNNNNNN/ see relevance.training.checkpoint

Methods: ``mtl-lora``; ``lora`` (one shared adapter, no market input); ``lora-market-token`` (the
same shared adapter whose query is prefixed with the market, see
:data:`relevance.model.cross_encoder.MARKET_TOKEN_FORMAT`); ``per-market-lora``; the paper's
``multilora`` and ``moelora``; ``separate`` (one model per market: ``per-market-lora`` with a head
copy per market and one-market batches, so each market trains as if alone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from data_contracts.markets import task_map as make_task_map
from relevance.training import checkpoint as ckpt
from relevance.model.cross_encoder import (
    encode_frame,
    load_cross_encoder,
    predictions_frame,
    score,
    task_ids_for,
    task_routing,
)
from relevance.data.curated import data_fingerprint, read_training_splits
from relevance.model.batching import collate
from relevance.model.cpu_dropout import cpu_dropout
from relevance.model.precision import autocast, resolve_precision
from relevance.training import divergence
from relevance.training.batches import MultiMarketSampler
from relevance.training.distributed import Dist, init_distributed
from relevance.training.optim import linear_schedule, make_optimizer
from relevance.training.task_pull import neutral_pull
from relevance.training.head_start import start_head
from relevance.training.shared_start import copy_first_state, shared_routing, shared_steps, tie_to_first
from relevance.training.priors import per_example, prior_offsets
from relevance import settings
from relevance.training.tracking import NullTracker, Tracker, degenerate_flags, log_final, market_aucs

logger = logging.getLogger(__name__)
HEAD_START_FILE = "head_start.json"  # what the head start did (training/head_start.py), read back on resume

from relevance.training.config import METHODS, PRECISIONS, RUNTIME_FIELDS, SAMPLING, TrainConfig  # noqa: F401


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank): the run directory, its run_info, the best model."""

    run_dir: Path
    run_info: dict[str, Any]
    model: torch.nn.Module


def train(config: TrainConfig, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train as ``config`` says and write the run directory (module docstring); return the result.

    ``on_step(step)`` runs after every optimizer step (tests use it to kill a run mid-way). Under
    ``torchrun`` (``WORLD_SIZE`` > 1) this is DDP — gloo on CPU, NCCL on GPU — and only rank 0 writes.
    """
    return run_training(lambda d: Run(config, d), config.device, on_step)


def run_training(make_run: Callable[[Dist], Run], device: str | None,
                 on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Join the process group, build the run with ``make_run``, fit it and always end its MLflow run.

    Shared by :func:`train` and ``relevance.training.add_market`` (a :class:`Run` subclass), so both
    get the same DDP, checkpoint, resume and tracking behaviour from one loop.
    """
    d = init_distributed(device)
    try:
        run = make_run(d)
        try:
            return run.fit(on_step)
        except BaseException as exc:  # the MLflow run must not stay RUNNING forever
            run.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    finally:
        if d.owns_group:
            torch.distributed.destroy_process_group()


class Run:
    """One training run's pieces, from setup (``__init__``) through the loop to the outputs.

    Subclasses change *what* is trained, never *how*: :meth:`record` (train_config.json),
    :meth:`read_data`, :meth:`build_model` and :meth:`run_info` are the hooks; a subclass sets its
    own attributes before calling ``super().__init__`` because the hooks run inside it.
    """

    def __init__(self, config: TrainConfig, d: Dist) -> None:
        self.config, self.d, self.out, self.main = config, d, Path(config.out), d.rank == 0
        if config.resume and config.eval_every is None:  # a run made when the default was 200 resumes so
            config = self.config = ckpt.with_saved_field(config, self.out, "eval_every")
        local = Path(config.base_model).expanduser()
        self.base_model = str(local.absolute()) if local.exists() else config.base_model  # as run_info says
        resuming = ckpt.check_run_dir(self.out, self.record(), config.resume, set(RUNTIME_FIELDS))
        train_df, self.valid_df, self.test_df, self.markets = self.read_data()
        self.eval_df = self.eval_frame()
        self.fingerprint = data_fingerprint(config.data)
        torch.manual_seed(config.seed)  # a head the base model lacks is initialised from it
        self.model, self.tok = self.build_model()
        d.barrier()  # every rank has checked the run directory before rank 0 claims it
        if self.main:
            ckpt.write_json(self.out / "train_config.json", self.record())
        self.enc = encode_frame(self.tok, train_df, config.max_length, config.market_token)
        self.labels = torch.tensor(train_df["label"].to_numpy(), dtype=torch.float32)
        self.priors, self.prior_logit = prior_offsets(train_df["market"].tolist(), train_df["label"].to_numpy(),
                                                      self.prior_reference())
        if not config.uses_market_prior:
            self.priors = dict.fromkeys(self.priors, 0.0)
        self.offsets = torch.from_numpy(per_example(train_df["market"].tolist(), self.priors))
        self.task_ids = task_ids_for(self.model, train_df["market"].tolist())
        self.sampler = MultiMarketSampler(train_df["market"].tolist(), [len(x) for x in self.enc["input_ids"]],
                                          config.batch_size, config.seed, config.temperature, rank=d.rank,
                                          world_size=d.world, single_market=config.separate)
        self.total = config.max_steps or config.epochs * self.sampler.batches_per_epoch
        self.eval_every = config.eval_interval(self.total)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # markets with rows in the batches (add_market: the added ones only, the others are frozen)
        n_markets = train_df["market"].nunique()
        self.task_lr_multiplier = config.task_lr_multiplier(n_markets)
        self.shared_steps = shared_steps(config.shared_start_fraction, self.total)
        found = ckpt.list_checkpoints(self.out) if resuming else []
        self.head_start = None
        if config.head_start and not found:
            self.head_start = self._fit_head(config.head_start)
            if self.main:  # run_info.json reports it, after a resume too
                ckpt.write_json(self.out / HEAD_START_FILE, self.head_start)
        elif config.head_start and (self.out / HEAD_START_FILE).is_file():
            self.head_start = json.loads((self.out / HEAD_START_FILE).read_text())
        self._make_optimizer(config.b_lr_multiplier(n_markets))
        torch.manual_seed(config.seed * 1009 + d.rank)  # the dropout stream, distinct per rank
        self.prog, self.best = ckpt.Progress(), None
        self._last_eval: tuple[int | None, pd.DataFrame | None] = (None, None)  # (step, valid predictions)
        if found:
            self._resume(found[-1])
        self.tracker = self._tracker()

    def _fit_head(self, rows: int) -> dict[str, Any]:
        """The head start (``training/head_start.py``) on ``rows`` train rows drawn with the run's seed."""
        pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        return start_head(self.model, self.enc, self.labels, self.offsets, self.task_ids, rows, self.config.seed,
                          pad_id, self.d.device, self.config.precision, self.config.eval_batch_size)

    def _make_optimizer(self, b_lr_ratio: float) -> None:
        """AdamW (``relevance.training.optim``) and its warm-up/decay schedule."""
        config = self.config
        self.b_lr_ratio = b_lr_ratio
        self.optimizer = make_optimizer(self.model, config.learning_rate, config.weight_decay,
                                        self.task_lr_multiplier or 1.0, b_lr_ratio)
        self.pull = neutral_pull(self.model, self.optimizer, config.task_decay_rate, config.task_decay_toward,
                                 config.task_decay_halves)
        warmup = math.ceil(config.warmup_ratio * self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, self.total))

    def record(self) -> dict[str, Any]:
        """What ``train_config.json`` holds and what ``--resume`` must match (runtime fields aside)."""
        return self.config.to_dict()

    def read_data(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
        """(train, valid, test, markets): every split read before anything is trained or written."""
        return read_training_splits(self.config.data, self.config.markets)

    def prior_reference(self) -> float | None:
        """The logit the market priors are taken against (None: the train rows' own rate)."""
        return None

    def eval_frame(self) -> pd.DataFrame:
        """The rows each evaluation scores to pick the best step (default: all of valid)."""
        return self.valid_df

    def build_model(self) -> tuple[torch.nn.Module, Any]:
        """``(model, tokenizer)`` with the adapter in place and only the trained parameters trainable."""
        from relevance.model.adapters import inject

        from relevance.model.adapters import own_heads

        if self.config.separate and self.d.world > 1:
            raise ValueError("method 'separate' trains one market per step, which DDP cannot split across "
                             f"{self.d.world} processes: run it in one process (no torchrun)")
        adapter_config = self.config.adapter_config(self.markets)
        model, tok = load_cross_encoder(self.config.base_model, self.d.device, adapter_config.modules_to_save)
        inject(model, adapter_config)
        if self.config.task_decay_toward == "mean" and self.config.method == "per-market-lora" \
                and self.config.task_decay_rate:
            tie_to_first(model)  # pulled toward their mean: every market starts from one adapter (task_pull.py)
        if self.config.separate:
            own_heads(model)  # one model per market: its own LoRA and its own head
        return model, tok

    def run_info(self, preds: dict[str, pd.DataFrame]) -> dict[str, Any]:
        """``run_info.json`` (module docstring) for the final predictions ``preds``."""
        from relevance.model.adapters import models_to_serve, trainable_parameters

        config, prog = self.config, self.prog
        return {
            "method": config.method, "run_name": config.run_name or self.out.name, "base_model": self.base_model,
            "trainable_params": int(trainable_parameters(self.model)), "train_time_s": round(prog.train_time_s, 3),
            "examples_per_s": round(prog.examples_seen / max(prog.step_time_s, 1e-9), 2),
            "mlflow_run_id": prog.mlflow_run_id, "data_fingerprint": self.fingerprint, "best_step": prog.best_step,
            "markets": list(self.markets), "task_map": make_task_map(self.markets),
            "degenerate": degenerate_flags(preds, config.run_name or self.out.name, warn=self.main),
            "market_prior_offsets": {m: round(o, 6) for m, o in self.priors.items()}, "prior_logit": self.prior_logit,
            "models_to_serve": models_to_serve(self.model), "head_start": self.head_start,
            # what each market's own adapter parameters learned at (× learning rate): MTL-LoRA's Λ_t / w_t,
            # per-market LoRA's A_t / B_t; None for the other methods
            "task_lr_multiplier": self.task_lr_multiplier,
            "b_lr_ratio": self.b_lr_ratio,  # LoRA+: the up-projections' multiple of the learning rate
            **config.pull_record,  # MTL-LoRA's pull (relevance.training.task_pull): its D (0: off), its halves
            "shared_steps": self.shared_steps,  # per-market-lora: steps its markets trained one shared adapter
            "shared_adapter": config.uses_shared_adapter,  # per-market-lora: A_t = Ā + ΔA_t, B_t = B̄ + ΔB_t
            "precision": resolve_precision(config.precision, self.d.device),
            "rollbacks": prog.rollbacks,  # the divergence guard's (relevance.training.divergence)
            "eval_every": self.eval_every,  # steps between valid evaluations (the guard acts on them)
        }

    def _resume(self, path: Path) -> None:
        ckpt.clean_temporary(self.out)
        # A run keeps the LoRA+ ratio it started with, though the default may have changed since: a
        # checkpoint without one was written before LoRA+ existed, i.e. at one rate (its optimizer groups).
        saved_ratio = float(json.loads((path / "state.json").read_text()).get("b_lr_ratio", 1.0))
        if self.config.b_lr_ratio is None and saved_ratio != self.b_lr_ratio:
            logger.info("resuming %s with the up-projections at %g× the learning rate, as it started",
                        self.out, saved_ratio)
            self._make_optimizer(saved_ratio)
        state, self.best = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.d.rank)
        if state.get("data_fingerprint") != self.fingerprint:
            raise ValueError(f"cannot resume from {path}: the dataset changed (fingerprint "
                             f"{state.get('data_fingerprint')} vs now {self.fingerprint}); start a new --out")
        if state.get("world_size") != self.d.world:
            raise ValueError(f"cannot resume from {path}: it ran on {state.get('world_size')} process(es), "
                             f"now {self.d.world}; use the same --nproc_per_node")
        self.sampler.load_state_dict(state["sampler"])
        self.prog = ckpt.Progress(**state["progress"])
        logger.info("resuming %s from step %d", self.out, self.prog.step)

    def _tracker(self) -> NullTracker:
        """MLflow on rank 0 (re-attached to the run's MLflow run on resume); a no-op elsewhere."""
        config, prog, tracker = self.config, self.prog, NullTracker()
        if self.main and config.track:
            tracker = Tracker(settings.tracking_uri(config.tracking_uri), config.experiment,
                              config.run_name or self.out.name, prog.mlflow_run_id,
                              tags={"method": config.method, "run_dir": str(self.out.absolute())})
            if prog.mlflow_run_id is None:
                tracker.log_params({**config.to_dict(), "data_fingerprint": self.fingerprint,
                                    "markets": ",".join(self.markets), "total_steps": self.total,
                                    "world_size": self.d.world})
            prog.mlflow_run_id = tracker.run_id
        prog.mlflow_run_id = self.d.gather(prog.mlflow_run_id)[0]
        return tracker

    def _predict(self, df: pd.DataFrame) -> pd.DataFrame:
        """Predictions of ``df``, each rank scoring every W-th row, gathered on all ranks."""
        c, d = self.config, self.d
        part = score(self.model, self.tok, df.iloc[d.rank:: d.world], batch_size=c.eval_batch_size,
                     max_length=c.max_length, market_token=c.market_token, precision=c.precision)
        scores = np.empty(len(df), dtype=np.float64)
        for r, chunk in enumerate(d.gather(part)):
            scores[r:: d.world] = chunk
        return predictions_frame(df, scores)

    def _evaluate(self) -> None:
        """Valid AUC per market; a better mean keeps these weights as the best; patience counts."""
        prog, config = self.prog, self.config
        preds = self._predict(self.eval_df)
        self._last_eval = (prog.step, preds)  # _finish reuses it when this step's weights are the best
        aucs, mean, loss = market_aucs(preds)
        if self.main and not config.progress:  # no progress bar (a pipeline's task): one line per evaluation
            logger.info("%s step %d/%d: valid AUC %s (%s), loss %.4f", config.method, prog.step, self.total,
                        "n/a" if mean is None else f"{mean:.4f}",
                        ", ".join(f"{m} {'n/a' if v is None else f'{v:.3f}'}" for m, v in aucs.items()), loss)
        spreads = divergence.market_spreads(preds)
        self.tracker.log_metrics({**{f"valid_auc_{m}": v for m, v in aucs.items()}, "valid_auc_mean": mean,
                                  "valid_loss": loss}, prog.step)
        prog.history.append({"step": prog.step, "valid_auc": aucs, "valid_auc_mean": mean, "valid_loss": loss,
                             "score_std": spreads})
        value = mean if mean is not None else -loss  # no market with both classes: select on loss
        # the divergence guard: a market that collapsed since the best evaluation sends the run back to it
        rolled_back = self.best is not None and divergence.guard(prog, spreads, config.rollback_limit, self.model,
                                                                 self.optimizer, self.scheduler, self.best)
        if rolled_back:
            self.tracker.log_metrics({"rollbacks": len(prog.rollbacks)}, prog.step)
            self.tracker.set_tags({"rollbacks": json.dumps(prog.rollbacks)})
        if rolled_back == "markets":  # the other markets kept their weights: the mix is evaluated, may be the best
            self._evaluate()
            return
        if not rolled_back and (prog.best_metric is None or value > prog.best_metric + config.min_delta):
            prog.best_metric, prog.best_step, prog.bad_evals = value, prog.step, 0
            self.best = ckpt.trainable_state(self.model)
            if self.main:
                ckpt.save_best_adapter(self.model, self.out, self.base_model)
        else:
            prog.bad_evals += 1
            prog.stopped = config.patience is not None and prog.bad_evals >= config.patience
        self.model.train()

    def _checkpoint(self) -> None:
        rngs = self.d.gather(ckpt.rng_state())
        if self.main:
            state = {"progress": asdict(self.prog), "sampler": self.sampler.state_dict(),
                     "data_fingerprint": self.fingerprint, "world_size": self.d.world, "b_lr_ratio": self.b_lr_ratio}
            ckpt.save_checkpoint(self.out, self.prog.step, self.model, self.optimizer, self.scheduler, rngs,
                                 state, self.best, self.config.keep_checkpoints)
        self.tracker.flush()

    def _step(self, net: torch.nn.Module, pad_id: int) -> float:
        """One optimizer step on the next batch; returns its loss."""
        idx = self.sampler.next_batch()
        batch = collate(self.enc, idx, pad_id, self.d.device)
        ids = None if self.task_ids is None else self.task_ids[idx].to(self.d.device)
        shared = self.prog.step < self.shared_steps  # per-market-lora's shared start (training/shared_start.py)
        if shared:
            ids = shared_routing(ids)
        elif self.shared_steps and self.prog.step == self.shared_steps:
            copy_first_state(self.optimizer, self.model)  # each market continues from the shared adapter
        # Routing is set on the inner model's layers, then the (DDP) wrapper runs the forward.
        with task_routing(self.model, ids), autocast(self.config.precision, self.d.device):
            logits = net(**batch).logits.float().view(-1)
        logits = logits + self.offsets[idx].to(self.d.device)  # each market's prior (training/priors.py)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, self.labels[idx].to(self.d.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        if self.pull is not None:
            self.pull()
        if shared:
            tie_to_first(self.model)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.prog.examples_seen += len(idx) * self.d.world
        return float(loss.item())

    def fit(self, on_step: Callable[[int], None] | None) -> TrainResult:
        from tqdm import tqdm

        config, prog, d = self.config, self.prog, self.d
        net = self.model
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(self.model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        bar = tqdm(total=self.total, initial=prog.step, desc=f"train {config.method}", unit="step",
                   disable=not (self.main and config.progress), file=sys.stderr, dynamic_ncols=True)
        start, before = time.perf_counter(), prog.train_time_s
        self.model.train()
        # CPU dropout from ~p·n random numbers instead of n (model/cpu_dropout.py); GPUs keep their own
        fast_dropout = cpu_dropout(self.model) if d.device.type == "cpu" else contextlib.nullcontext()
        with fast_dropout:
            self._loop(net, pad_id, bar, on_step, (start, before))
        bar.close()
        prog.train_time_s = before + time.perf_counter() - start
        return self._finish()

    def _loop(self, net: torch.nn.Module, pad_id: int, bar: Any, on_step: Callable[[int], None] | None,
              clock: tuple[float, float]) -> None:
        """Steps until the budget or patience ends: evaluations, checkpoints, progress on the way."""
        config, prog = self.config, self.prog
        (start, before), ema = clock, None
        while prog.step < self.total and not prog.stopped:
            t0 = time.perf_counter()
            loss = self._step(net, pad_id)
            prog.step += 1
            prog.step_time_s += time.perf_counter() - t0
            ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            self.tracker.log_metrics({"train_loss": loss, "lr": self.scheduler.get_last_lr()[0]}, prog.step)
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", ex_s=f"{prog.examples_seen / max(prog.step_time_s, 1e-9):.0f}",
                            refresh=False)
            done = prog.step >= self.total
            if prog.step % self.eval_every == 0 or done:
                self._evaluate()
            if prog.step % (config.checkpoint_every or self.eval_every) == 0 or done or prog.stopped:
                prog.train_time_s = before + time.perf_counter() - start
                self._checkpoint()
            if on_step is not None:
                on_step(prog.step)

    def _finish(self) -> TrainResult:
        """Best weights back in, predictions, degenerate markets (warned), run_info.json, final metrics, artifacts."""
        prog = self.prog
        if self.best is not None:
            ckpt.load_trainable_state(self.model, self.best, "best weights")
        step, last = self._last_eval
        reuse = last is not None and step == prog.best_step and self.eval_df is self.valid_df
        preds = {"valid": last if reuse else self._predict(self.valid_df), "test": self._predict(self.test_df)}
        run_info = self.run_info(preds)
        if self.main:
            ckpt.write_run_outputs(self.out, self.model, self.base_model, preds, run_info)
            aucs, mean, _ = market_aucs(preds["test"])
            log_final(self.tracker, self.out, prog.step, aucs, mean, run_info)
        self.d.barrier()
        return TrainResult(self.out, run_info, self.model)
