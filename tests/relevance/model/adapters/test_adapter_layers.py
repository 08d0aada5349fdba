"""Adapter layers against slow per-example references; gradients; dropout placement; bf16."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import randomize
from torch import nn

from relevance.model.adapters import LoRALinear, MTLLoRALinear, PerTaskLoRALinear

D_IN, D_OUT, T = 24, 20, 4
IDS = torch.tensor([0, 3, 1, 3, 2, 0])


def make(kind: str, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT)
    if kind == "lora":
        layer = LoRALinear(base, r=4, alpha=8.0, dropout=dropout)
    elif kind in ("per-market-lora", "per-market-lora-shared"):
        layer = PerTaskLoRALinear(base, T, r=4, alpha=8.0, dropout=dropout, shared=kind.endswith("shared"))
    else:
        layer = MTLLoRALinear(base, T, r=4, alpha=8.0, n_up=3, temperature=0.5, dropout=dropout)
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
        if isinstance(layer, MTLLoRALinear):
            p = torch.softmax(layer.mix_logits[t] / layer.temperature, dim=0)
            for i in range(layer.n_up):
                h = h + s * p[i] * (xb @ layer.lora_A.T @ layer.lam[t].T @ layer.lora_B[i].T)
        elif isinstance(layer, PerTaskLoRALinear) and layer.shared is not None:  # A_t = Ā + ΔA_t, B_t = B̄ + ΔB_t
            a_t, b_t = layer.shared.lora_A + layer.lora_A[t], layer.shared.lora_B + layer.lora_B[t]
            h = h + s * (xb @ a_t.T @ b_t.T)
        elif isinstance(layer, PerTaskLoRALinear):
            h = h + s * (xb @ layer.lora_A[t].T @ layer.lora_B[t].T)
        else:
            h = h + s * (xb @ layer.lora_A.T @ layer.lora_B.T)
        rows.append(h.reshape(*x.shape[1:-1], D_OUT))
    return torch.stack(rows)


def run(layer: nn.Module, x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    layer._task_ids = ids
    try:
        return layer(x)
    finally:
        layer._task_ids = None


KINDS = ["mtl-lora", "per-market-lora", "per-market-lora-shared", "lora"]


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


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_separate_batches(kind: str) -> None:
    layer = make(kind, seed=1)
    x = torch.randn(6, 5, D_IN)
    with torch.no_grad():
        mixed = run(layer, x, IDS)
        for t in IDS.unique().tolist():
            rows = (IDS == t).nonzero().squeeze(1)
            alone = run(layer, x[rows], IDS[rows])
            torch.testing.assert_close(mixed[rows], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_weight_is_the_effective_update(kind: str) -> None:
    layer = make(kind, seed=2)
    x = torch.randn(6, 3, D_IN)
    with torch.no_grad():
        got = run(layer, x, IDS)
        for b, t in enumerate(IDS.tolist()):
            w = layer.base.weight + layer.delta_weight(t)
            torch.testing.assert_close(got[b], x[b] @ w.T + layer.base.bias, atol=1e-5, rtol=1e-5)


def test_mtl_gradients_reach_shared_and_present_task_parameters_only() -> None:
    layer = make("mtl-lora", seed=3)
    ids = torch.tensor([0, 2, 2, 0, 2])  # tasks 1 and 3 absent
    out = run(layer, torch.randn(5, 4, D_IN), ids)
    out.pow(2).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    for i in range(layer.n_up):
        assert layer.lora_B.grad[i].abs().sum() > 0, f"B_{i} got no gradient"
    for t in range(T):
        lam, w = layer.lam[t].grad, layer.mix_logits[t].grad
        if t in (0, 2):
            assert lam.abs().sum() > 0 and w.abs().sum() > 0, f"task {t} got no gradient"
        else:
            assert lam is None or not lam.any(), f"absent task {t}: Λ gradient"
            assert w is None or not w.any(), f"absent task {t}: w gradient"
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


def test_per_market_gradients_reach_present_tasks_only() -> None:
    layer = make("per-market-lora", seed=4)
    run(layer, torch.randn(3, 2, D_IN), torch.tensor([1, 1, 3])).sum().backward()
    for t in range(T):
        grads = [layer.lora_A[t].grad, layer.lora_B[t].grad]
        present = t in (1, 3)
        assert all((g is not None and g.abs().sum() > 0) == present for g in grads), t
    assert layer.base.weight.grad is None


def test_per_market_shared_adapter_learns_from_every_row_departures_from_their_own() -> None:
    layer = make("per-market-lora-shared", seed=4)
    run(layer, torch.randn(3, 2, D_IN), torch.tensor([1, 1, 3])).sum().backward()
    assert layer.shared.lora_A.grad.abs().sum() > 0 and layer.shared.lora_B.grad.abs().sum() > 0
    for t in range(T):
        grads = [layer.lora_A[t].grad, layer.lora_B[t].grad]
        assert all((g is not None and g.abs().sum() > 0) == (t in (1, 3)) for g in grads), t
    # ΔB_t's gradient is the shared B̄'s over market t's rows alone: here they sum to B̄'s
    torch.testing.assert_close(layer.lora_B[1].grad + layer.lora_B[3].grad, layer.shared.lora_B.grad)


def test_per_market_shared_adapter_starts_as_one_adapter() -> None:
    """Fresh: B̄ and every Δ zero, Ā Kaiming; so every market is the same (base) layer at step 0."""
    layer = PerTaskLoRALinear(nn.Linear(D_IN, D_OUT), T, r=4, shared=True)
    assert layer.shared.lora_A.abs().sum() > 0 and not layer.shared.lora_B.any()
    assert all(not layer.lora_A[t].any() and not layer.lora_B[t].any() for t in range(T))
    assert [n for n, _ in layer.named_parameters() if n.startswith("shared")] == ["shared.lora_A", "shared.lora_B"]


def test_lora_gradients_and_ignores_task_ids() -> None:
    layer = make("lora", seed=5)
    x = torch.randn(3, 2, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(run(layer, x, None), run(layer, x, torch.tensor([0, 1, 2])))
    run(layer, x, None).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


def test_fresh_layers_start_as_the_base_and_dropout_only_touches_the_adapter_input() -> None:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    x = torch.randn(4, 3, D_IN)
    for layer in (LoRALinear(base, dropout=0.5), PerTaskLoRALinear(base, T, dropout=0.5),
                  PerTaskLoRALinear(base, T, dropout=0.5, shared=True), MTLLoRALinear(base, T, dropout=0.5)):
        layer.train()
        with torch.no_grad():
            assert torch.equal(run(layer, x, torch.tensor([0, 1, 2, 3])), base(x))


def test_mtl_initialisation_follows_design() -> None:
    torch.manual_seed(0)
    layer = MTLLoRALinear(nn.Linear(D_IN, D_OUT), T, r=4, n_up=3)
    assert torch.equal(layer.lora_B, torch.zeros(3, D_OUT, 4))
    assert all(torch.equal(lam, torch.eye(4)) for lam in layer.lam)
    logits = torch.stack(list(layer.mix_logits))
    assert logits.abs().max() <= 3 ** -0.5 and logits.abs().sum() > 0
    assert layer.lora_A.abs().max() <= D_IN ** -0.5
    uniform = MTLLoRALinear(nn.Linear(D_IN, D_OUT), T, uniform_mixing_init=True)
    torch.testing.assert_close(uniform.mixing_weights(), torch.full((T, 3), 1 / 3))
    zero = MTLLoRALinear(nn.Linear(D_IN, D_OUT), T, mixing_init_scale=0.0)
    torch.testing.assert_close(zero.mixing_weights(), torch.full((T, 3), 1 / 3))


@pytest.mark.parametrize("scale", [0.05, 0.3])
def test_mixing_init_scale_bounds_the_random_logits(scale: float) -> None:
    torch.manual_seed(1)
    layer = MTLLoRALinear(nn.Linear(D_IN, D_OUT), 50, n_up=3, mixing_init_scale=scale)
    logits = torch.stack(list(layer.mix_logits))  # (50, 3)
    bound = scale / 3 ** 0.5
    assert logits.abs().max() <= bound
    assert logits.abs().max() > 0.8 * bound  # 150 uniform draws come close to the bound
    assert len({tuple(row.tolist()) for row in logits}) == 50  # the symmetry between markets is broken


def test_dropout_is_active_in_training_and_off_in_eval() -> None:
    layer = make("mtl-lora", dropout=0.5, seed=6)
    x = torch.randn(6, 5, D_IN)
    with torch.no_grad():
        layer.eval()
        torch.testing.assert_close(run(layer, x, IDS), reference(layer, x, IDS), atol=1e-5, rtol=1e-5)
        layer.train()
        assert not torch.allclose(run(layer, x, IDS), reference(layer, x, IDS), atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_merge_unmerge_restores_weights(kind: str) -> None:
    layer = make(kind, seed=7)
    before = layer.base.weight.detach().clone()
    x = torch.randn(2, 3, D_IN)
    with torch.no_grad():
        want = run(layer, x, torch.tensor([2, 2]))
        layer.merge(2)
        torch.testing.assert_close(run(layer, x, torch.tensor([2, 2])), want, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base.weight, before, atol=1e-6, rtol=0)
    assert not layer.is_merged


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_forward_runs(kind: str) -> None:
    x = torch.randn(6, 5, D_IN)
    with torch.no_grad():
        want = run(make(kind), x, IDS)
        out = run(make(kind).to(torch.bfloat16), x.to(torch.bfloat16), IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)


def test_layer_argument_errors() -> None:
    layer = make("mtl-lora")
    with pytest.raises(ValueError, match="task ids"):
        layer(torch.randn(2, D_IN))
    with pytest.raises(ValueError, match="one id per example"):
        run(layer, torch.randn(3, D_IN), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task index"):
        layer.delta_weight(None)
    with pytest.raises(IndexError, match="out of range"):
        layer.delta_weight(T)
    with pytest.raises(TypeError, match="nn.Linear"):
        MTLLoRALinear(nn.Conv1d(2, 2, 1), T)  # type: ignore[arg-type]
    layer.merge(1)
    with pytest.raises(ValueError, match="already merged"):
        layer.merge(0)
    with pytest.raises(ValueError, match="merged for task 1"):
        run(layer, torch.randn(2, D_IN), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="cannot be added"):
        make("lora").add_task()


@pytest.mark.parametrize("kind", ["mtl-lora", "per-market-lora", "per-market-lora-shared"])
def test_inference_cache_follows_parameter_updates(kind: str) -> None:
    layer = make(kind, seed=8)
    x = torch.randn(6, 3, D_IN)
    with torch.inference_mode():
        first = run(layer, x, IDS)
        torch.testing.assert_close(run(layer, x, IDS), first)  # served from the cache
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.mul_(1.5)  # in place, as an optimizer step or load_adapter would
        moved = run(layer, x, IDS)
        torch.testing.assert_close(moved, reference(layer, x, IDS), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(moved, first)
    out = run(layer, x, IDS)  # grad enabled again: no cache, gradients flow
    out.sum().backward()
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in layer.named_parameters() if not p.requires_grad}
    assert trainable and frozen  # the adapter's own parameters train, the base weight does not
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert [n for n, p in frozen.items() if p.grad is not None] == []
    assert layer._cache is None


@pytest.mark.parametrize("kind", ["mtl-lora", "per-market-lora", "per-market-lora-shared"])
def test_inference_cache_is_invalidated_by_an_optimizer_step(kind: str) -> None:
    """The cache key uses ``Tensor._version``, which every in-place op bumps; a real optimizer step
    (foreach kernels included) must therefore make the next scoring forward recompute."""
    layer = make(kind, seed=9)
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


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tasks", [3, 7])
def test_task_matrices_match_a_per_market_product(tasks: int, bf16: bool) -> None:
    """M_t in one batched product equals (α/r)(Σ_i p_t,i B_i) Λ_t market by market, values and gradients."""
    torch.manual_seed(tasks)
    layer = MTLLoRALinear(nn.Linear(48, 40), tasks, r=8, alpha=16.0, n_up=3, temperature=0.1)
    randomize(layer, tasks)
    upstream = torch.randn(tasks, 40, 8)
    params = [layer.lora_B, *layer.lam, *layer.mix_logits]

    def loop() -> torch.Tensor:
        p = layer.mixing_weights()
        b_mix = (p[:, :, None, None] * layer.lora_B.unsqueeze(0)).sum(1)
        return torch.stack([b_mix[t] @ lam for t, lam in enumerate(layer.lam)]) * layer.scaling

    results = []
    for compute in (layer.task_matrices, loop):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            m = compute()
        results.append((m, torch.autograd.grad((m.float() * upstream).sum(), params)))
    (fast, fast_grads), (slow, slow_grads) = results
    assert fast.dtype == slow.dtype == (torch.bfloat16 if bf16 else torch.float32)
    # Rounding apart: the mix's backward is a matrix product, so B's gradient sums over the markets in the
    # GEMM's order, not the loop's (~1e-7 off on O(1) values in fp32); a wrong index or
    # scale would be off by the values themselves.
    tol = {"rtol": 1e-2, "atol": 1e-3} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(fast, slow, **tol)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, **tol)
