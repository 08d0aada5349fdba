"""Merging a market's update into the weights, and exporting a plain transformers model.

Everything goes through ``layer.delta_weight(task)`` so that in-place merge, unmerge and export
cannot disagree about what the adapted layer computes. The export is an ordinary transformers model
directory (same architecture, same speed as the base) that loads with
``AutoModelForSequenceClassification.from_pretrained`` and no project code.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from data_contracts.markets import task_index

from .heads import MarketHeads, set_module
from .inject import CONFIG_ATTR, adapter_layers, get_adapter_config


def _task_for(model: nn.Module, market: str | None) -> int:
    """Task index of ``market``; shared ``lora`` accepts ``None`` (one update for all markets)."""
    config = get_adapter_config(model)
    if market is None:
        if config.is_task_conditioned:
            raise ValueError(
                f"method {config.method!r} has one update per market: pass one of "
                f"{sorted(config.task_map)} as market"
            )
        return 0
    if not isinstance(market, str):
        raise ValueError(f"market must be a market code string, got {market!r}")
    if not config.task_map:
        return 0
    try:
        t = task_index(config.task_map, market)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None
    return t if config.is_task_conditioned else 0


def models_to_serve(model: nn.Module) -> int:
    """How many different merged models the markets need: one per market when each has its own update
    (a task-conditioned adapter), else one model every market shares."""
    config = get_adapter_config(model)
    return max(1, config.num_tasks) if config.is_task_conditioned else 1


def _heads(model: nn.Module) -> dict[str, MarketHeads]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MarketHeads)}


def merge(model: nn.Module, market: str | None) -> None:
    """Fold ``market``'s update into every adapted weight, in place (undo with :func:`unmerge`)."""
    t = _task_for(model, market)
    layers = adapter_layers(model)
    already = sorted({layer.merged_task for layer in layers.values() if layer.is_merged}, key=str)
    if already:
        raise ValueError(f"model is already merged (task {already}): call unmerge(model) first")
    for layer in layers.values():
        layer.merge(t)
    for heads in _heads(model).values():
        heads.merged_task = t


def unmerge(model: nn.Module) -> None:
    """Subtract whatever update is merged (base weights restored up to float rounding)."""
    get_adapter_config(model)
    for layer in adapter_layers(model).values():
        layer.unmerge()
    for heads in _heads(model).values():
        heads.merged_task = None


def merged_copy(model: nn.Module, market: str | None) -> nn.Module:
    """A deep copy that is a plain transformers model computing the adapted model for ``market``.

    Adapter layers become ``nn.Linear`` with weight W + ΔW_market; per-market head copies are
    resolved to ``market``'s head; the adapter config attribute is removed; all parameters are
    trainable again, as in a freshly loaded model. ``model`` itself is not modified.
    """
    t = _task_for(model, market)
    new = copy.deepcopy(model)
    for name, layer in adapter_layers(new).items():
        layer.unmerge()
        linear = layer.base
        with torch.no_grad():
            delta = layer.delta_weight(t).to(torch.float32)
            linear.weight.copy_((linear.weight.to(torch.float32) + delta).to(linear.weight.dtype))
        set_module(new, name, linear)
    for name, heads in _heads(new).items():
        set_module(new, name, heads.module_for(t))
    if CONFIG_ATTR in vars(new):
        delattr(new, CONFIG_ATTR)
    for p in new.parameters():
        p.requires_grad_(True)
    return new


def export_merged(
    model: nn.Module, market: str | None, out_dir: str | Path, tokenizer: object | None = None
) -> Path:
    """Write ``market``'s merged model (safetensors + config, and the tokenizer if given) to ``out_dir``."""
    out = Path(out_dir)
    merged = merged_copy(model, market)
    if not hasattr(merged, "save_pretrained"):
        raise ValueError(f"{type(model).__name__} is not a transformers model: cannot save_pretrained")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out
