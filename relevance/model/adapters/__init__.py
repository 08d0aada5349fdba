"""Adapters for transformers encoders: MTL-LoRA, shared LoRA, per-market LoRA and the MTL-LoRA
paper's baselines MultiLoRA and MOELoRA (DESIGN.md §4).

Typical use::

    config = AdapterConfig("mtl-lora", markets=("de", "fr", "us"))
    model = inject(AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), config)
    with use_tasks(model, market_task_ids(model, batch_markets)):
        logits = model(**batch).logits
    export_merged(model, "de", out_dir, tokenizer)   # plain transformers model for one market
"""

from .baselines import MoELoRALinear, MultiLoRALinear
from .config import METHODS, AdapterConfig
from .growth import add_market, own_heads, train_new_markets_only
from .heads import MarketHeads
from .inject import (
    adapter_layers,
    expected_trainable_parameters,
    get_adapter_config,
    inject,
    market_task_ids,
    trainable_parameters,
    use_tasks,
)
from .layers import AdapterLayer, LoRALinear, MTLLoRALinear, PerTaskLoRALinear
from .merge import export_merged, merge, merged_copy, models_to_serve, unmerge
from .persistence import (
    adapter_state_dict,
    base_config_fingerprint,
    load_adapter,
    read_adapter_config,
    save_adapter,
)

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "LoRALinear",
    "MTLLoRALinear",
    "MarketHeads",
    "MoELoRALinear",
    "MultiLoRALinear",
    "PerTaskLoRALinear",
    "adapter_layers",
    "adapter_state_dict",
    "add_market",
    "base_config_fingerprint",
    "expected_trainable_parameters",
    "export_merged",
    "get_adapter_config",
    "inject",
    "load_adapter",
    "market_task_ids",
    "merge",
    "merged_copy",
    "models_to_serve",
    "own_heads",
    "read_adapter_config",
    "save_adapter",
    "train_new_markets_only",
    "trainable_parameters",
    "unmerge",
    "use_tasks",
]
