"""The geometric-gap CPU dropout: a Bernoulli mask by its statistics, PyTorch's attention arithmetic,
and a model that is exactly itself again outside ``cpu_dropout``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from relevance.model import cpu_dropout as cd


def _within(rate: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(rate - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.7, 0.97])
def test_mask_is_bernoulli_with_the_dropout_scale(p: float) -> None:
    torch.manual_seed(1)
    n = 400_000
    mask = cd.scaled_keep_mask(n, p, torch.float32)
    dropped = mask == 0
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert _within(dropped.float().mean().item(), p, n)
    for block in dropped.view(8, -1):  # spread over the whole tensor, not bunched at its start
        assert _within(block.float().mean().item(), p, block.numel())
    both = (dropped[1:] & dropped[:-1]).float().mean().item()  # independence of neighbours
    assert _within(both, p * p, n - 1)


def test_mask_is_right_when_one_round_of_uniforms_falls_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cd, "MARGIN_SIGMAS", -20.0)  # every round draws too few: several rounds
    torch.manual_seed(2)
    n, p = 200_000, 0.1
    positions = cd._bernoulli_positions(n, p, "cpu")
    assert bool((positions[1:] > positions[:-1]).all()) and 0 <= int(positions[0]) and int(positions[-1]) < n
    assert _within(len(positions) / n, p, n)
    assert _within(float((positions >= n // 2).float().mean()), 0.5, len(positions))  # the tail is covered


def test_mask_follows_the_seed_and_sizes_down_to_one() -> None:
    torch.manual_seed(3)
    a = cd.scaled_keep_mask(10_000, 0.1, torch.bfloat16)
    torch.manual_seed(3)
    assert torch.equal(a, cd.scaled_keep_mask(10_000, 0.1, torch.bfloat16))
    assert not torch.equal(a, cd.scaled_keep_mask(10_000, 0.1, torch.bfloat16))
    assert a.dtype == torch.bfloat16
    assert cd.scaled_keep_mask(1, 0.3, torch.float32).shape == (1,)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="p="):
            cd.scaled_keep_mask(10, bad, torch.float32)


def test_dropout_scales_kept_values_and_its_gradient_is_the_mask() -> None:
    torch.manual_seed(4)
    x = torch.randn(64, 50, requires_grad=True)
    y = cd.dropout(x, 0.2)
    y.sum().backward()
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    torch.testing.assert_close(x.grad, kept.float() / 0.8)
    assert cd.dropout(x, 0.2, training=False) is x and cd.dropout(x, 0.0) is x


def _math_attention(q, k, v, mask):  # PyTorch's own math path: the reference
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return sdpa_attention_forward(nn.Module(), q, k, v, mask, dropout=0.0, scaling=q.shape[-1] ** -0.5,
                                      is_causal=False)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_the_math_path_times_the_mask(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=g).to(dtype) for _ in range(3))
    mask = torch.ones(3, 1, 10, 10, dtype=torch.bool)
    mask[1, :, :, 7:] = False  # a padded example
    monkeypatch.setattr(cd, "scaled_keep_mask", lambda n, p, dtype, device: torch.ones(n, dtype=dtype))
    out, _ = cd.attention_forward(nn.Module(), q, k, v, mask, dropout=0.1, scaling=8 ** -0.5)
    assert out.dtype == dtype and out.shape == (3, 10, 2, 8)
    assert torch.equal(out, _math_attention(q, k, v, mask))  # all kept: bit for bit PyTorch's arithmetic

    keep = torch.ones(3 * 2 * 10 * 10)
    keep[::3] = 0  # now drop a third of the probabilities
    monkeypatch.setattr(cd, "scaled_keep_mask", lambda n, p, dtype, device: keep.to(dtype))
    dropped, _ = cd.attention_forward(nn.Module(), q, k, v, mask, dropout=0.1, scaling=8 ** -0.5)
    scores = (q.float() @ k.float().transpose(-2, -1)) * 8 ** -0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1) * keep.view(3, 2, 10, 10)
    torch.testing.assert_close(dropped.float(), (probs @ v.float()).transpose(1, 2), rtol=1e-2, atol=1e-2)


def _tiny() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=1, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg)


def test_cpu_dropout_swaps_within_the_block_and_restores_after() -> None:
    model = _tiny()
    ids = torch.randint(5, 50, (4, 12), generator=torch.Generator().manual_seed(6))
    originals = [m for m in model.modules() if type(m) is nn.Dropout]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with cd.cpu_dropout(model):
        assert not any(type(m) is nn.Dropout for m in model.modules())
        assert model.config._attn_implementation == cd.ATTENTION_NAME
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)  # evaluation: exactly the model
        model.train()
        torch.manual_seed(7)
        a = model(input_ids=ids).logits
        a.sum().backward()
        torch.manual_seed(7)
        assert torch.equal(model(input_ids=ids).logits, a)  # the seed reproduces a step
        assert not torch.equal(model(input_ids=ids).logits, a)  # and the masks differ step to step
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert [m for m in model.modules() if type(m) is nn.Dropout] == originals
    assert all(m.training for m in originals)  # they follow the train() call made inside the block
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), cd.cpu_dropout(model):
        raise RuntimeError("boom")
    assert [m for m in model.modules() if type(m) is nn.Dropout] == originals  # also after an error
    assert model.config._attn_implementation == "sdpa"
