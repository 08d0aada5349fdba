"""MultiLoRA and MOELoRA (the MTL-LoRA paper's baselines): layers against slow per-example references,
initialisation (no-op yet trainable), merge / export, market growth, config errors, parameter counts.

Model-level merge, merged copies, save/load and injection of every method are covered by the
parametrised tests in test_adapter_merge_io.py and test_adapter_inject.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_helpers import inputs_for, logits, randomize, tiny_bert
from torch import nn
from transformers import AutoModelForSequenceClassification

from relevance.model.adapters import (
    AdapterConfig,
    MoELoRALinear,
    MultiLoRALinear,
    add_market,
    adapter_layers,
    expected_trainable_parameters,
    export_merged,
    inject,
    train_new_markets_only,
    use_tasks,
)

D_IN, D_OUT, T, R = 24, 20, 4, 4
IDS = torch.tensor([0, 3, 1, 3, 2, 0])
KINDS = ["multilora", "moelora"]
MARKETS = ("us", "de", "fr")  # de 0, fr 1, us 2


def make(kind: str, dropout: float = 0.0, seed: int = 0, random: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT)
    if kind == "multilora":
        layer: nn.Module = MultiLoRALinear(base, r=R, alpha=8.0, n=3, dropout=dropout)
    else:
        layer = MoELoRALinear(base, T, r=R, alpha=8.0, n_experts=2, task_dim=5, dropout=dropout)
    if random:
        randomize(layer, seed)
    return layer


def reference(layer: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Slow per-example loop straight from the update equations (no delta_weight, no batching)."""
    rows = []
    for b in range(x.shape[0]):
        t = int(ids[b])
        xb = x[b].reshape(-1, D_IN)  # (L, d_in)
        h = xb @ layer.base.weight.T + layer.base.bias
        s = layer.scaling
        if isinstance(layer, MultiLoRALinear):
            for i in range(layer.n):  # h += (α/r) s_i ⊙ (B_i A_i x)
                h = h + s * layer.lora_scale[i] * (xb @ layer.lora_A[i].T @ layer.lora_B[i].T)
        else:
            g = torch.softmax(layer.gate @ layer.task_emb[t], dim=0)  # g_t = softmax(W_g emb[t])
            for i in range(layer.n_experts):  # h += (α/r) g_t,i B_i A_i x
                h = h + s * g[i] * (xb @ layer.lora_A[i].T @ layer.lora_B[i].T)
        rows.append(h.reshape(*x.shape[1:-1], D_OUT))
    return torch.stack(rows)


def run(layer: nn.Module, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    layer._task_ids = ids if layer.task_conditioned else None
    try:
        return layer(x)
    finally:
        layer._task_ids = None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(6, 5), (6,)], ids=["3d", "2d"])
def test_layer_matches_per_example_reference(kind: str, shape: tuple[int, ...]) -> None:
    layer = make(kind)
    x = torch.randn(*shape, D_IN)
    with torch.no_grad():
        got = run(layer, x, IDS)
        want = reference(layer, x, IDS)
    assert got.shape == (*shape, D_OUT)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, layer.base(x), atol=1e-3), "adapter must change the output"


