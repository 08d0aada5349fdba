"""A finished training run directory, as the registry reads it, and finding its shared-LoRA baseline.

The run directory contract is ``relevance.training.loop``'s: ``adapter/``, ``run_info.json``,
``train_config.json``, ``metrics.json`` (from ``relevance.evaluation.metrics.evaluate_run``) and
``predictions/test.parquet``. Reading it once, checked, here means the registry never half-registers a
run because a file turned out to be missing after three markets were already logged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_contracts.markets import validate_market

BASELINE_METHOD = "lora"  # the shared-LoRA baseline every candidate must beat
MARKET_TOKEN_METHOD = "lora-market-token"


@dataclass(frozen=True)
class TrainingRun:
    """What the registry needs from ``RUN/``; build it with :func:`read_training_run`."""

    path: Path
    info: dict[str, Any]
    train_config: dict[str, Any]
    metrics: dict[str, Any]
    adapter_sha256: str
    valid_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.info["method"])

    @property
    def markets(self) -> tuple[str, ...]:
        return tuple(self.info["markets"])

    @property
    def market_token(self) -> bool:
        """True when the query carries the ``[<market>]`` prefix at scoring time too."""
        return self.method == MARKET_TOKEN_METHOD

    @property
    def max_length(self) -> int:
        return int(self.train_config.get("max_length", 128))

    @property
    def base_model(self) -> str:
        return str(self.info["base_model"])

    def test_auc(self, market: str) -> dict[str, Any]:
        """``{auc, ci_low, ci_high, n}`` of ``market`` on the run's test split; ``{}`` if it has none."""
        return _market_auc(self.metrics, market)

    def valid_auc(self, market: str) -> dict[str, Any]:
        """The same on the valid split (what selection reads at training time); ``{}`` if none."""
        return _market_auc(self.valid_metrics, market)

    def check_markets(self, markets: Sequence[str] | None) -> list[str]:
        """``markets`` validated against the run's (all of the run's when ``None``)."""
        if markets is None:
            return list(self.markets)
        chosen = [validate_market(m) for m in markets]
        unknown = [m for m in chosen if m not in self.markets]
        if unknown:
            raise ValueError(f"markets {unknown} are not in run {self.path} (it was trained on {list(self.markets)})")
        if not chosen:
            raise ValueError("no markets given: pass at least one, or none for all of the run's markets")
        return chosen


def _market_auc(metrics: dict[str, Any], market: str) -> dict[str, Any]:
    entry = (metrics.get("markets") or {}).get(market) or {}
    return {k: entry.get(k) for k in ("auc", "ci_low", "ci_high", "n")} if entry else {}


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {what}")
    return json.loads(path.read_text())


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 over the adapter's files (weights + config): the identity of a training result."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(adapter_dir).iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _split_metrics(run_dir: Path, split: str = "test", required: bool = True) -> dict[str, Any]:
    """``metrics.json`` (``metrics_<split>.json``), else per-market AUCs computed from
    ``predictions/<split>.parquet`` (not written); ``{}`` for a missing optional split."""
    from relevance.evaluation.metrics import auc_table, metrics_path

    path = metrics_path(run_dir, split)
    if path.is_file():
        return json.loads(path.read_text())
    preds = run_dir / "predictions" / f"{split}.parquet"
    if not preds.is_file():
        if not required:
            return {}
        raise FileNotFoundError(f"run {run_dir} has neither {path.name} nor predictions/{split}.parquet: "
                                "finish training (and `evaluate`) before registering it")
    import pandas as pd

    return auc_table(pd.read_parquet(preds))


def read_training_run(run_dir: str | Path) -> TrainingRun:
    """Read and check ``run_dir``; a missing piece is an error naming the file and the fix."""
    path = Path(run_dir).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"training run {str(run_dir)!r} does not exist: pass the --out directory of a training run")
    info = _json(path / "run_info.json", "it is written when training finishes; train (or resume) the run first")
    for key in ("method", "markets", "base_model"):
        if not info.get(key):
            raise ValueError(f"{path / 'run_info.json'} lacks {key!r}: not a finished training run")
    for m in info["markets"]:
        validate_market(m)
    config = _json(path / "train_config.json", "the run's training configuration (max_length) is needed")
    adapter = path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter_config.json: the run saved no adapter")
    return TrainingRun(path, info, config, _split_metrics(path), adapter_digest(adapter),
                       _split_metrics(path, "valid", required=False))


