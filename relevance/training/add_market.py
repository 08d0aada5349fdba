"""Launching a market on a trained run without retraining or moving any other market.

MTL-LoRA (and per-market LoRA, MOELoRA) keep per-market state apart from what markets share, so a
new market needs only its own parameters (Λ_t and w_t; A_t and B_t; the gate embedding) over the
trained shared ones (``relevance.model.adapters.growth``). :func:`add_markets` loads RUN's adapter onto
its base model, appends the markets, trains only their parameters (and their head copies with
``head=True``) on their train rows with the loop of :mod:`relevance.training.loop` (same checkpoints,
``resume``, tracking, DDP), picks the best step on their valid rows, and writes a complete run directory:

    NEWRUN/adapter/            the grown adapter (old markets' tensors byte-identical to RUN's)
    NEWRUN/run_info.json       as ``train`` writes it, with ``markets`` and ``task_map`` the grown
                               adapter's real (not sorted) map, plus ``added_markets`` and ``from_run``
    NEWRUN/train_config.json   the TrainConfig used (``markets`` = the added ones) plus an ``add_market``
                               section (from_run, its adapter sha256, head): what ``resume`` must match
    NEWRUN/predictions/        valid and test predictions of *every* market with rows in the dataset

Everything is checked before anything is written, so a refused request leaves no ``out`` behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from data_contracts.markets import validate_market
from relevance.data.curated import read_split
from relevance.model.cross_encoder import load_cross_encoder
from relevance.training.config import TrainConfig
from relevance.training.distributed import Dist
from relevance.training.loop import Run, TrainResult, run_training
from relevance.training.runs import adapter_digest

logger = logging.getLogger(__name__)

GROWABLE = ("mtl-lora", "per-market-lora", "moelora")
# Training options an add-market request may set; anything else (method, r, alpha…) comes from RUN.
OPTIONS = frozenset({"max_steps", "epochs", "batch_size", "learning_rate", "max_length", "seed", "precision",
                     "eval_every", "checkpoint_every", "keep_checkpoints", "patience", "min_delta",
                     "eval_batch_size", "warmup_ratio", "weight_decay", "device", "tracking_uri", "experiment",
                     "run_name", "track", "progress", "resume"})


@dataclass(frozen=True)
class SourceRun:
    """The trained run a market is added to: its run_info, train_config and saved adapter."""

    path: Path
    info: dict[str, Any]
    train_config: dict[str, Any]
    task_map: dict[str, int]
    modules_to_save: tuple[str, ...]
    adapter_sha256: str


def read_source_run(run_dir: str | Path) -> SourceRun:
    """RUN checked as a finished, task-conditioned training run; a wrong directory says what it is."""
    from relevance.model.adapters.persistence import read_adapter_config

    path = Path(run_dir).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"--from {str(run_dir)!r} does not exist: pass the --out directory of `ads-relevance train`")
    if not (path / "run_info.json").is_file():
        if (path / "config.json").is_file() or (path / "MLmodel").is_file() or any(path.glob("*.safetensors")):
            raise ValueError(f"--from {str(path)!r} is a merged/exported model directory, not a training run: its "
                             "markets are baked into plain weights. Pass the training run directory (it holds "
                             "adapter/ and run_info.json) that the model was exported from")
        raise FileNotFoundError(f"--from {str(path)!r} holds no run_info.json: not a finished training run "
                                "(train it, or resume it to the end, first)")
    info = json.loads((path / "run_info.json").read_text())
    method = info.get("method")
    if method == "separate":
        raise ValueError(f"run {str(path)!r} trained one model per market (method 'separate'): a new market shares "
                         "nothing with them, so train it alone: `ads-relevance train --method separate --markets "
                         "CODE …` (or any method) and register that run for the new market")
    if method not in GROWABLE:
        raise ValueError(f"run {str(path)!r} was trained with method {method!r}, which shares one adapter across all "
                         f"markets: there is no per-market state to add a market to. Use a run of {list(GROWABLE)}, "
                         "or retrain the shared method on all markets")
    if not (path / "train_config.json").is_file():
        raise FileNotFoundError(f"{path / 'train_config.json'} is missing: the run's training settings are needed")
    meta = read_adapter_config(path / "adapter")
    return SourceRun(path, info, json.loads((path / "train_config.json").read_text()), dict(meta["task_map"]),
                     tuple(meta["config"].modules_to_save), adapter_digest(path / "adapter"))


def _resolved(model: str) -> str:
    local = Path(model).expanduser()
    return str(local.absolute()) if local.exists() or model.startswith((".", "/", "~")) else model


def check_base_model(source: SourceRun, base_model: str | None) -> str:
    """The base RUN was trained on; a different ``base_model`` or a missing one is an error.

    Why so strict: the architecture fingerprint would accept another checkpoint of the same shape,
    and then every existing market's scores would silently change.
    """
    recorded = str(source.info.get("base_model") or "")
    if not recorded:
        raise ValueError(f"{source.path / 'run_info.json'} records no base_model: not a finished training run")
    if base_model is not None and _resolved(base_model) != _resolved(recorded):
        raise ValueError(f"--base-model {base_model!r} differs from the base model run {str(source.path)!r} was trained "
                         f"on ({recorded!r}): its markets would no longer score as trained. Omit --base-model "
                         "(the recorded one is used)")
    if recorded.startswith((".", "/", "~")) and not Path(recorded).expanduser().is_dir():
        raise FileNotFoundError(f"base model {recorded!r} recorded in {source.path / 'run_info.json'} does not exist: "
                                "restore it at that path (add-market must load the exact base the run was trained on)")
    return recorded


def check_new_markets(source: SourceRun, markets: Sequence[str]) -> tuple[str, ...]:
    """Valid, distinct codes that RUN does not have yet, in the order given (their task order)."""
    if isinstance(markets, str) or not markets:
        raise ValueError(f"--market must name at least one market code, got {markets!r}")
    codes = tuple(validate_market(m) for m in markets)
    if len(set(codes)) != len(codes):
        raise ValueError(f"--market {','.join(codes)} names a market twice: give each new market once")
    present = [m for m in codes if m in source.task_map]
    if present:
        raise ValueError(f"markets {present} already exist in run {str(source.path)!r} (its markets: "
                         f"{list(source.task_map)}): add-market only adds new markets; retrain to change existing ones")
    return codes


def make_config(source: SourceRun, data: str, out: str, markets: tuple[str, ...], base_model: str,
                options: dict[str, Any], head: bool = False) -> TrainConfig:
    """RUN's TrainConfig with this request's data, out, markets and the training options given (not None).

    RUN's head start (``head_start``) is kept only with ``head``: then it probes the added markets' own head
    copies; without, the head is RUN's shared one, which the old markets score with and which stays frozen."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"unknown add-market options {unknown}; allowed: {sorted(OPTIONS)}")
    known = {f.name for f in fields(TrainConfig)}
    inherited = {k: v for k, v in source.train_config.items() if k in known}
    given = {k: v for k, v in options.items() if v is not None}
    base = {**inherited, "resume": False, "track": True, "progress": True, "run_name": None}
    if base.get("method") == "per-market-lora":  # new markets start neutral: market 0's adapter is frozen
        base["shared_start"] = 0.0
        # what RUN's adapter is, not what the default is now: a run recorded before run_info held it had none
        base["shared_adapter"] = bool(source.info.get("shared_adapter", False))
    if not head:
        base["head_start"] = None
    merged = {**base, **given, "data": str(data), "out": str(out), "markets": list(markets), "base_model": base_model}
    return TrainConfig.from_dict(merged)