def test_moelora_mixed_batch_equals_separate_batches_and_markets_differ() -> None:
    layer = make("moelora", seed=1)
    x = torch.randn(6, 5, D_IN)
    with torch.no_grad():
        mixed = run(layer, x, IDS)
        for t in IDS.unique().tolist():
            rows = (IDS == t).nonzero().squeeze(1)
            torch.testing.assert_close(mixed[rows], run(layer, x[rows], IDS[rows]), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(mixed, run(layer, x, torch.zeros(6, dtype=torch.long)), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_weight_is_the_effective_update_and_merge_unmerge_restores(kind: str) -> None:
    layer = make(kind, seed=2)
    x = torch.randn(6, 3, D_IN)
    before = layer.base.weight.detach().clone()
    with torch.no_grad():
        got = run(layer, x, IDS)
        for b, t in enumerate(IDS.tolist()):
            w = layer.base.weight + layer.delta_weight(t)
            torch.testing.assert_close(got[b], x[b] @ w.T + layer.base.bias, atol=1e-5, rtol=1e-5)
        want = run(layer, x, torch.full((6,), 2))
        layer.merge(2)
        torch.testing.assert_close(run(layer, x, torch.full((6,), 2)), want, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base.weight, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_layer_is_the_base_even_with_dropout(kind: str) -> None:
    layer = make(kind, dropout=0.5, random=False).train()
    x = torch.randn(4, 3, D_IN)
    with torch.no_grad():
        assert torch.equal(run(layer, x, torch.tensor([0, 1, 2, 3])), layer.base(x))
        assert not layer.delta_weight(1).any()


def test_initialisation_follows_the_docstrings() -> None:
    multi = make("multilora", random=False)
    assert not multi.lora_scale.any() and multi.lora_B.abs().min() > 0  # s = 0, B random
    assert multi.lora_B.abs().max() <= R ** -0.5 and multi.lora_A.abs().max() <= D_IN ** -0.5
    moe = make("moelora", random=False)
    assert not moe.lora_B.any() and moe.expert_r == 2 and moe.lora_A.shape == (2, 2, D_IN)
    assert 0.005 < moe.lora_A.std() < 0.02  # N(0, 0.01²)
    assert moe.gate.abs().min() > 0 and all(e.abs().min() > 0 for e in moe.task_emb)


@pytest.mark.parametrize("method", KINDS)
def test_gradients_reach_every_trainable_parameter_after_one_step_from_init(method: str) -> None:
    """At init one factor of each product is zero (s for MultiLoRA, B for MOELoRA), so the first
    backward moves only that factor; after one optimizer step every adapter parameter trains."""
    model = inject(tiny_bert(), AdapterConfig(method, MARKETS, r=4, n_experts=2, dropout=0.0))
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    first_movers = "lora_scale" if method == "multilora" else "lora_B"
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        inputs = inputs_for(model, seed=step)  # fresh random inputs each step
        with use_tasks(model, ids):
            model(**inputs).logits.sub(1.0).pow(2).sum().backward()
        zero = sorted(n for n, p in trainable.items() if p.grad is None or not p.grad.any())
        if step == 0:
            assert zero and all(".lora_" in n or ".gate" in n or ".task_emb." in n for n in zero), zero
            assert not any(first_movers in n for n in zero), zero
        else:
            assert zero == [], f"no gradient after one step: {zero}"
        opt.step()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)


@pytest.mark.parametrize("method", KINDS)
def test_injected_model_starts_as_the_base_model(method: str) -> None:
    base = tiny_bert(3)
    inputs = inputs_for(base)
    with torch.no_grad():
        want = base(**inputs).logits
    model = inject(base, AdapterConfig(method, MARKETS))
    assert torch.equal(logits(model, inputs, torch.tensor([0, 1, 2, 2, 1, 0])), want)


@pytest.mark.parametrize("method", KINDS)
def test_export_merged_reloads_with_plain_transformers(method: str, tmp_path: Path) -> None:
    model = inject(tiny_bert(4), AdapterConfig(method, MARKETS))
    randomize(model, 4)
    inputs = inputs_for(model)
    want = logits(model, inputs, torch.full((6,), 1))
    out = export_merged(model, "fr", tmp_path / "fr")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, want, atol=1e-5, rtol=1e-5)


def test_moelora_add_market_keeps_existing_markets_and_trains_only_its_embedding() -> None:
    model = inject(tiny_bert(5), AdapterConfig("moelora", MARKETS))
    randomize(model, 5)
    inputs = inputs_for(model)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    before = logits(model, inputs, ids)
    assert add_market(model, "at") == 3
    assert torch.equal(logits(model, inputs, ids), before)  # bit-identical
    for layer in adapter_layers(model).values():
        torch.testing.assert_close(layer.gates()[3], torch.full((layer.n_experts,), 1 / layer.n_experts))
    train_new_markets_only(model, ["at"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith("task_emb.3") for n in trainable), trainable


def test_multilora_has_no_markets_to_add_and_ignores_task_ids() -> None:
    model = inject(tiny_bert(), AdapterConfig("multilora", MARKETS))
    randomize(model, 6)
    inputs = inputs_for(model)
    torch.testing.assert_close(logits(model, inputs, None), logits(model, inputs, torch.arange(6) % 3))
    with pytest.raises(ValueError, match="shares one adapter.*'moelora'"):
        add_market(model, "at")


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_forward_runs(kind: str) -> None:
    x = torch.randn(6, 5, D_IN)
    with torch.no_grad():
        want = run(make(kind), x, IDS)
        out = run(make(kind).to(torch.bfloat16), x.to(torch.bfloat16), IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)


def test_moelora_inference_cache_follows_an_optimizer_step() -> None:
    layer = make("moelora", seed=9)
    x = torch.randn(len(IDS), 3, D_IN)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    with torch.inference_mode():
        before = run(layer, x, IDS)
    run(layer, x, IDS).square().sum().backward()
    opt.step()
    with torch.inference_mode():
        after = run(layer, x, IDS)
        torch.testing.assert_close(after, reference(layer, x, IDS), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after, before)


BAD = [
    ({"method": "moelora", "r": 8, "n_experts": 3}, "n_experts", "divisor of r=8"),
    ({"method": "moelora", "n_experts": 0}, "n_experts", "positive integer"),
    ({"method": "multilora", "multilora_n": 0}, "multilora_n", "positive integer"),
    ({"method": "multilora", "multilora_n": 2.0}, "multilora_n", "positive integer"),
    ({"method": "moelora", "task_embedding_dim": True}, "task_embedding_dim", "positive integer"),
    ({"method": "moelora", "markets": ()}, "markets", "at least one market"),
]


@pytest.mark.parametrize(("kwargs", "field", "expected"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_config_errors_name_the_field_and_value(kwargs: dict, field: str, expected: str) -> None:
    kwargs = {"markets": MARKETS, **kwargs}
    with pytest.raises(ValueError, match=f"AdapterConfig.{field}=.*{expected}"):
        AdapterConfig(**kwargs)


def test_config_defaults_round_trip_and_non_moelora_ignores_divisibility() -> None:
    c = AdapterConfig("moelora", MARKETS)
    assert (c.n_experts, c.task_embedding_dim, c.multilora_n) == (4, 64, 3)
    assert c.is_task_conditioned and c.num_tasks == 3
    assert AdapterConfig.from_dict(c.to_dict()) == c
    m = AdapterConfig("multilora", MARKETS, r=6)  # n_experts=4 does not divide 6: irrelevant here
    assert not m.is_task_conditioned and m.num_tasks == 1
    with pytest.raises(ValueError, match="n_experts=4 must divide r=6"):
        MoELoRALinear(nn.Linear(4, 4), 2, r=6, n_experts=4)


def test_closed_form_numbers() -> None:
    multi = AdapterConfig("multilora", MARKETS)  # r 8, n 3
    assert expected_trainable_parameters(multi, [(384, 384)]) == 3 * (8 * 384 + 8 * 384 + 384)
    moe = AdapterConfig("moelora", MARKETS)  # r 8 (4 experts of rank 2), e 64, T 3
    assert expected_trainable_parameters(moe, [(384, 384)]) == 8 * 384 + 384 * 8 + 4 * 64 + 3 * 64
