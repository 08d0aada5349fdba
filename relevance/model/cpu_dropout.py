"""Dropout for CPU training that draws ~p·n random numbers instead of n.

Why: PyTorch's CPU dropout (``bernoulli_``) draws one random number per element on one thread. In
a bf16 training step of multilingual-e5-small on a 2-core AMX Xeon (16 × 128 tokens, LoRA on
q/k/v/o) its 86 dropouts took ~0.5 s of a ~1.3 s step, the same in fp32: a cost that precision
cannot touch, so bf16's gain over fp32 stayed near 1.27× (issue 16).

How: for keep probability 1 − p the gaps between dropped elements are geometric, so the dropped
positions are the running sum of ⌊ln U / ln(1 − p)⌋ + 1 over ~p·n uniforms U (the rarer outcome's
positions when p > 0.5). The mask is the same i.i.d. Bernoulli(1 − p) mask, scaled by 1/(1 − p),
drawn from torch's default generator (``torch.manual_seed`` and checkpointed RNG state still
reproduce a run), only not the same stream of numbers as ``bernoulli_``. On CUDA, whose dropout is a
fused kernel, nothing changes.

``cpu_dropout(model)`` applies it for the duration of training: every ``nn.Dropout`` (the encoder's,
the classifier's and the adapters') and the attention-probability dropout, by an attention function
that runs PyTorch's math-path arithmetic (fp32 for bf16/fp16 inputs) with this mask and hands back to
``sdpa`` whenever there is no dropout (evaluation).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

ATTENTION_NAME = "relevance_cpu_dropout"  # registered with transformers by cpu_dropout(), not at import
MARGIN_SIGMAS = 6.0  # uniforms drawn per round: mean + this many standard deviations (a second round ~1e-9)


def scaled_keep_mask(numel: int, p: float, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """A flat mask of 0 (dropped, probability ``p``) and 1/(1 − p) (kept), i.i.d. per element."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got p={p!r}")
    rare, fill, other = (p, 1.0 / (1.0 - p), 0.0) if p <= 0.5 else (1.0 - p, 0.0, 1.0 / (1.0 - p))
    mask = torch.full((numel,), fill, dtype=dtype, device=device)
    mask.index_fill_(0, _bernoulli_positions(numel, rare, device), other)
    return mask


def _bernoulli_positions(numel: int, q: float, device: torch.device | str) -> Tensor:
    """Sorted positions in [0, numel) each present independently with probability ``q`` (≤ 0.5)."""
    log_miss = math.log1p(-q)
    chunks: list[Tensor] = []
    start = -1  # position of the previous hit
    while True:
        expect = (numel - 1 - start) * q
        k = max(1, int(expect + MARGIN_SIGMAS * math.sqrt(expect * (1.0 - q)) + 16))
        u = torch.rand(k, dtype=torch.float64, device=device)  # [0, 1): 1 − u in (0, 1]
        gaps = torch.floor(torch.log1p(-u) / log_miss).to(torch.int64) + 1  # geometric, ≥ 1
        pos = torch.cumsum(gaps, 0) + start
        if int(pos[-1]) >= numel:
            chunks.append(pos[pos < numel])
            return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        chunks.append(pos)
        start = int(pos[-1])


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout`` with the geometric mask on CPU; ``F.dropout`` itself elsewhere."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training=True)
    return x * scaled_keep_mask(x.numel(), p, x.dtype, x.device).view(x.shape)


class Dropout(nn.Dropout):
    """Drop-in ``nn.Dropout`` (same ``p``, same ``train()``/``eval()`` behaviour) using :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function: sdpa without dropout, else the math path with our mask.

    q, k, v: (B, H, L, D); ``attention_mask``: sdpa's (bool, True = attend, or additive) or None.
    Returns (B, L, H, D) like transformers' sdpa function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out_dtype = query.dtype
    q, k, v = (t.float() for t in (query, key, value))  # as sdpa's math path: fp32 for bf16/fp16
    root = math.sqrt(scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.matmul(q * root, (k * root).transpose(-2, -1))  # (B, H, L, L)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    probs = probs * scaled_keep_mask(probs.numel(), dropout, probs.dtype, probs.device).view(probs.shape)
    out = torch.matmul(probs, v).to(out_dtype)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def cpu_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s dropouts use the geometric mask on CPU; restored on exit.

    Models whose attention is not ``sdpa`` (eager, flash, …) keep their attention as it is.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = Dropout(child.p, child.inplace)
                fast.train(child.training)
                swapped.append((parent, name, child))
                setattr(parent, name, fast)
    configs = [m.config for m in model.modules()
               if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"]
    if configs:
        _register_attention()
    for config in configs:
        config._attn_implementation = ATTENTION_NAME
    try:
        yield model
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
