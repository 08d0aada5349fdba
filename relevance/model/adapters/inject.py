"""Putting adapters into a transformers model, routing task ids to them, counting parameters.

Task ids reach the layers through :func:`use_tasks`, a context manager that sets instance state on
this model's adapter layers and resets it on exit: no globals, so two models (or two threads with
two models) never see each other's routing, and the model's ``forward`` signature stays the
transformers one (which is what lets the merged model be a plain transformers model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from data_contracts.markets import task_index

from .config import (
    DEFAULT_MODULES_TO_SAVE,
    DEFAULT_TARGET_MODULES,
    MODULES_TO_SAVE_BY_MODEL_TYPE,
    TARGETS_BY_MODEL_TYPE,
    AdapterConfig,
)
from .baselines import MoELoRALinear, MultiLoRALinear
from .heads import MarketHeads, find_modules, name_matches, set_module
from .layers import AdapterLayer, LoRALinear, MTLLoRALinear, PerTaskLoRALinear
from .task_batch import task_matrix_batches

CONFIG_ATTR = "adapter_config"


def get_adapter_config(model: nn.Module) -> AdapterConfig:
    """The config ``inject`` stored on ``model``; a model without adapters is an error saying so."""
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, AdapterConfig):
        raise ValueError(
            f"{type(model).__name__} has no adapters: call inject(model, AdapterConfig(...)) "
            "or load_adapter(model, dir) first"
        )
    return config


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Module name → adapter layer, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _resolve(config: AdapterConfig, model: nn.Module) -> AdapterConfig:
    """Swap default module names for the model type's own ones (DistilBERT: ``q_lin``…)."""
    mtype = _model_type(model)
    targets = config.target_modules
    if targets == DEFAULT_TARGET_MODULES and mtype in TARGETS_BY_MODEL_TYPE:
        targets = TARGETS_BY_MODEL_TYPE[mtype]
    to_save = config.modules_to_save
    if to_save == DEFAULT_MODULES_TO_SAVE:
        to_save = MODULES_TO_SAVE_BY_MODEL_TYPE.get(mtype, to_save)
        # Defaults are best-effort (a bare encoder has no head); explicit names must exist.
        to_save = tuple(p for p in to_save if any(name_matches(n, p) for n, _ in model.named_modules()))
    return dataclasses.replace(config, target_modules=targets, modules_to_save=to_save)


def _make_layer(base: nn.Linear, config: AdapterConfig) -> AdapterLayer:
    common = {"r": config.r, "alpha": config.alpha, "dropout": config.dropout}
    if config.method == "lora":
        return LoRALinear(base, **common)
    if config.method == "per-market-lora":
        return PerTaskLoRALinear(base, config.num_tasks, shared=config.shared_adapter, **common)
    if config.method == "multilora":
        return MultiLoRALinear(base, n=config.multilora_n, **common)
    if config.method == "moelora":
        return MoELoRALinear(
            base, config.num_tasks, n_experts=config.n_experts, task_dim=config.task_embedding_dim, **common
        )
    return MTLLoRALinear(
        base,
        config.num_tasks,
        n_up=config.n_up,
        temperature=config.temperature,
        uniform_mixing_init=config.uniform_mixing_init,
        mixing_init_scale=config.mixing_init_scale,
        **common,
    )


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace every target ``nn.Linear`` with an adapter layer, in place; return ``model``.

    Freezes every base parameter, then unfreezes the adapter parameters and ``modules_to_save``
    (e.g. the new classification head). Stores the resolved config as ``model.adapter_config``.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"inject expects an AdapterConfig, got {type(config).__name__}")
    if isinstance(getattr(model, CONFIG_ATTR, None), AdapterConfig) or adapter_layers(model):
        raise ValueError("model already has adapters: inject into a fresh base model")
    config = _resolve(config, model)
    targets = list(find_modules(model, config.target_modules))
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError(
            f"target_modules {list(config.target_modules)} match no module of this "
            f"{_model_type(model) or type(model).__name__} model; its linear layers include "
            f"{linear_names[:8]} (match is by name or dotted suffix)"
        )
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}, not nn.Linear: "
                "name the linear layers themselves in target_modules"
            )
    saved = list(find_modules(model, config.modules_to_save))
    missing = [p for p in config.modules_to_save if not any(name_matches(n, p) for n, _ in saved)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of this model")
    for s_name, _ in saved:
        clash = [t for t, _ in targets if t == s_name or t.startswith(s_name + ".")]
        if clash:
            raise ValueError(f"module {s_name!r} is in modules_to_save and contains targets {clash}")

    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets:
        layer = _make_layer(module, config)
        layer.train(module.training)  # a model injected after .eval() must stay in eval mode
        set_module(model, name, layer)
    for _, module in saved:
        for p in module.parameters():
            p.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    return model


def market_task_ids(model: nn.Module, markets: Sequence[str]) -> torch.Tensor:
    """Per-example market codes → LongTensor of task ids; an unknown market names the known ones."""
    mapping = get_adapter_config(model).task_map
    return torch.tensor([task_index(mapping, m) for m in markets], dtype=torch.long)


def _routed(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (AdapterLayer, MarketHeads))]


