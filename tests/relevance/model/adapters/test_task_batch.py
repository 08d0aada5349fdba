"""MTL-LoRA's task matrices stacked across layers in training: the same model, fewer ops, never stale."""

from __future__ import annotations

import sys

import pytest
import torch
from adapter_helpers import batch, randomize, tiny_bert

from relevance.model.adapters import AdapterConfig, adapter_layers, inject, use_tasks
from relevance.model.adapters import task_batch

MARKETS = ("de", "fr", "us")
TASKS = torch.tensor([0, 2, 1, 2, 0, 1])
inject_module = sys.modules["relevance.model.adapters.inject"]


def model(targets: tuple[str, ...] = ("query", "key", "value", "attention.output.dense"), seed: int = 0):
    m = tiny_bert(seed)
    inject(m, AdapterConfig("mtl-lora", markets=MARKETS, target_modules=targets))
    randomize(m, seed)
    return m.train()


def _step(m, inputs, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(11)  # the same dropout masks either way
    with use_tasks(m, TASKS), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = m(**inputs).logits
    out.float().pow(2).sum().backward()
    return out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bf16", [False, True])
def test_stacked_matrices_train_the_same_model_as_per_layer_ones(bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = batch(seed=3)
    out, grads = _step(model(), inputs, bf16)
    monkeypatch.setattr(inject_module, "task_matrix_batches", lambda layers: [])  # each layer its own
    ref_out, ref_grads = _step(model(), inputs, bf16)
    tol = {"rtol": 2e-2, "atol": 1e-3} if bf16 else {}  # one CPU measured bit-identical; others may round apart
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys() and any(".lam." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)


def test_one_stacked_pass_per_forward_and_none_when_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = task_batch.stacked_task_matrices
    monkeypatch.setattr(task_batch, "stacked_task_matrices", lambda layers: calls.append(len(layers)) or real(layers))
    m = model(targets=("query", "key", "value", "attention.output.dense", "intermediate.dense"))
    inputs = batch(seed=4)
    with use_tasks(m, TASKS):
        m(**inputs)
        assert sorted(calls) == [2, 8]  # q/k/v/o of 2 layers (32 → 32) and the 2 FFN layers (32 → 64)
        m(**inputs)
        assert len(calls) == 4  # a new forward, new matrices (and a graph of its own)
        with torch.no_grad():
            m.eval()(**inputs)
        assert len(calls) == 4  # scoring: each layer's cached matrices, no stacking
    layers = list(adapter_layers(m).values())
    assert all(layer._task_batch is None for layer in layers) and not m._forward_pre_hooks


def test_an_optimizer_step_between_forwards_is_never_served_stale_matrices() -> None:
    m = model()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    inputs = batch(seed=5)
    m.eval()  # no dropout: outputs compare exactly
    with use_tasks(m, TASKS):
        m(**inputs).logits.sum().backward()
        opt.step()
        # the encoder called directly: the model's pre-hook does not run, the version check must notice
        hidden = m.bert(**inputs).last_hidden_state
    with use_tasks(m, TASKS):  # a fresh context computes everything anew
        fresh = m.bert(**inputs).last_hidden_state
    torch.testing.assert_close(hidden, fresh)


def test_layers_of_a_shape_of_their_own_and_merged_layers_are_left_alone() -> None:
    m = model(targets=("query", "intermediate.dense"))
    layers = adapter_layers(m)
    assert [len(b.layers) for b in task_batch.task_matrix_batches(layers.values())] == [2, 2]
    lone = model(targets=("layer.0.intermediate.dense", "query"))  # one FFN layer: nothing to stack it with
    assert [[n for n, x in adapter_layers(lone).items() if x in b.layers]
            for b in task_batch.task_matrix_batches(adapter_layers(lone).values())] == [
        ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]]
    first = next(iter(layers.values()))
    first.merge(0)  # the other query layer is now alone of its shape among unmerged layers
    assert [len(b.layers) for b in task_batch.task_matrix_batches(layers.values())] == [2]
