"""A shared start for per-market LoRA: every market trains one adapter first, then its own copy of it.

Why: per-market LoRA has no shared adapter parameter, so from step 0 each market's A_t, B_t learn only
from that market's rows (about 1/T of every batch), while shared LoRA pools the markets that agree. For
the first ``shared_start`` fraction of the steps this module makes per-market LoRA *be* shared LoRA:
every example is routed to market 0's A_0, B_0 and, after each optimizer step, A_0, B_0 are copied into
every other market's pair, so evaluations, checkpoints and merges see identical markets. At the switch
the optimizer's moments of A_0, B_0 are copied too, and each market continues from the shared adapter
with its own parameters. The phase is a function of the step alone, so resume is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from relevance.model.adapters.layers import PerTaskLoRALinear


def shared_steps(fraction: float, total: int) -> int:
    """Steps of the shared phase: ``fraction`` of ``total``, rounded up (0 when the fraction is 0)."""
    return math.ceil(fraction * total) if fraction > 0 else 0


def _layers(model: nn.Module) -> list[PerTaskLoRALinear]:
    return [m for m in model.modules() if isinstance(m, PerTaskLoRALinear)]


def shared_routing(task_ids: torch.Tensor) -> torch.Tensor:
    """Every example routed to market 0's adapter (the shared one during the shared phase)."""
    return torch.zeros_like(task_ids)


@torch.no_grad()
def tie_to_first(model: nn.Module) -> None:
    """Copy market 0's A_0, B_0 into every other market's A_t, B_t (in place)."""
    for layer in _layers(model):
        for params in (layer.lora_A, layer.lora_B):
            for p in list(params)[1:]:
                p.copy_(params[0])


def copy_first_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Give every market's A_t, B_t the optimizer state (Adam's moments, step) of A_0, B_0, so each
    market's own training continues from the shared adapter's momentum, not from a cold start."""
    for layer in _layers(model):
        for params in (layer.lora_A, layer.lora_B):
            first = optimizer.state.get(params[0])
            if not first:
                continue
            for p in list(params)[1:]:
                optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in first.items()}
