"""Adding a market: neutral start, new-markets-only training keeps existing markets bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_helpers import SHARED_PML, adapter_config, inputs_for, logits, randomize, tiny_bert
from torch import nn

from relevance.model.adapters import (
    AdapterConfig,
    MarketHeads,
    MTLLoRALinear,
    PerTaskLoRALinear,
    adapter_layers,
    add_market,
    expected_trainable_parameters,
    get_adapter_config,
    inject,
    load_adapter,
    merged_copy,
    save_adapter,
    train_new_markets_only,
    trainable_parameters,
    use_tasks,
)

MARKETS = ("us", "de", "fr")  # de 0, fr 1, us 2; added: jp 3, at 4
OLD = torch.tensor([0, 1, 2, 2, 1, 0])


def trained(method: str, seed: int = 0) -> nn.Module:
    model = inject(tiny_bert(seed), adapter_config(method, MARKETS))
    randomize(model, seed + 20)
    return model


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    """A few AdamW steps with weight decay, every parameter handed to the optimizer."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(steps):
        inputs = inputs_for(model, n=len(ids), seed=100 + step)
        with use_tasks(model, ids):
            loss = model(**inputs).logits.pow(2).mean() - model(**inputs).logits.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", ["mtl-lora", "per-market-lora", SHARED_PML])
@pytest.mark.parametrize("head", [False, True])
def test_existing_markets_stay_bit_identical(method: str, head: bool) -> None:
    model = trained(method)
    inputs = inputs_for(model, seed=7)
    before = logits(model, inputs, OLD)
    assert add_market(model, "jp") == 3
    config = get_adapter_config(model)
    assert config.task_map == {"de": 0, "fr": 1, "us": 2, "jp": 3}
    assert torch.equal(logits(model, inputs, OLD), before)
    jp = torch.full((6,), 3)
    start = logits(model, inputs, jp)
    train_new_markets_only(model, ["jp"], head=head)
    train_steps(model, torch.tensor([3, 0, 3, 1, 2, 3]))
    assert torch.equal(logits(model, inputs, OLD), before), "an existing market moved"
    assert not torch.allclose(logits(model, inputs, jp), start), "the new market did not train"
    per_layer = [(m.in_features, m.out_features) for m in adapter_layers(model).values()]
    own = {"mtl-lora": 8 * 8 + 3, "per-market-lora": 8 * (32 + 32), SHARED_PML: 8 * (32 + 32)}[method] * len(per_layer)
    heads = sum(p.numel() for p in model.classifier.copies.parameters()) if head else 0
    assert trainable_parameters(model) == own + heads
    assert isinstance(model.classifier, MarketHeads) == head


def test_mtl_new_market_starts_neutral() -> None:
    model = trained("mtl-lora", seed=1)
    add_market(model, "jp")
    for layer in adapter_layers(model).values():
        assert isinstance(layer, MTLLoRALinear)
        assert torch.equal(layer.lam[3], torch.eye(8))
        assert torch.equal(layer.mix_logits[3], torch.zeros(3))
        # neutral: uniform mix of the trained B_i applied to the shared A
        want = layer.scaling * layer.lora_B.mean(0) @ layer.lora_A
        torch.testing.assert_close(layer.delta_weight(3), want, atol=1e-6, rtol=1e-5)


def test_per_market_new_market_with_a_shared_adapter_starts_as_it() -> None:
    model = trained(SHARED_PML, seed=2)
    add_market(model, "jp")
    for layer in adapter_layers(model).values():
        assert isinstance(layer, PerTaskLoRALinear)
        assert not layer.lora_A[3].any() and not layer.lora_B[3].any()  # no departure yet
        want = layer.scaling * layer.shared.lora_B @ layer.shared.lora_A
        torch.testing.assert_close(layer.delta_weight(3), want)
        assert layer.delta_weight(3).any()