def _check_ids(config: AdapterConfig, task_ids: object) -> torch.Tensor:
    if not isinstance(task_ids, torch.Tensor):
        raise ValueError(
            f"task_ids must be a 1-D LongTensor of per-example task indices, got {type(task_ids).__name__}"
        )
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must be an integer tensor (torch.long), got dtype {task_ids.dtype}")
    if task_ids.dim() != 1:
        raise ValueError(f"task_ids must be 1-D (one id per example), got shape {tuple(task_ids.shape)}")
    ids = task_ids.long()
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= config.num_tasks:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"task id {bad} out of range: expected ids in [0, {config.num_tasks}) for the "
                f"markets {config.task_map}"
            )
    return ids


@contextmanager
def use_tasks(model: nn.Module, task_ids: torch.Tensor | None) -> Iterator[None]:
    """Route per-example ``task_ids`` (LongTensor (B,)) to every adapter layer of ``model``.

    Validates the ids once per batch (dtype, 1-D, range) instead of once per layer. Shared ``lora``
    ignores them; a task-conditioned model needs them unless it is merged for one market. With
    activation (gradient) checkpointing the forward is re-run during ``backward``: call
    ``loss.backward()`` inside the same context so the re-run sees the same ids.
    """
    config = get_adapter_config(model)
    routed = _routed(model)
    ids: torch.Tensor | None = None
    if task_ids is not None and config.is_task_conditioned:
        ids = _check_ids(config, task_ids)
        device = next((p.device for m in routed for p in m.parameters()), ids.device)
        ids = ids.to(device)  # once here, not once per layer
    elif task_ids is None and config.is_task_conditioned:
        merged = [m for m in routed if isinstance(m, AdapterLayer) and m.is_merged]
        if not merged:
            raise ValueError(
                f"method {config.method!r} needs per-example task ids: expected a LongTensor in "
                f"[0, {config.num_tasks}) for the markets {config.task_map}, got None"
            )
    previous = [m._task_ids for m in routed]
    for m in routed:
        m._task_ids = ids
    # MTL-LoRA training (task_batch.py); a context entered without gradients (scoring) skips the setup
    batches = task_matrix_batches(routed) if ids is not None and torch.is_grad_enabled() else []
    batched = [(layer, i, batch) for batch in batches for i, layer in enumerate(batch.layers)]
    before = [layer._task_batch for layer, _, _ in batched]
    for layer, i, batch in batched:
        layer._task_batch = (batch, i)

    def refresh(*_: object) -> None:  # a pre-hook's return value would replace the forward's arguments
        for batch in batches:
            batch.prepare() if torch.is_grad_enabled() else batch.clear()

    hook = model.register_forward_pre_hook(refresh) if batches else None
    try:
        yield
    finally:
        for m, prev in zip(routed, previous):
            m._task_ids = prev
        if hook is not None:
            hook.remove()
        for (layer, _, _), prev_batch in zip(batched, before):
            layer._task_batch = prev_batch


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with ``requires_grad`` (what the optimizer will update)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable_parameters(
    config: AdapterConfig,
    layer_shapes: Mapping[str, tuple[int, int]] | Iterable[tuple[int, int]],
) -> int:
    """Closed-form adapter parameter count over layers of shape (d_in, d_out).

    MTL-LoRA: r·d_in + n·r·d_out + T·r² + T·n per layer; LoRA: r·(d_in + d_out);
    per-market LoRA: T·r·(d_in + d_out) (+ r·(d_in + d_out) with its shared adapter); MultiLoRA: n·(r·(d_in + d_out) + d_out) (n = multilora_n);
    MOELoRA: r·(d_in + d_out) + N·e + T·e (N experts of rank r/N, gate W_g, per-task embeddings).
    ``modules_to_save`` are not included.
    """
    shapes = layer_shapes.values() if isinstance(layer_shapes, Mapping) else layer_shapes
    r, n, t, e = config.r, config.n_up, config.num_tasks, config.task_embedding_dim
    total = 0
    for d_in, d_out in shapes:
        if config.method == "mtl-lora":
            total += r * d_in + n * r * d_out + t * r * r + t * n
        elif config.method == "lora":
            total += r * (d_in + d_out)
        elif config.method == "multilora":
            total += config.multilora_n * (r * (d_in + d_out) + d_out)
        elif config.method == "moelora":
            total += r * (d_in + d_out) + config.n_experts * e + t * e
        else:
            total += (t + config.shared_adapter) * r * (d_in + d_out)
    return total