class AddMarketRun(Run):
    """:class:`Run` on a grown adapter: new markets' rows train, every market is predicted at the end."""

    def __init__(self, config: TrainConfig, d: Dist, source: SourceRun, head: bool) -> None:
        self.source, self.head, self.added = source, head, tuple(config.markets or ())
        super().__init__(config, d)

    def record(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "add_market": {"from_run": str(self.source.path), "head": self.head,
                                                        "from_adapter_sha256": self.source.adapter_sha256}}

    def read_data(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
        data, added = self.config.data, list(self.added)
        everything = (*self.source.task_map, *added)
        available = sorted(set(read_split(data, "train")["market"]))
        missing = sorted(set(added) - set(available))
        if missing:
            raise ValueError(f"markets {missing} have no train rows in {data}; markets with train rows: {available}. "
                             "Ingest the new market's data into the dataset first")
        train_df = read_split(data, "train", added)
        valid_df, test_df = read_split(data, "valid", everything), read_split(data, "test", everything)
        no_valid = sorted(set(added) - set(valid_df["market"]))
        if no_valid:
            raise ValueError(f"markets {no_valid} have no valid rows in {data}: the best step is chosen on them")
        for name, frame in (("valid", valid_df), ("test", test_df)):
            gone = [m for m in everything if m not in set(frame["market"])]
            if gone:
                logger.warning("markets %s have no %s rows in %s: they get no %s predictions", gone, name, data, name)
        return train_df, valid_df, test_df, everything

    def prior_reference(self) -> float | None:
        """RUN's reference rate: the new market's offset is taken against the head RUN trained."""
        return self.source.info.get("prior_logit")

    def eval_frame(self) -> pd.DataFrame:
        """Only the added markets decide the best step: the others cannot change."""
        return self.valid_df[self.valid_df["market"].isin(self.added)].reset_index(drop=True)

    def build_model(self) -> tuple[torch.nn.Module, Any]:
        from relevance.model.adapters import add_market, load_adapter, train_new_markets_only

        model, tok = load_cross_encoder(self.config.base_model, self.d.device, self.source.modules_to_save)
        load_adapter(model, self.source.path / "adapter")
        for market in self.added:
            add_market(model, market)
        train_new_markets_only(model, list(self.added), head=self.head)
        return model, tok

    def run_info(self, preds: dict[str, pd.DataFrame]) -> dict[str, Any]:
        from relevance.model.adapters import get_adapter_config

        task_map = dict(get_adapter_config(self.model).task_map)
        return {**super().run_info(preds), "markets": list(task_map), "task_map": task_map,
                "added_markets": list(self.added), "from_run": str(self.source.path), "head": self.head}


def add_markets(from_run: str | Path, data: str | Path, markets: Sequence[str], out: str | Path, *,
                head: bool = False, base_model: str | None = None,
                on_step: Callable[[int], None] | None = None, **options: Any) -> TrainResult:
    """Add ``markets`` to ``from_run`` and train only them (module docstring); return the result.

    ``options`` are training settings (:data:`OPTIONS`; ``None`` keeps RUN's value). Every refusal
    (unknown run, merged model directory, shared method, existing market, other base model, no train
    rows, an ``out`` that is RUN or already holds another run) happens before anything is written.
    """
    source = read_source_run(from_run)
    codes = check_new_markets(source, markets)
    recorded = check_base_model(source, base_model)
    if Path(out).absolute() == source.path:
        raise ValueError(f"--out {str(out)!r} is the --from run itself: write the grown run to a new directory")
    config = make_config(source, str(data), str(out), codes, recorded, options, head)
    return run_training(lambda d: AddMarketRun(config, d, source, head), config.device, on_step)
