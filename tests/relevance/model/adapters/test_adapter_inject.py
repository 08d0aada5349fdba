"""Injection into BERT, DistilBERT and XLM-RoBERTa; task routing; mixed batches; parameter counts."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import ARCHS, SHARED_PML, adapter_config, inputs_for, logits, randomize, tiny_bert
from torch import nn

from relevance.model.adapters import (
    AdapterConfig,
    AdapterLayer,
    MTLLoRALinear,
    adapter_layers,
    expected_trainable_parameters,
    get_adapter_config,
    inject,
    market_task_ids,
    trainable_parameters,
    use_tasks,
)

MARKETS = ("us", "de", "fr")  # task map: de 0, fr 1, us 2
METHODS = ["mtl-lora", "lora", "per-market-lora", SHARED_PML, "multilora", "moelora"]


def adapted(arch: str = "bert", method: str = "mtl-lora", seed: int = 0, **kw: object) -> nn.Module:
    model = inject(ARCHS[arch](seed), adapter_config(method, MARKETS, **kw))
    randomize(model, seed)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", METHODS)
def test_inject_any_encoder(arch: str, method: str) -> None:
    model = adapted(arch, method)
    layers = adapter_layers(model)
    assert len(layers) == 4 * 2, list(layers)  # q, k, v, attention output × 2 layers
    assert not any(layer.training for layer in layers.values()), "injected into an eval() model"
    config = get_adapter_config(model)
    if arch == "distilbert":
        assert config.target_modules == ("q_lin", "k_lin", "v_lin", "out_lin")
        assert config.modules_to_save == ("pre_classifier", "classifier")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".base." not in n for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)
    assert not any("embeddings" in n or "LayerNorm" in n for n in trainable)
    out = logits(model, inputs_for(model), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out.shape == (6, 1) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_equals_separate_per_market_batches(method: str) -> None:
    model = adapted("bert", method, seed=1)
    inputs = inputs_for(model, n=6, seed=3)
    ids = torch.tensor([2, 0, 1, 0, 2, 2])
    mixed = logits(model, inputs, ids)
    for t in range(3):
        rows = (ids == t).nonzero().squeeze(1)
        alone = logits(model, {k: v[rows] for k, v in inputs.items()}, ids[rows])
        torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-5)
    if method not in ("lora", "multilora"):  # per-market methods really differ between markets
        same = logits(model, inputs, torch.zeros(6, dtype=torch.long))
        assert not torch.allclose(mixed, same, atol=1e-4)


def test_model_gradients_reach_adapters_and_head_never_frozen_weights() -> None:
    model = adapted("bert", "mtl-lora", seed=2)
    model.train()
    with use_tasks(model, torch.tensor([0, 2, 0, 2, 0, 2])):
        model(**inputs_for(model)).logits.pow(2).sum().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    for layer in adapter_layers(model).values():
        assert isinstance(layer, MTLLoRALinear)
        assert layer.lora_A.grad.abs().sum() > 0
        assert all(layer.lora_B.grad[i].abs().sum() > 0 for i in range(layer.n_up))
        assert layer.lam[0].grad.abs().sum() > 0 and layer.mix_logits[2].grad.abs().sum() > 0
        assert layer.lam[1].grad is None or not layer.lam[1].grad.any()
    assert model.classifier.weight.grad.abs().sum() > 0


def test_routing_state_is_per_model_and_reset_on_exit() -> None:
    a, b = adapted(seed=0), adapted(seed=1)
    ids = torch.tensor([1, 1])
    with use_tasks(a, ids):
        assert all(layer._task_ids is not None for layer in adapter_layers(a).values())
        assert all(layer._task_ids is None for layer in adapter_layers(b).values())
        with pytest.raises(ValueError, match="task ids"):
            b(**inputs_for(b, n=2))
    assert all(layer._task_ids is None for layer in adapter_layers(a).values())
    with pytest.raises(RuntimeError), use_tasks(a, ids):
        raise RuntimeError("boom")
    assert all(layer._task_ids is None for layer in adapter_layers(a).values())


def test_market_task_ids_maps_codes_and_names_unknown_markets() -> None:
    model = adapted()
    assert market_task_ids(model, ["us", "de", "fr"]).tolist() == [2, 0, 1]
    with pytest.raises(KeyError, match="'jp'.*\\['de', 'fr', 'us'\\]"):
        market_task_ids(model, ["jp"])


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (None, ValueError, "needs per-example task ids.*\\[0, 3\\)"),
        (torch.tensor([0, 3]), IndexError, "task id 3 out of range.*\\[0, 3\\)"),
        (torch.tensor([-1, 0]), IndexError, "task id -1 out of range"),
        (torch.tensor([0.0, 1.0]), ValueError, "integer tensor"),
        (torch.tensor([[0, 1]]), ValueError, "1-D"),
        ([0, 1], ValueError, "LongTensor"),
    ],
)
def test_routing_errors_name_what_was_expected(ids: object, error: type, message: str) -> None:
    model = adapted()
    with pytest.raises(error, match=message), use_tasks(model, ids):  # type: ignore[arg-type]
        pass


def test_forward_errors_without_context_or_with_wrong_batch_size() -> None:
    model = adapted()
    with pytest.raises(ValueError, match="use_tasks"):
        model(**inputs_for(model, n=2))
    with pytest.raises(ValueError, match="3 task ids for a batch of 2"), use_tasks(model, torch.tensor([0, 1, 2])):
        model(**inputs_for(model, n=2))


def test_lora_accepts_missing_or_any_task_ids() -> None:
    model = adapted(method="lora")
    inputs = inputs_for(model)
    torch.testing.assert_close(logits(model, inputs, None), logits(model, inputs, torch.arange(6)))


def test_inject_errors() -> None:
    cfg = AdapterConfig("mtl-lora", MARKETS)
    with pytest.raises(ValueError, match="match no module.*linear layers include"):
        inject(tiny_bert(), AdapterConfig("lora", target_modules=("nonexistent",)))
    with pytest.raises(ValueError, match="is a BertSelfOutput, not nn.Linear"):
        inject(tiny_bert(), AdapterConfig("lora", target_modules=("attention.output",)))
    with pytest.raises(ValueError, match="modules_to_save \\['head'\\] match no module"):
        inject(tiny_bert(), AdapterConfig("lora", modules_to_save=("head",)))
    with pytest.raises(ValueError, match="contains targets"):
        inject(tiny_bert(), AdapterConfig("lora", target_modules=("dense",), modules_to_save=("pooler",)))
    model = inject(tiny_bert(), cfg)
    with pytest.raises(ValueError, match="already has adapters"):
        inject(model, cfg)
    with pytest.raises(TypeError, match="AdapterConfig"):
        inject(tiny_bert(), {"method": "lora"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no adapters"):
        get_adapter_config(tiny_bert())
    with pytest.raises(ValueError, match="has no adapters"), use_tasks(tiny_bert(), None):
        pass


def test_custom_targets_and_pooler_training() -> None:
    model = inject(tiny_bert(), AdapterConfig("lora", target_modules=("query", "value"),
                                              modules_to_save=("classifier", "pooler")))
    assert len(adapter_layers(model)) == 4
    assert model.bert.pooler.dense.weight.requires_grad


def closed_form(method: str, d_in: int, d_out: int, r: int, n: int, t: int, e: int = 64) -> int:
    return {"mtl-lora": r * d_in + n * r * d_out + t * r * r + t * n,
            "lora": r * (d_in + d_out), "per-market-lora": t * r * (d_in + d_out),
            SHARED_PML: (t + 1) * r * (d_in + d_out),  # the markets' departures and the shared adapter
            "multilora": n * (r * (d_in + d_out) + d_out),  # n parallel LoRAs + per-channel scales
            "moelora": r * (d_in + d_out) + n * e + t * e}[method]  # n experts: gate n×e, T embeddings


@pytest.mark.parametrize("method", METHODS)
def test_parameter_accounting_matches_closed_form(method: str) -> None:
    model = inject(tiny_bert(), adapter_config(method, MARKETS, r=4, n_up=2, multilora_n=2, n_experts=2))
    config = get_adapter_config(model)
    shapes = {n: (m.in_features, m.out_features) for n, m in adapter_layers(model).items()}
    head = sum(p.numel() for p in model.classifier.parameters())
    t = 3 if config.is_task_conditioned else 1
    by_hand = sum(closed_form(method, 32, 32, 4, 2, t) for _ in shapes)
    assert expected_trainable_parameters(config, shapes) == by_hand
    assert expected_trainable_parameters(config, list(shapes.values())) == by_hand
    assert trainable_parameters(model) == by_hand + head
    adapter_only = sum(p.numel() for m in adapter_layers(model).values()
                       for n, p in m.named_parameters() if not n.startswith("base."))
    assert adapter_only == by_hand
    assert all(isinstance(m, AdapterLayer) for m in adapter_layers(model).values())


def test_mtl_closed_form_numbers() -> None:
    config = AdapterConfig("mtl-lora", ("de", "fr", "us"))  # r 8, n 3, T 3
    assert expected_trainable_parameters(config, [(384, 384)]) == 8 * 384 + 3 * 8 * 384 + 3 * 64 + 3 * 3


def test_bf16_model_forward_and_autocast() -> None:
    model = adapted(seed=4)
    inputs = inputs_for(model)
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model, inputs, ids)
    assert torch.isfinite(auto).all()
    out = logits(model.to(torch.bfloat16), inputs, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_gradient_checkpointing_with_backward_inside_the_context() -> None:
    grads = []
    for checkpointing in (False, True):
        model = adapted(seed=5, dropout=0.0)
        model.train()
        if checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        with use_tasks(model, torch.tensor([0, 1, 2, 1])):
            model(**inputs_for(model, n=4)).logits.sum().backward()
        grads.append(torch.cat([m.lora_A.grad.flatten() for m in adapter_layers(model).values()]))
        if checkpointing:  # proof that the forward really re-runs in backward
            with use_tasks(model, torch.tensor([0, 1, 2, 1])):
                loss = model(**inputs_for(model, n=4)).logits.sum()
            with pytest.raises(ValueError, match="task ids"):
                loss.backward()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
