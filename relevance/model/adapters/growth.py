"""Adding a market to a trained adapter without moving any existing market's outputs.

A new market starts neutral (MTL-LoRA: Λ = I and zero mixing logits, so it reuses the shared A and
an even mix of the trained B_i; per-market LoRA: fresh A_t with B_t = 0, i.e. the base model, or with a
shared adapter zero departures, i.e. the shared adapter;
MOELoRA: a zero task embedding, i.e. a uniform gate over the trained experts).
``train_new_markets_only`` then leaves exactly the new markets' own parameters trainable; since
those are separate ``Parameter`` objects, no optimizer can touch another market's numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from data_contracts.markets import validate_market

from .heads import MarketHeads, find_modules, set_module
from .inject import CONFIG_ATTR, adapter_layers, get_adapter_config


def add_market(model: nn.Module, code: str) -> int:
    """Add market ``code`` as task T (appended; existing indices unchanged); return T."""
    config = get_adapter_config(model)
    if not config.is_task_conditioned:
        raise ValueError(
            f"method {config.method!r} shares one adapter across all markets, so there is no "
            "per-market state to add: use 'mtl-lora', 'per-market-lora' or 'moelora'"
        )
    validate_market(code)
    if code in config.task_map:
        raise ValueError(f"market {code!r} is already task {config.task_map[code]} of this model")
    layers = adapter_layers(model)
    if any(layer.is_merged for layer in layers.values()):
        raise ValueError("cannot add a market to a merged model: call unmerge(model) first")
    new_index = config.num_tasks
    for name, layer in layers.items():
        got = layer.add_task()
        if got != new_index:
            raise RuntimeError(f"layer {name} has {got} tasks, expected {new_index}: model is inconsistent")
    setattr(model, CONFIG_ATTR, dataclasses.replace(config, added_markets=(*config.added_markets, code)))
    return new_index


def add_head_copy(model: nn.Module, market: str) -> list[nn.Module]:
    """Give ``market`` its own copy of every ``modules_to_save`` module; return the copies."""
    config = get_adapter_config(model)
    task = config.task_map[market]
    if not config.modules_to_save:
        raise ValueError("this adapter trains no head modules (modules_to_save is empty): nothing to copy")
    copies = []
    for name, module in list(find_modules(model, config.modules_to_save)):
        if not isinstance(module, MarketHeads):
            module = MarketHeads(module)
            set_module(model, name, module)
        copies.append(module.add_copy(market, task))
    return copies


def own_heads(model: nn.Module) -> None:
    """Give every market its own copy of the head modules and freeze the shared head (``separate``).

    Each copy starts from the shared head's weights, so every market starts where a model trained
    alone from the same seed would; the frozen shared head then serves no trained market.
    """
    config = get_adapter_config(model)
    if not config.is_task_conditioned:
        raise ValueError(f"method {config.method!r} has no markets of its own to give heads to")
    for market in config.task_map:
        add_head_copy(model, market)
    for _, module in find_modules(model, config.modules_to_save):
        for p in module.shared.parameters():
            p.requires_grad_(False)


def train_new_markets_only(model: nn.Module, markets: Sequence[str], head: bool = False) -> None:
    """Freeze everything except ``markets``' own adapter parameters (and head copies if ``head``).

    MTL-LoRA: each market's Λ_t and w_t; per-market LoRA: its A_t and B_t; MOELoRA: its gate
    embedding emb[t] (experts and W_g are shared, so they stay frozen). With ``head=True`` each
    market gets (or keeps) a copy of the trained head, which trains; the shared head stays frozen.
    """
    config = get_adapter_config(model)
    if not config.is_task_conditioned:
        raise ValueError(f"method {config.method!r} has no per-market parameters to train alone")
    if isinstance(markets, str) or not markets:
        raise ValueError(f"markets must be a non-empty list of market codes, got {markets!r}")
    unknown = [m for m in markets if m not in config.task_map]
    if unknown:
        raise ValueError(f"unknown markets {unknown}: this model knows {list(config.task_map)}; add_market first")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for market in markets:
            for p in layer.task_parameters(config.task_map[market]):
                p.requires_grad_(True)
    if head:
        for market in markets:
            for module in add_head_copy(model, market):
                for p in module.parameters():
                    p.requires_grad_(True)
