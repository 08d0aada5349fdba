"""Saving and loading adapter state: safetensors weights plus ``adapter_config.json``.

Only what training changed is saved (adapter parameters and ``modules_to_save``), so an adapter is
a few MB instead of a model copy. The JSON records the method and hyper-parameters, resolved target
modules, the actual market → task map (added markets included), per-market head copies, the base
model's name and a fingerprint of its architecture config: loading onto another base is refused
instead of silently producing garbage scores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .growth import add_head_copy
from .heads import MarketHeads, find_modules
from .inject import CONFIG_ATTR, adapter_layers, get_adapter_config, inject

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "relevance-adapter"
FORMAT_VERSION = 1

# Config keys that do not change what the base weights mean (bookkeeping, runtime switches, dropout).
_IRRELEVANT_KEYS = {
    "architectures", "dtype", "torch_dtype", "transformers_version", "id2label", "label2id",
    "problem_type", "output_hidden_states", "output_attentions", "return_dict", "use_cache",
    "torchscript", "gradient_checkpointing", "name_or_path", "tokenizer_class", "finetuning_task",
    "chunk_size_feed_forward", "num_labels",
}


def base_config_fingerprint(model_or_config: Any) -> str:
    """sha256 of the canonical JSON of the base model's architecture config.

    Drops private keys (``_name_or_path``…), runtime switches and dropout rates; keeps everything
    that shapes the weights (sizes, vocabulary, activation, position type) plus the label count.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "to_dict"):
        raise ValueError(f"{type(model_or_config).__name__} has no transformers config to fingerprint")
    raw = config.to_dict()
    kept = {
        k: v
        for k, v in raw.items()
        if not k.startswith("_") and k not in _IRRELEVANT_KEYS and "dropout" not in k
    }
    kept["num_labels"] = len(raw.get("id2label") or {}) or raw.get("num_labels")
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _saved_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    return [name for name, _ in find_modules(model, config.modules_to_save)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters (not the frozen bases) and every parameter of ``modules_to_save``."""
    config = get_adapter_config(model)
    prefixes = [n + "." for n in adapter_layers(model)]
    saved = [n + "." for n in _saved_module_names(model, config)]
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        in_adapter = any(name.startswith(pre) and not name.startswith(pre + "base.") for pre in prefixes)
        if in_adapter or any(name.startswith(pre) for pre in saved):
            out[name] = p.detach()
    return out


def _head_copies(model: nn.Module) -> list[str]:
    markets: list[str] = []
    for module in model.modules():
        if isinstance(module, MarketHeads):
            markets.extend(m for m in module.copies if m not in markets)
    return markets


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name: str) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` to ``out_dir``; return it."""
    config = get_adapter_config(model)
    if not isinstance(base_model_name, str) or not base_model_name:
        raise ValueError(f"base_model_name must be a non-empty string, got {base_model_name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    layers = adapter_layers(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "config": config.to_dict(),
        "target_modules": list(config.target_modules),
        "modules_to_save": list(config.modules_to_save),
        "task_map": config.task_map,
        "head_copies": _head_copies(model),
        "adapted_layers": {n: [m.in_features, m.out_features] for n, m in layers.items()},
        "base_model_name": base_model_name,
        "base_config_fingerprint": base_config_fingerprint(model),
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return out


def read_adapter_config(in_dir: str | Path) -> dict[str, Any]:
    """The saved JSON, checked for format and for a task map consistent with its config."""
    path = Path(in_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {Path(in_dir)}: not an adapter directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is format {meta.get('format')!r} v{meta.get('format_version')}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    config = AdapterConfig.from_dict(meta["config"])
    if config.task_map != meta["task_map"]:
        raise ValueError(f"{path}: task_map {meta['task_map']} disagrees with its config {config.task_map}")
    meta["config"] = config
    return meta


def load_adapter(model_or_base: nn.Module, in_dir: str | Path) -> nn.Module:
    """Load a saved adapter onto a base model (injecting it) or an injected model; return the model."""
    meta = read_adapter_config(in_dir)
    config: AdapterConfig = meta["config"]
    model = model_or_base
    fingerprint = base_config_fingerprint(model)
    if fingerprint != meta["base_config_fingerprint"]:
        raise ValueError(
            f"adapter in {in_dir} was trained on a different base model: {meta['base_model_name']!r} "
            f"(config fingerprint {meta['base_config_fingerprint'][:12]}), this model's config has "
            f"fingerprint {fingerprint[:12]}; load it onto the base model it was trained on"
        )
    current = getattr(model, CONFIG_ATTR, None)
    if current is None:
        inject(model, config)
    elif current != config:
        raise ValueError(
            f"model already has a different adapter ({current.method}, markets {current.task_map}) "
            f"than {in_dir} ({config.method}, markets {config.task_map}): load onto a fresh base model"
        )
    for market in meta["head_copies"]:
        add_head_copy(model, market)
    tensors = load_file(str(Path(in_dir) / WEIGHTS_NAME))
    own = dict(model.named_parameters())
    expected = set(adapter_state_dict(model))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{in_dir}: weights do not fit this adapter: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            param = own[name]
            if param.shape != value.shape:
                raise ValueError(f"{in_dir}: {name} has shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    return model