def test_per_market_new_market_starts_as_base() -> None:
    model = trained("per-market-lora", seed=2)
    add_market(model, "jp")
    for layer in adapter_layers(model).values():
        assert isinstance(layer, PerTaskLoRALinear)
        assert not layer.lora_B[3].any() and layer.lora_A[3].abs().sum() > 0
        assert not layer.delta_weight(3).any()


def test_head_copy_serves_new_market_and_survives_merge_and_save(tmp_path: Path) -> None:
    model = trained("mtl-lora", seed=3)
    add_market(model, "jp")
    train_new_markets_only(model, ["jp"], head=True)
    train_steps(model, torch.tensor([3, 3, 0, 2]), steps=2)
    inputs = inputs_for(model, seed=9)
    mixed = torch.tensor([3, 0, 3, 1, 2, 3])
    want = logits(model, inputs, mixed)
    for market, t in (("jp", 3), ("fr", 1)):
        plain = merged_copy(model, market)
        assert isinstance(plain.classifier, nn.Linear)
        with torch.no_grad():
            got = plain(**inputs).logits
        torch.testing.assert_close(got[mixed == t], want[mixed == t], atol=1e-5, rtol=1e-5)
    save_adapter(model, tmp_path, base_model_name="tiny-bert")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["task_map"] == {"de": 0, "fr": 1, "us": 2, "jp": 3}
    assert meta["head_copies"] == ["jp"] and meta["config"]["added_markets"] == ["jp"]
    loaded = load_adapter(tiny_bert(3), tmp_path)
    assert torch.equal(logits(loaded, inputs, mixed), want)
    with pytest.raises(ValueError, match="per-market copies for \\['jp'\\]"), torch.no_grad():
        loaded.classifier(torch.randn(2, 32))


def test_second_added_market_keeps_first_added_one_identical() -> None:
    model = trained("mtl-lora", seed=4)
    add_market(model, "jp")
    train_new_markets_only(model, ["jp"])
    train_steps(model, torch.tensor([3, 3, 1]), steps=2)
    inputs = inputs_for(model)
    ids = torch.tensor([3, 0, 1, 2, 3, 3])
    before = logits(model, inputs, ids)
    assert add_market(model, "at") == 4
    train_new_markets_only(model, ["at"])
    train_steps(model, torch.tensor([4, 3, 4]), steps=2)
    assert torch.equal(logits(model, inputs, ids), before)
    config = get_adapter_config(model)
    assert config.added_markets == ("jp", "at") and config.num_tasks == 5
    shapes = [(32, 32)] * 8
    assert expected_trainable_parameters(config, shapes) == 8 * (8 * 32 + 3 * 8 * 32 + 5 * 64 + 5 * 3)


def test_add_market_errors() -> None:
    model = trained("mtl-lora")
    with pytest.raises(ValueError, match="'de' is already task 0"):
        add_market(model, "de")
    with pytest.raises(ValueError, match="invalid market code 'JP'"):
        add_market(model, "JP")
    lora = trained("lora")
    with pytest.raises(ValueError, match="shares one adapter"):
        add_market(lora, "jp")
    with pytest.raises(ValueError, match="no per-market parameters"):
        train_new_markets_only(lora, ["us"])
    with pytest.raises(ValueError, match="unknown markets \\['jp'\\]"):
        train_new_markets_only(model, ["jp"])
    with pytest.raises(ValueError, match="non-empty list"):
        train_new_markets_only(model, [])
    with pytest.raises(ValueError, match="non-empty list"):
        train_new_markets_only(model, "de")  # type: ignore[arg-type]
    from relevance.model.adapters import merge

    merge(model, "de")
    with pytest.raises(ValueError, match="merged model"):
        add_market(model, "jp")
    no_head = inject(tiny_bert(), AdapterConfig("mtl-lora", MARKETS, modules_to_save=()))
    with pytest.raises(ValueError, match="no head modules"):
        train_new_markets_only(no_head, ["de"], head=True)
