"""MTL-LoRA's mix of up-projections: each market's row rounds alike whatever the number of markets."""

from __future__ import annotations

import pytest
import torch

from relevance.model.adapters.mixing import mix_up_projections


def operands(g: int, t: int, n: int, d: int, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(g, t, n, generator=gen, dtype=dtype) * 3, dim=-1)
    b = torch.randn(g, n, d, generator=gen, dtype=dtype)
    return p, b


@pytest.mark.parametrize("shape", [(1, 4, 3, 256), (6, 7, 3, 3072), (2, 5, 1, 40), (3, 9, 4, 17)])
def test_mix_equals_the_sum_written_out_market_by_market(shape: tuple[int, int, int, int]) -> None:
    g, t, n, d = shape
    p, b = operands(g, t, n, d, seed=sum(shape))
    want = torch.empty(g, t, d)
    for gi in range(g):
        for ti in range(t):
            row = p[gi, ti, 0] * b[gi, 0]
            for i in range(1, n):
                row = row + p[gi, ti, i] * b[gi, i]
            want[gi, ti] = row
    assert torch.equal(mix_up_projections(p, b), want)


@pytest.mark.parametrize("shape", [(1, 3, 256), (48, 3, 3072), (4, 2, 96)])
def test_adding_markets_leaves_existing_rows_bit_identical(shape: tuple[int, int, int]) -> None:
    # The product torch.bmm(p, b) failed this on an AMD EPYC Zen 3 (AVX2): rows moved ~1e-7 from T = 3 to 4.
    g, n, d = shape
    p, b = operands(g, 9, n, d, seed=d)
    full = mix_up_projections(p, b)
    for t in range(1, 9):
        assert torch.equal(mix_up_projections(p[:, :t].contiguous(), b), full[:, :t]), f"T = {t}"


def test_gradients_match_finite_differences() -> None:
    p, b = operands(2, 5, 3, 7, seed=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(mix_up_projections, (p.requires_grad_(), b.requires_grad_()))


def test_gradients_flow_to_one_operand_alone() -> None:
    p, b = operands(2, 4, 3, 6, seed=4)
    b.requires_grad_()
    out = mix_up_projections(p, b)
    (grad_b,) = torch.autograd.grad(out.square().sum(), b)
    torch.testing.assert_close(grad_b, torch.einsum("gtn,gtd->gnd", p, 2 * out))


def test_mismatched_shapes_are_refused_with_both_shapes() -> None:
    p, b = operands(2, 4, 3, 6, seed=5)
    with pytest.raises(ValueError, match=r"\(2, 4, 3\) and \(2, 2, 6\)"):
        mix_up_projections(p, b[:, :2])
