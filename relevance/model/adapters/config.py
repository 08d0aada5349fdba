"""Adapter configuration: which method, its hyper-parameters, where it goes, which markets it serves.

The config is frozen because it travels with the weights (``adapter_config.json``): a model whose
config could change after injection would no longer describe its own parameters. Adding a market
therefore produces a *new* config with the market appended to :attr:`AdapterConfig.added_markets`.

Task order: the markets given at creation are sorted (``data_contracts.markets.task_map``); markets
added later with ``add_market`` are appended in the order they were added, so existing task indices
never move. :attr:`AdapterConfig.task_map` is that combined map and is what gets saved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from data_contracts.markets import task_map as sorted_task_map
from data_contracts.markets import validate_market

METHODS = ("mtl-lora", "lora", "per-market-lora", "multilora", "moelora")
TASK_METHODS = ("mtl-lora", "per-market-lora", "moelora")

# BERT-style attention projections (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, MiniLM all use these names).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("query", "key", "value", "attention.output.dense")
DEFAULT_MODULES_TO_SAVE: tuple[str, ...] = ("classifier",)

# When a config keeps the defaults above, these model types get their own names instead.
TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin"),
}
MODULES_TO_SAVE_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "distilbert": ("pre_classifier", "classifier"),
}


def _bad(name: str, value: object, expected: str) -> ValueError:
    return ValueError(f"AdapterConfig.{name}={value!r} is invalid: expected {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _name_tuple(name: str, value: object, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise _bad(name, value, "a tuple of module-name strings, e.g. ('query', 'value')")
    items = tuple(value)
    if not allow_empty and not items:
        raise _bad(name, value, "at least one module name")
    for item in items:
        if not isinstance(item, str) or not item or item.startswith(".") or item.endswith("."):
            raise _bad(name, value, "non-empty dotted module names such as 'attention.output.dense'")
    if len(set(items)) != len(items):
        raise _bad(name, value, "no duplicate names")
    return items


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of one adapter (DESIGN.md §4); bad values raise ``ValueError`` at creation.

    ``mixing_init_scale`` s sets MTL-LoRA's initial mixing logits w_t ~ U(±s/√n); the default 0.1 keeps
    p_t near uniform (softmax of ±0.58 at τ = 0.1) so markets start sharing the B_i, while breaking
    their symmetry so the B_i and w_t get different gradients. s = 1 is the reference code's init,
    near one-hot, which pins each market to a random B_i for a short budget; ``uniform_mixing_init``
    (s = 0) leaves the B_i identical forever (w_t's gradient is exactly zero). Issue 15 measured all three.

    ``shared_adapter`` (``per-market-lora`` only) makes each market's A_t, B_t a shared adapter plus the
    market's own departure (``PerTaskLoRALinear``); False, the default here, is the paper's independent
    per-task adapters and what every adapter saved before the field existed holds.

    ``multilora_n`` is MultiLoRA's number of parallel LoRAs (each of rank r); ``n_experts`` and
    ``task_embedding_dim`` are MOELoRA's expert count (each expert has rank r / n_experts, so it
    must divide r) and the size e of its per-market gate embedding.

    ``target_modules`` / ``modules_to_save`` are matched against module names by exact name or
    dotted suffix. Left at their defaults they are resolved per model type by ``inject`` (DistilBERT
    uses ``q_lin``…); the resolved names are what ``model.adapter_config`` and the saved JSON hold.
    """

    method: str
    markets: tuple[str, ...] = ()
    r: int = 8
    alpha: float = 16.0
    n_up: int = 3
    temperature: float = 0.1
    dropout: float = 0.05
    uniform_mixing_init: bool = False
    mixing_init_scale: float = 0.1
    shared_adapter: bool = False
    multilora_n: int = 3
    n_experts: int = 4
    task_embedding_dim: int = 64
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    modules_to_save: tuple[str, ...] = DEFAULT_MODULES_TO_SAVE
    added_markets: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _bad("method", self.method, f"one of {list(METHODS)}")
        for name in ("markets", "added_markets"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise _bad(name, value, "a tuple of market codes, e.g. ('de', 'us')")
            codes = tuple(value)
            for code in codes:
                try:
                    validate_market(code)
                except ValueError as exc:
                    raise _bad(name, value, f"valid market codes ({exc})") from None
            if len(set(codes)) != len(codes):
                raise _bad(name, value, "no duplicate market codes")
            object.__setattr__(self, name, codes)
        clash = set(self.markets) & set(self.added_markets)
        if clash:
            raise _bad("added_markets", self.added_markets, f"markets not already in markets {sorted(clash)}")
        if self.method in TASK_METHODS and not self.markets:
            raise _bad("markets", self.markets, f"at least one market for method {self.method!r}")
        if not _is_int(self.r) or self.r < 1:
            raise _bad("r", self.r, "a positive integer rank such as 8")
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise _bad("alpha", self.alpha, "a positive finite number such as 16.0")
        if not _is_int(self.n_up) or self.n_up < 1:
            raise _bad("n_up", self.n_up, "a positive integer number of up-projections such as 3")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise _bad("temperature", self.temperature, "a positive finite number such as 0.1")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise _bad("dropout", self.dropout, "a probability in [0, 1)")
        if not isinstance(self.uniform_mixing_init, bool):
            raise _bad("uniform_mixing_init", self.uniform_mixing_init, "True or False")
        if not _is_number(self.mixing_init_scale) or self.mixing_init_scale < 0:
            raise _bad("mixing_init_scale", self.mixing_init_scale, "a non-negative finite number such as 1.0")
        if not isinstance(self.shared_adapter, bool):
            raise _bad("shared_adapter", self.shared_adapter, "True or False")
        if self.shared_adapter and self.method != "per-market-lora":
            raise _bad("shared_adapter", self.shared_adapter,
                       f"False for method {self.method!r}: only 'per-market-lora' has per-market adapters to share one")
        self._check_baselines()
        object.__setattr__(
            self, "target_modules", _name_tuple("target_modules", self.target_modules, False)
        )
        object.__setattr__(
            self, "modules_to_save", _name_tuple("modules_to_save", self.modules_to_save, True)
        )
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "mixing_init_scale", float(self.mixing_init_scale))

    def _check_baselines(self) -> None:
        """MultiLoRA / MOELoRA fields; r % n_experts only matters (and is checked) for ``moelora``."""
        if not _is_int(self.multilora_n) or self.multilora_n < 1:
            raise _bad("multilora_n", self.multilora_n, "a positive integer number of parallel LoRAs such as 3")
        if not _is_int(self.n_experts) or self.n_experts < 1:
            raise _bad("n_experts", self.n_experts, "a positive integer number of experts such as 4")
        if not _is_int(self.task_embedding_dim) or self.task_embedding_dim < 1:
            raise _bad("task_embedding_dim", self.task_embedding_dim, "a positive integer such as 64")
        if self.method == "moelora" and self.r % self.n_experts:
            raise _bad(
                "n_experts", self.n_experts,
                f"a divisor of r={self.r} for method 'moelora' (each expert has rank r / n_experts)",
            )

    @property
    def is_task_conditioned(self) -> bool:
        """True when forward passes need per-example task ids (all but ``lora`` and ``multilora``)."""
        return self.method in TASK_METHODS

    @property
    def task_map(self) -> dict[str, int]:
        """Market → task index: creation markets sorted, then added markets in order of addition."""
        if not self.markets:
            return {}
        mapping = sorted_task_map(self.markets)
        for code in self.added_markets:
            mapping[code] = len(mapping)
        return mapping

    @property
    def num_tasks(self) -> int:
        """T, the number of per-market parameter sets (1 for task-agnostic ``lora``, ``multilora``)."""
        return len(self.task_map) if self.is_task_conditioned else 1

    @property
    def scaling(self) -> float:
        """α / r, the factor in front of every low-rank update."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``from_dict`` inverts it."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build a config from ``to_dict`` output; unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"AdapterConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}; known fields: {sorted(known)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)
