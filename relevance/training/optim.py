"""The optimizer: AdamW, with each market's own adapter parameters in a group of their own.

Why a group of their own (issue 15): Λ_t starts at I and w_t at logits of order 1/τ, while B starts
at 0. Adam moves every entry by about the learning rate per step whatever its scale, so at the
shared learning rate Λ_t can drift only ~0.1 from I and w_t/τ only ~1 logit in a 200-step budget:
a market can barely specialise, and the mixing stays wherever the random init put it. These
parameters therefore get ``task_lr_scale`` × the learning rate, and no weight decay (decay would
pull Λ_t toward 0, not toward its neutral value I).

``per-market-lora``'s A_t / B_t have the same problem for the same reason: each market's pair gets
gradient only from that market's ~1/T share of every batch, a noisier gradient whose sign Adam
follows less often, so a small market's adapter barely leaves its start. They can get the scaled
rate too (their neutral value is B_t = 0, so weight decay stays). The factor is
``TrainConfig.task_lr_multiplier``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Parameter-name parts of the per-market MTL-LoRA parameters (MTLLoRALinear.lam / .mix_logits).
TASK_PARAM_PARTS = ("lam", "mix_logits")


def is_task_parameter(name: str) -> bool:
    """True for an MTL-LoRA Λ_t or w_t, e.g. ``…attention.self.query.lam.2``."""
    return any(part in TASK_PARAM_PARTS for part in name.split("."))


def is_market_lora_parameter(name: str) -> bool:
    """True for a per-market LoRA A_t or B_t, e.g. ``…query.lora_A.2`` (a shared LoRA's is ``…query.lora_A``)."""
    parts = name.split(".")
    return any(a in ("lora_A", "lora_B") and b.isdigit() for a, b in zip(parts, parts[1:]))


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, own_lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: the shared rest (lr, decay); MTL-LoRA's Λ_t/w_t
    (``own_lr_scale`` × lr, no decay); per-market LoRA's A_t/B_t (``own_lr_scale`` × lr, decay).

    One scale serves both kinds: a model has only one of them. Empty groups are left out.
    """
    shared, task, market = [], [], []
    for name, param in named:
        if param.requires_grad:
            if is_task_parameter(name):
                task.append(param)
            else:
                (market if is_market_lora_parameter(name) else shared).append(param)
    groups = [{"params": shared, "lr": lr, "weight_decay": weight_decay}]
    if task:
        groups.append({"params": task, "lr": lr * own_lr_scale, "weight_decay": 0.0})
    if market:
        groups.append({"params": market, "lr": lr * own_lr_scale, "weight_decay": weight_decay})
    return groups


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, own_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the LR schedule multiplies every group's own lr alike.

    ``foreach``: PyTorch picks its multi-tensor AdamW only for CUDA tensors, and MTL-LoRA has two small
    tensors per market and adapted layer (672 for 7 markets on e5-small), which the per-tensor loop
    steps one by one in Python: 23 -> 14 ms per step on a 2-core CPU, with the same bits (tested).
    Not ``fused`` (4 ms): on CPU (torch 2.13) the fused kernel leaves the parameters' version counters
    unchanged, and the adapters' scoring cache (``AdapterLayer._per_task``) relies on them to notice a step.
    """
    return torch.optim.AdamW(param_groups(model.named_parameters(), lr, weight_decay, own_lr_scale), foreach=True)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor at step s: linear warmup to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(s: int) -> float:
        return (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    return factor
