"""Each market's own adapter parameters get their own AdamW group: MTL-LoRA's Λ_t and w_t (scaled learning
rate, no weight decay), per-market LoRA's A_t and B_t (scaled learning rate, weight decay kept)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from relevance.model.adapters import AdapterConfig, inject, use_tasks
from relevance.training.optim import (
    is_market_lora_parameter,
    is_task_parameter,
    is_up_projection,
    linear_schedule,
    make_optimizer,
    param_groups,
)

LR = 1e-3


def tiny(method: str, **adapter: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=1)
    model = BertForSequenceClassification(cfg)
    inject(model, AdapterConfig(method, markets=("de", "fr"), **adapter))
    return model


def test_task_parameter_names() -> None:
    assert is_task_parameter("bert.encoder.layer.0.attention.self.query.lam.1")
    assert is_task_parameter("module.bert.encoder.layer.0.attention.self.key.mix_logits.0")  # under DDP
    assert not is_task_parameter("bert.encoder.layer.0.attention.self.query.lora_A")
    assert not is_task_parameter("bert.encoder.layer.0.attention.self.query.lora_B")
    assert not is_task_parameter("classifier.weight")
    assert not is_task_parameter("bert.encoder.layer.0.attention.self.query.lora_A.1")


def test_market_lora_parameter_names() -> None:
    assert is_market_lora_parameter("bert.encoder.layer.0.attention.self.query.lora_A.1")
    assert is_market_lora_parameter("module.bert.encoder.layer.3.output.dense.lora_B.0")
    assert not is_market_lora_parameter("bert.encoder.layer.0.attention.self.query.lora_A")  # shared LoRA / MTL-LoRA
    assert not is_market_lora_parameter("bert.encoder.layer.1.attention.self.query.lam.1")
    assert not is_market_lora_parameter("classifier.weight")


def test_groups_split_task_parameters_with_scaled_lr_and_no_decay() -> None:
    model = tiny("mtl-lora")
    groups = param_groups(model.named_parameters(), LR, 0.01, 10.0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    task = [p for n, p in trainable.items() if is_task_parameter(n)]
    assert len(groups) == 2 and len(task) == 4 * 2 * 2  # 4 modules × (Λ, w) × 2 markets
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in task}
    assert groups[1]["lr"] == pytest.approx(10 * LR) and groups[1]["weight_decay"] == 0.0
    assert groups[0]["lr"] == LR and groups[0]["weight_decay"] == 0.01
    assert len(groups[0]["params"]) + len(task) == len(trainable)
    assert len(param_groups(tiny("lora").named_parameters(), LR, 0.01, 10.0)) == 1  # nothing per market


def test_per_market_lora_pairs_get_their_scaled_lr_and_keep_decay() -> None:
    model = tiny("per-market-lora")
    groups = param_groups(model.named_parameters(), LR, 0.01, own_lr_scale=4.0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    market = [p for n, p in trainable.items() if is_market_lora_parameter(n)]
    assert len(groups) == 2 and len(market) == 4 * 2 * 2  # 4 modules × (A_t, B_t) × 2 markets
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in market}
    assert groups[1]["lr"] == pytest.approx(4 * LR) and groups[1]["weight_decay"] == 0.01
    assert len(groups[0]["params"]) + len(market) == len(trainable)


@pytest.mark.parametrize("method, expected", [
    # per group: (lr in units of LR, weight decay, number of B tensors or None for the shared rest);
    # 4 adapted modules, 2 markets, own_lr_scale 3, ratio 4
    ("lora", [(1, 0.01, None), (4, 0.01, 4)]),
    ("mtl-lora", [(1, 0.01, None), (3, 0.0, None), (4, 0.01, 4)]),
    ("per-market-lora", [(1, 0.01, None), (3, 0.01, None), (12, 0.01, 4 * 2)]),
    ("moelora", [(1, 0.01, None), (4, 0.01, 4)]),
])
def test_lora_plus_puts_every_up_projection_in_its_own_group(method: str, expected: list) -> None:
    """b_lr_ratio (LoRA+): B of every method at ratio × its group's rate, A and the rest unchanged."""
    model = tiny(method)
    groups = param_groups(model.named_parameters(), LR, 0.01, own_lr_scale=3.0, b_lr_ratio=4.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [(pytest.approx(g["lr"] / LR), g["weight_decay"]) for g in groups] == [(e[0], e[1]) for e in expected]
    for group, (_, _, n_b) in zip(groups, expected):
        is_b = [is_up_projection(names[id(p)]) for p in group["params"]]
        assert all(is_b) and len(is_b) == n_b if n_b is not None else not any(is_b)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    same = param_groups(model.named_parameters(), LR, 0.01, own_lr_scale=3.0, b_lr_ratio=1.0)
    assert len(same) == len(expected) - 1, "ratio 1: the groups of a run without LoRA+ (its checkpoints load)"


def test_one_adam_step_moves_b_at_the_lora_plus_rate() -> None:
    model = tiny("lora")
    layer = model.bert.encoder.layer[0].attention.self.query
    before_b, before_a = layer.lora_B.detach().clone(), layer.lora_A.detach().clone()
    opt = make_optimizer(model, LR, weight_decay=0.0, b_lr_ratio=8.0)
    model(input_ids=torch.randint(5, 50, (4, 8))).logits.sum().backward()
    opt.step()
    assert (layer.lora_B.detach() - before_b).abs().max().item() == pytest.approx(8 * LR, rel=0.01)
    assert (layer.lora_A.detach() - before_a).abs().max().item() == 0.0  # B was 0: A had no gradient yet


def test_one_adam_step_moves_lambda_at_the_scaled_rate() -> None:
    """Adam's first step moves each entry by ~lr·sign(grad): Λ by 10·lr, A by lr, whatever their scale."""
    model = tiny("mtl-lora")
    layer = model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        for b in (layer.lora_B,):
            b.normal_(0, 1.0)  # non-zero B so Λ and A get gradients
    before_lam, before_a = layer.lam[0].detach().clone(), layer.lora_A.detach().clone()
    opt = make_optimizer(model, LR, weight_decay=0.5, own_lr_scale=10.0)
    ids = torch.randint(5, 50, (4, 8))
    with use_tasks(model, torch.tensor([0, 0, 1, 1])):
        model(input_ids=ids).logits.sum().backward()
    opt.step()
    lam_step = (layer.lam[0].detach() - before_lam).abs().max().item()
    a_step = (layer.lora_A.detach() - before_a).abs().max().item()
    assert lam_step == pytest.approx(10 * LR, rel=0.01)  # no decay term on Λ (decay 0.5 would add 5e-4)
    assert LR < a_step <= LR * (1 + 0.5 * before_a.abs().max().item()) + 1e-7  # A: lr, plus its decay


def test_the_multi_tensor_step_is_the_per_tensor_step() -> None:
    """make_optimizer's foreach AdamW moves every parameter to the same bits as the per-tensor loop."""
    models = [tiny("mtl-lora"), tiny("mtl-lora")]
    opts = [make_optimizer(models[0], LR, weight_decay=0.1, own_lr_scale=3.0),
            torch.optim.AdamW(param_groups(models[1].named_parameters(), LR, 0.1, 3.0), foreach=False)]
    assert opts[0].defaults["foreach"] is True
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        ids, tasks = torch.randint(5, 50, (4, 8), generator=g), torch.randint(0, 2, (4,), generator=g)
        for model, opt in zip(models, opts):
            torch.manual_seed(step)  # the same dropout masks for both
            with use_tasks(model, tasks):
                model(input_ids=ids).logits.pow(2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = [(n, p) for n, p in models[0].named_parameters() if p.requires_grad]
    assert all(torch.equal(p, dict(models[1].named_parameters())[n]) for n, p in moved)
    assert any(not torch.equal(p, dict(tiny("mtl-lora").named_parameters())[n]) for n, p in moved)


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    f = linear_schedule(warmup=4, total=20)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # never 0: step 0 trains
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == 0.0 and f(25) == 0.0
    assert all(f(s) > f(s + 1) for s in range(4, 20))
    assert linear_schedule(0, 10)(0) == 1.0  # no warmup: the peak at once


def test_a_step_bumps_the_version_counters_the_scoring_cache_relies_on() -> None:
    """AdapterLayer._per_task reuses task matrices while every parameter's version is unchanged; CPU's fused
    AdamW (torch 2.13) updates in place without bumping it, so scores after a step would be stale."""
    model = tiny("mtl-lora")
    opt = make_optimizer(model, LR, weight_decay=0.1)
    with use_tasks(model, torch.tensor([0, 1])):
        model(input_ids=torch.randint(5, 50, (2, 8))).logits.sum().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    before = [p._version for p in params]
    opt.step()
    assert all(p._version > v for p, v in zip(params, before))
