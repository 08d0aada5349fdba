"""MTL-LoRA's pull (``relevance.training.task_pull``): after a step, each trainable Λ_t and w_t moves by
decay × its group's learning rate toward I / uniform mixing (or the layer's mean over markets); frozen markets
stay put; one half can be pulled alone."""

from __future__ import annotations

import pytest
import torch
from test_optim import LR, tiny  # the same tiny BERT with adapters

from relevance.training.optim import make_optimizer
from relevance.training.task_pull import neutral_pull


def _far_from_neutral(model: torch.nn.Module) -> list:
    from relevance.model.adapters.layers import MTLLoRALinear

    layers = [m for m in model.modules() if isinstance(m, MTLLoRALinear)]
    with torch.no_grad():
        for m in layers:
            for lam, w in zip(m.lam, m.mix_logits):
                lam.copy_(torch.randn_like(lam))  # fresh, far from I and from each other
                w.copy_(torch.randn_like(w))
    return layers


def test_neutral_pull_moves_lambda_toward_identity_and_mixing_toward_uniform() -> None:
    model = tiny("mtl-lora")
    layers = _far_from_neutral(model)
    layers[0].lam[1].requires_grad_(False)  # a frozen market (add-market) is left alone
    frozen = layers[0].lam[1].detach().clone()
    opt = make_optimizer(model, LR, 0.01, 10.0)
    assert neutral_pull(model, opt, None) is None and neutral_pull(model, opt, 0.0) is None
    assert neutral_pull(tiny("lora"), make_optimizer(tiny("lora"), LR, 0.01), 1.0) is None  # nothing per market
    with pytest.raises(ValueError, match="'zero'"):
        neutral_pull(model, opt, 1.0, "zero")
    pull = neutral_pull(model, opt, 20.0)
    rate = 20.0 * 10 * LR  # decay × the Λ_t/w_t group's lr
    lam, w = layers[1].lam[0], layers[1].mix_logits[0]
    lam0, w0 = lam.detach().clone(), w.detach().clone()
    p0 = torch.softmax(w0 / layers[1].temperature, -1)
    pull()
    eye = torch.eye(lam.shape[0])
    torch.testing.assert_close(lam.detach(), lam0 + rate * (eye - lam0))
    torch.testing.assert_close(w.detach(), (1 - rate) * w0)
    assert torch.equal(layers[0].lam[1], frozen)
    p1 = torch.softmax(w.detach() / layers[1].temperature, -1)
    assert (p1 - 1 / 3).abs().max() < (p0 - 1 / 3).abs().max()  # closer to uniform mixing
    opt.param_groups[1]["lr"] = 0.0  # the schedule's lr: no step, no pull
    before = lam.detach().clone()
    pull()
    assert torch.equal(lam.detach(), before)


def test_neutral_pull_toward_the_mean_keeps_what_markets_share() -> None:
    model = tiny("mtl-lora")
    layers = _far_from_neutral(model)
    layers[0].lam[1].requires_grad_(False)  # frozen: not moved, but part of the mean the others move toward
    opt = make_optimizer(model, LR, 0.01, 10.0)
    pull = neutral_pull(model, opt, 20.0, "mean")
    rate = 20.0 * 10 * LR
    before = [[x.detach().clone() for x in m.lam] for m in layers]
    w_before = [[x.detach().clone() for x in m.mix_logits] for m in layers]
    pull()
    for m, lams, ws in zip(layers, before, w_before):
        mean, w_mean = torch.stack(lams).mean(0), torch.stack(ws).mean(0)
        for t, (lam0, w0) in enumerate(zip(lams, ws)):
            frozen = m is layers[0] and t == 1
            expected = lam0 if frozen else lam0 + rate * (mean - lam0)
            torch.testing.assert_close(m.lam[t].detach(), expected)
            torch.testing.assert_close(m.mix_logits[t].detach(), w0 + rate * (w_mean - w0))
        if m is not layers[0]:  # all markets trainable: their mean itself does not move
            torch.testing.assert_close(torch.stack([x.detach() for x in m.lam]).mean(0), mean)