def _sibling_baselines(run: TrainingRun) -> list[Path]:
    out = []
    for d in sorted(run.path.parent.iterdir()):
        info_path = d / "run_info.json"
        if d == run.path or not info_path.is_file():
            continue
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        if info.get("method") == BASELINE_METHOD and info.get("data_fingerprint") == run.info.get("data_fingerprint"):
            out.append(d)
    return out


def find_baseline_run(run: TrainingRun, baseline_run: str | Path | None = None) -> TrainingRun | None:
    """The shared-LoRA run ``run`` is compared with (module docstring of ``relevance.serving.registry``)."""
    if baseline_run is not None:
        baseline = read_training_run(baseline_run)
        if baseline.method != BASELINE_METHOD:
            raise ValueError(f"baseline run {baseline.path} has method {baseline.method!r}; the baseline must be "
                             f"a shared-LoRA run (method {BASELINE_METHOD!r})")
        return baseline
    if run.method == BASELINE_METHOD:
        return run
    found = _sibling_baselines(run)
    if len(found) > 1:
        raise ValueError(f"several shared-LoRA runs next to {run.path} could be the baseline: "
                         f"{[str(p) for p in found]}; pass --baseline-run to choose one")
    return read_training_run(found[0]) if found else None


def write_synthetic_run(run_dir: str | Path, base_model: str | Path, method: str = "mtl-lora",
                        markets: Sequence[str] = ("de", "us"), test: Any = None, seed: int = 0,
                        scale: float = 0.3, max_length: int = 64, data_fingerprint: str | None = None,
                        data: str | Path | None = None) -> Path:
    """A training run directory as ``relevance.training.loop`` writes it, with random non-zero adapter weights.

    Why: tests and benchmarks of the registry and scoring need runs whose adapters really change the
    scores (B, Λ, w and the head all random, never the zero-init no-op) without training for minutes.
    ``test`` (a curated test frame) gives ``predictions/test.parquet`` and ``metrics.json``, scored in fp32;
    ``data`` (a curated dataset) is recorded as the run's data, as training records it.
    """
    import pandas as pd
    import torch

    from relevance.model.adapters import AdapterConfig, adapter_layers, inject, save_adapter
    from relevance.model.cross_encoder import load_cross_encoder, score
    from relevance.evaluation.metrics import auc_table

    out = Path(run_dir)
    codes = tuple(sorted(validate_market(m) for m in markets))
    with torch.random.fork_rng(devices=[]):  # same seed, same run (A and a fresh head use the global RNG)
        torch.manual_seed(seed)
        model, tokenizer = load_cross_encoder(base_model, "cpu")
        inject(model, AdapterConfig("lora" if method == MARKET_TOKEN_METHOD else method, markets=codes))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if not name.startswith("base."):
                    p.add_(torch.randn(p.shape, generator=g) * scale)
        head = getattr(model, "classifier", None)  # the new head is trained too (modules_to_save)
        for p in head.parameters() if head is not None else ():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(model, out / "adapter", str(base_model))
    info = {"method": method, "run_name": out.name, "base_model": str(base_model), "trainable_params": 0,
            "train_time_s": 0.0, "examples_per_s": 0.0, "mlflow_run_id": None, "data_fingerprint": data_fingerprint,
            "best_step": 0, "markets": list(codes), "task_map": {m: i for i, m in enumerate(codes)}}
    (out / "run_info.json").write_text(json.dumps(info, indent=2))
    config = {"method": method, "base_model": str(base_model), "max_length": max_length, "markets": list(codes),
              "data": None if data is None else str(data)}
    (out / "train_config.json").write_text(json.dumps(config, indent=2))
    if test is not None:
        scores = score(model, tokenizer, test, max_length=max_length, market_token=method == MARKET_TOKEN_METHOD,
                       precision="fp32")
        preds = pd.DataFrame({"example_id": test["example_id"], "market": test["market"],
                              "label": test["label"].astype("int64"), "score": scores})
        (out / "predictions").mkdir(exist_ok=True)
        preds.to_parquet(out / "predictions" / "test.parquet", index=False)
        metrics = {"method": method, "split": "test", **auc_table(preds, n_boot=50)}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out
