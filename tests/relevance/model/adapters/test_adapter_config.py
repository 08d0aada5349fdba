"""AdapterConfig validation (every bad-argument path names field and value) and serialisation."""

from __future__ import annotations

import json
import math

import pytest

from relevance.model.adapters import AdapterConfig

OK = {"method": "mtl-lora", "markets": ("us", "de", "fr")}


def test_defaults_follow_design() -> None:
    c = AdapterConfig(**OK)
    assert (c.r, c.alpha, c.n_up, c.temperature, c.dropout) == (8, 16.0, 3, 0.1, 0.05)
    assert c.target_modules == ("query", "key", "value", "attention.output.dense")
    assert c.modules_to_save == ("classifier",)
    assert c.scaling == 2.0 and c.is_task_conditioned and c.num_tasks == 3


def test_task_map_sorted_then_added_markets_appended() -> None:
    c = AdapterConfig("per-market-lora", ["us", "de", "fr"], added_markets=("at",))
    assert c.markets == ("us", "de", "fr")
    assert c.task_map == {"de": 0, "fr": 1, "us": 2, "at": 3}
    assert c.num_tasks == 4


def test_lora_ignores_tasks() -> None:
    c = AdapterConfig("lora")
    assert c.task_map == {} and c.num_tasks == 1 and not c.is_task_conditioned
    assert AdapterConfig("lora", ("us", "de")).num_tasks == 1


def test_round_trip_through_json() -> None:
    c = AdapterConfig("mtl-lora", ("us", "pt-br"), r=4, alpha=8, uniform_mixing_init=True,
                      target_modules=("query", "value"), modules_to_save=("classifier", "pooler"),
                      added_markets=("jp",))
    again = AdapterConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.task_map == c.task_map
    assert isinstance(again.alpha, float)


BAD = [
    ("method", "qlora"),
    ("markets", "us"),
    ("markets", ("US",)),
    ("markets", ("us", "us")),
    ("markets", ()),
    ("markets", 5),
    ("r", 0),
    ("r", 1.5),
    ("r", True),
    ("alpha", 0),
    ("alpha", -1.0),
    ("alpha", math.nan),
    ("alpha", math.inf),
    ("alpha", "16"),
    ("n_up", 0),
    ("temperature", 0.0),
    ("temperature", -0.1),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("uniform_mixing_init", "yes"),
    ("mixing_init_scale", -0.1),
    ("mixing_init_scale", math.nan),
    ("mixing_init_scale", "0.1"),
    ("shared_adapter", "yes"),
    ("shared_adapter", True),  # OK is mtl-lora: only per-market-lora has per-market adapters to share one
    ("target_modules", ()),
    ("target_modules", "query"),
    ("target_modules", ("query", "")),
    ("target_modules", ("query", ".key")),
    ("target_modules", ("query", "query")),
    ("modules_to_save", "classifier"),
    ("modules_to_save", (3,)),
    ("added_markets", ("us",)),
    ("added_markets", ("X",)),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_values_name_field_and_value(field: str, value: object) -> None:
    kwargs = dict(OK)
    kwargs[field] = value
    with pytest.raises(ValueError) as info:
        AdapterConfig(**kwargs)
    assert f"AdapterConfig.{field}=" in str(info.value)
    assert repr(value)[:10] in str(info.value) or repr(tuple(value))[:10] in str(info.value)


def test_an_adapter_saved_before_shared_adapter_existed_reads_as_independent() -> None:
    saved = AdapterConfig("per-market-lora", ("us", "de"), shared_adapter=True).to_dict()
    assert saved["shared_adapter"] is True and AdapterConfig.from_dict(saved).shared_adapter
    del saved["shared_adapter"]  # what every adapter_config.json written before the field holds
    assert AdapterConfig.from_dict(saved).shared_adapter is False


def test_from_dict_rejects_unknown_keys_and_non_mappings() -> None:
    with pytest.raises(ValueError, match="unknown AdapterConfig fields \\['rank'\\]"):
        AdapterConfig.from_dict({"method": "lora", "rank": 8})
    with pytest.raises(ValueError, match="mapping"):
        AdapterConfig.from_dict(["lora"])  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    c = AdapterConfig(**OK)
    with pytest.raises(AttributeError):
        c.r = 4  # type: ignore[misc]