@pytest.mark.parametrize("only", ["lam", "mix"])
def test_neutral_pull_can_pull_one_half_alone(only: str) -> None:
    model = tiny("mtl-lora")
    layers = _far_from_neutral(model)
    opt = make_optimizer(model, LR, 0.01, 10.0)
    with pytest.raises(ValueError, match="'neither'"):
        neutral_pull(model, opt, 1.0, only="neither")
    lam0 = [x.detach().clone() for m in layers for x in m.lam]
    w0 = [x.detach().clone() for m in layers for x in m.mix_logits]
    neutral_pull(model, opt, 20.0, only=only)()
    lam1 = [x.detach() for m in layers for x in m.lam]
    w1 = [x.detach() for m in layers for x in m.mix_logits]
    assert all(torch.equal(a, b) for a, b in zip(w0 if only == "lam" else lam0, w1 if only == "lam" else lam1))
    assert not any(torch.equal(a, b) for a, b in zip(lam0 if only == "lam" else w0, lam1 if only == "lam" else w1))


def test_per_market_lora_pull_moves_a_and_b_toward_their_mean_at_their_own_rates() -> None:
    from relevance.model.adapters.layers import PerTaskLoRALinear

    model = tiny("per-market-lora")
    layers = [m for m in model.modules() if isinstance(m, PerTaskLoRALinear)]
    with torch.no_grad():
        for m in layers:
            for p in (*m.lora_A, *m.lora_B):
                p.copy_(torch.randn_like(p))  # fresh, non-zero B: every market's adapter differs
    layers[0].lora_B[1].requires_grad_(False)  # frozen (add-market): not moved, still part of the mean
    opt = make_optimizer(model, LR, 0.01, 2.0, b_lr_ratio=4.0)  # LoRA+: B's group has its own rate
    with pytest.raises(ValueError, match="only 'mean'"):
        neutral_pull(model, opt, 1.0, "identity", only="adapter")
    assert neutral_pull(tiny("mtl-lora"), make_optimizer(tiny("mtl-lora"), LR, 0.01), 1.0, "mean", "adapter") is None
    before = [[[x.detach().clone() for x in lst] for lst in (m.lora_A, m.lora_B)] for m in layers]
    neutral_pull(model, opt, 20.0, "mean", only="adapter")()
    for m, lists in zip(layers, before):
        for lst, old, rate in zip((m.lora_A, m.lora_B), lists, (20.0 * 2 * LR, 20.0 * 2 * 4 * LR)):
            mean = torch.stack(old).mean(0)
            for t, x0 in enumerate(old):
                frozen = lst is layers[0].lora_B and t == 1
                torch.testing.assert_close(lst[t].detach(), x0 if frozen else x0 + rate * (mean - x0))


def test_with_a_shared_adapter_the_pull_moves_each_departure_toward_zero_and_leaves_the_shared_one() -> None:
    from relevance.model.adapters.layers import PerTaskLoRALinear

    model = tiny("per-market-lora", shared_adapter=True)
    layers = [m for m in model.modules() if isinstance(m, PerTaskLoRALinear)]
    with torch.no_grad():
        for p in (p for m in layers for p in m.parameters() if p.requires_grad):
            p.copy_(torch.randn_like(p))  # shared adapter and departures all non-zero
    opt = make_optimizer(model, LR, 0.01, 2.0, b_lr_ratio=4.0)
    with pytest.raises(ValueError, match="only 'identity'"):
        neutral_pull(model, opt, 1.0, "mean", only="adapter")
    shared = [p.detach().clone() for m in layers for p in m.shared.parameters()]
    before = [[[x.detach().clone() for x in lst] for lst in (m.lora_A, m.lora_B)] for m in layers]
    neutral_pull(model, opt, 20.0, "identity", only="adapter")()
    assert all(torch.equal(a, p) for a, p in zip(shared, (p for m in layers for p in m.shared.parameters())))
    for m, lists in zip(layers, before):
        for lst, old, rate in zip((m.lora_A, m.lora_B), lists, (20.0 * 2 * LR, 20.0 * 2 * 4 * LR)):
            for t, x0 in enumerate(old):
                torch.testing.assert_close(lst[t].detach(), (1 - rate) * x0)
    neutral_pull(model, opt, 1e6, "identity", only="adapter")()  # D·ρ ≫ 1: all the way to 0, not past it
    assert all(not p.any() for m in layers for lst in (m.lora_A, m.lora_B) for p in lst)
