"""MTL-LoRA's pull: after each optimizer step, each market's own Λ_t (and w_t) move a little toward a shared value.

A module of its own because it reads the training config's allowed values and the adapters' parameter lists,
while ``relevance.training.optim`` (which the config's divergence guard imports) stays free of both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from relevance.model.adapters.layers import list_items
from relevance.training.config import TASK_DECAY_ONLY, TASK_DECAY_TARGETS


def neutral_pull(model: nn.Module, optimizer: torch.optim.Optimizer, decay: float | None,
                 target: str = "identity", only: str = "both") -> Callable[[], None] | None:
    """After-step pull of MTL-LoRA's trainable Λ_t and w_t toward a shared value, or None (no decay, or no
    such parameters).

    Why: AdamW's own decay would pull Λ_t toward 0 (so that group has none), yet a market whose labels
    agree with the others gains nothing from a Λ_t or w_t of its own: from its ~1/T share of each batch at
    ``task_lr_multiplier`` × the rate they only wander (on the 9-market quality benchmark the agreeing
    markets' Λ_t ended as far from their mean, ‖Λ_t − Λ̄‖ ≈ 0.31, as 60% of the twins' specialisation).
    Decoupled decay at ``decay`` × the group's current learning rate ρ (as AdamW's is) bounds the wander while
    a market whose gradient keeps pointing one way still specialises. ``target``:

    - ``identity``: Λ_t ← Λ_t + ρ(I − Λ_t), w_t ← (1 − ρ) w_t. Shrinking w_t toward 0 is shrinking it toward
      its own mean (softmax(w/τ) ignores a shift), so the mixing moves toward uniform: shared LoRA's point.
    - ``mean``: toward the layer's mean over every market (frozen ones included), Λ_t ← Λ_t + ρ(Λ̄ − Λ_t),
      w_t ← w_t + ρ(w̄ − w_t): what the markets learned in common stays, only each one's own departure
      shrinks (a shared prior, as in hierarchical models).

    ``only``: ``lam`` pulls the Λ_t alone, ``mix`` the w_t alone, ``both`` both. On the quality benchmark the
    crossing twins' win lives mostly in the mixing and the agreeing markets' wander in the Λ_t (README).
    """
    if not decay:
        return None
    if target not in TASK_DECAY_TARGETS:
        raise ValueError(f"neutral_pull target {target!r}: expected one of {TASK_DECAY_TARGETS}")
    if only not in TASK_DECAY_ONLY:
        raise ValueError(f"neutral_pull only {only!r}: expected one of {TASK_DECAY_ONLY}")
    names = {"both": ("lam", "mix_logits"), "lam": ("lam",), "mix": ("mix_logits",)}[only]
    layers = [m for m in model.modules() if hasattr(m, "lam") and hasattr(m, "mix_logits")]
    pairs = [(lst, [p for p in list_items(lst) if p.requires_grad]) for m in layers
             for lst in (getattr(m, name) for name in names)]
    pairs = [(lst, train) for lst, train in pairs if train]
    if not pairs:
        return None
    first = pairs[0][1][0]
    group = next(g for g in optimizer.param_groups if any(q is first for q in g["params"]))
    params = [p for _, train in pairs for p in train]
    neutral: dict[tuple, torch.Tensor] = {}  # one I (r, r) for the Λ_t, one 0 (n,) for the w_t
    for p in params:
        if (p.shape, p.dtype) not in neutral:
            neutral[p.shape, p.dtype] = torch.eye(p.shape[0], dtype=p.dtype, device=p.device) if p.dim() == 2 \
                else torch.zeros_like(p)
    identity = [neutral[p.shape, p.dtype] for p in params]

    def pull() -> None:
        rate = float(decay) * group["lr"]
        with torch.no_grad():
            if target == "mean":
                means = [torch.stack(tuple(list_items(lst))).mean(0) for lst, _ in pairs]
                ends = [mean for mean, (_, train) in zip(means, pairs) for _ in train]
            else:
                ends = identity
            torch._foreach_lerp_(params, ends, rate)
    return pull
