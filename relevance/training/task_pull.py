"""Pulls of each market's own adapter parameters toward a shared value, applied after every optimizer step.

MTL-LoRA: each market's Λ_t (and/or w_t) toward the neutral point (Λ_t = I, uniform mixing: shared LoRA) or the
layer's mean over markets. Per-market LoRA: each market's A_t, B_t toward their mean over markets (a shared
adapter's point, which independent per-market adapters have no parameter for), or, with its shared adapter,
each market's departure ΔA_t, ΔB_t toward its neutral value 0 (the shared adapter itself).

A module of its own because it reads the training config's allowed values and the adapters' parameter lists,
while ``relevance.training.optim`` (which the config's divergence guard imports) stays free of both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from relevance.model.adapters.layers import PerTaskLoRALinear, list_items
from relevance.training.config import ADAPTER_PULL, TASK_DECAY_ONLY, TASK_DECAY_TARGETS


def _pulled_lists(model: nn.Module, only: str) -> list[nn.ParameterList]:
    """The per-market ParameterLists ``only`` names: MTL-LoRA's ``lam`` / ``mix_logits``, or (``ADAPTER_PULL``)
    per-market LoRA's ``lora_A`` / ``lora_B``."""
    if only == ADAPTER_PULL:
        return [lst for m in model.modules() if isinstance(m, PerTaskLoRALinear) for lst in (m.lora_A, m.lora_B)]
    names = {"both": ("lam", "mix_logits"), "lam": ("lam",), "mix": ("mix_logits",)}[only]
    layers = [m for m in model.modules() if hasattr(m, "lam") and hasattr(m, "mix_logits")]
    return [getattr(m, name) for m in layers for name in names]


def _neutral(p: torch.Tensor, only: str) -> torch.Tensor:
    """The neutral value of a per-market parameter: MTL-LoRA's I for a Λ_t (r, r), 0 for a w_t (n,); 0 for a
    per-market LoRA's departure from its shared adapter (``ADAPTER_PULL``)."""
    if only != ADAPTER_PULL and p.dim() == 2:
        return torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.zeros_like(p)


def _adapter_target(model: nn.Module) -> str:
    """What per-market LoRA's pull may aim at: ``identity`` (ΔA_t, ΔB_t → 0) with a shared adapter, else ``mean``."""
    layers = [m for m in model.modules() if isinstance(m, PerTaskLoRALinear)]
    return "identity" if layers and layers[0].shared is not None else "mean"


def neutral_pull(model: nn.Module, optimizer: torch.optim.Optimizer, decay: float | None,
                 target: str = "identity", only: str = "both") -> Callable[[], None] | None:
    """After-step pull of each market's trainable parameters toward a shared value, or None (no decay, or no
    such parameters).

    Why: a market whose labels agree with the others gains nothing from parameters of its own, yet from its
    ~1/T share of each batch they only wander (on the 9-market quality benchmark MTL-LoRA's agreeing markets'
    Λ_t ended as far from their mean, ‖Λ_t − Λ̄‖ ≈ 0.31, as 60% of the twins' specialisation; per-market LoRA
    lost the nested policies' markets to shared LoRA by 0.06-0.13 macro AUC). AdamW's own decay would pull Λ_t
    toward 0 (so that group has none). Decoupled decay at ``decay`` × the parameter group's current learning
    rate ρ (as AdamW's is; D·ρ capped at 1: all the way, never past) bounds the wander while a market whose
    gradient keeps pointing one way still specialises. ``target``:

    - ``identity`` (MTL-LoRA): Λ_t ← Λ_t + ρ(I − Λ_t), w_t ← (1 − ρ) w_t. Shrinking w_t toward 0 is shrinking it
      toward its own mean (softmax(w/τ) ignores a shift), so the mixing moves toward uniform: shared LoRA's point.
      With a shared adapter (per-market LoRA's only target then): ΔA_t, ΔB_t ← (1 − ρ)·Δ, toward the shared
      adapter, which learns from every row.
    - ``mean``: toward the layer's mean over every market (frozen ones included), x_t ← x_t + ρ(x̄ − x_t): what
      the markets learned in common stays, only each one's own departure shrinks (a shared prior, as in
      hierarchical models). The only target of independent per-market LoRA's A_t, B_t, whose markets start
      from one adapter when pulled (``Trainer.build_model``), so that their mean is a LoRA adapter too.

    ``only``: ``lam`` pulls the Λ_t alone, ``mix`` the w_t alone, ``both`` both (MTL-LoRA; on the quality
    benchmark the crossing twins' win lives mostly in the mixing and the agreeing markets' wander in the Λ_t,
    README); ``adapter`` per-market LoRA's A_t and B_t, each at its own group's rate (LoRA+ gives B its own).
    """
    if not decay:
        return None
    if target not in TASK_DECAY_TARGETS:
        raise ValueError(f"neutral_pull target {target!r}: expected one of {TASK_DECAY_TARGETS}")
    if only not in (*TASK_DECAY_ONLY, ADAPTER_PULL):
        raise ValueError(f"neutral_pull only {only!r}: expected one of {(*TASK_DECAY_ONLY, ADAPTER_PULL)}")
    if only == ADAPTER_PULL and target != _adapter_target(model):
        raise ValueError(f"neutral_pull target {target!r} for per-market LoRA's A_t, B_t: only "
                         f"{_adapter_target(model)!r} (independent adapters have no neutral value but the markets' "
                         "mean; with a shared adapter each market's departure is pulled toward 0, 'identity')")
    lists = [(lst, [p for p in list_items(lst) if p.requires_grad]) for lst in _pulled_lists(model, only)]
    lists = [(lst, train) for lst, train in lists if train]
    if not lists:
        return None
    # One foreach lerp per optimizer group, at that group's current lr (the schedule's); what each group pulls,
    # and (identity) toward what, is fixed here, once, not rebuilt every step.
    grouped: dict[int, tuple[dict, list[tuple[nn.ParameterList, list[nn.Parameter]]]]] = {}
    for lst, train in lists:
        group = next(g for g in optimizer.param_groups if any(q is train[0] for q in g["params"]))
        grouped.setdefault(id(group), (group, []))[1].append((lst, train))
    neutral: dict[tuple, torch.Tensor] = {}  # one I (r, r) for the Λ_t, one 0 (n,) for the w_t, shared
    plans = []  # (group, params, their lists (mean) or their neutral values (identity))
    for group, pairs in grouped.values():
        params = [p for _, train in pairs for p in train]
        if target == "mean":
            plans.append((group, params, [(lst, len(train)) for lst, train in pairs]))
        else:
            plans.append((group, params, [neutral.setdefault((p.shape, p.dtype), _neutral(p, only)) for p in params]))

    def pull() -> None:
        with torch.no_grad():
            for group, params, ends in plans:
                if target == "mean":  # the markets' mean as it is now, once per list
                    ends = [mean for lst, n in ends for mean in [torch.stack(tuple(list_items(lst))).mean(0)] * n]
                torch._foreach_lerp_(params, ends, min(1.0, float(decay) * group["lr"]))  # never past the end
    return pull
