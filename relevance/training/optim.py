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

LoRA+ (``b_lr_ratio``, Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024): every
method's up-projections B learn at a multiple of their group's rate. B starts at 0 and A at full Kaiming scale,
so at one rate the update (α/r)·B·A·x grows only as fast as B does; on multilingual-e5-small (whose [CLS]
carries little signal before training) every run of the issue-15 policy recipe sits at valid loss ≈ ln 2 for its
first 50-125 of 200 steps, and a seed that leaves late ends under-trained (crossing seed 2: MTL-LoRA missed a
twin's win and lost es by 0.068). At 4× the crossing clause (both twins ≥ +0.05 over shared LoRA, intervals
excluding 0, es ≥ -0.005) held in all 8 seeds (0-7) where one rate held it in 6 of the 8, both methods' macro
AUC rose in every crossing seed, and where policies nest MTL-LoRA stayed level with shared LoRA or above (3
markets, Λ_t/w_t at 3×). On the 9-market quality benchmark (seed 0, Λ_t/w_t at 9×) 4× cost MTL-LoRA de, en, hi
and jp (-0.021 to -0.034 against shared LoRA, significant; at one rate -0.001 to -0.016; with Λ_t/w_t at 3×
instead they held but the topical twin's win was gone). 2× (seed 0 there) kept every agreeing market within
noise and raised MTL-LoRA's macro from 0.927 to 0.942, but on the crossing policies it missed the clause in
seeds 1 (es -0.011) and 2 (de +0.019 n.s., es -0.041) of 0-3, and 3× failed seed 2 outright (macro -0.035): seed
2's late start is not moved monotonically by the ratio. So the default is neither a fixed 4× nor 1× but
B_LR_BUDGET / max(3, T) (``TrainConfig.b_lr_multiplier``): 4× for 3 markets, where it was validated, shrinking
as Λ_t / w_t's own multiple max(3, T) grows — the two rates trade the same things, per-market specialisation
against the agreeing markets — to 1.33× for 9 markets, between the 1× and 2× that held there (seeds 0-2 at
1.33×: MTL-LoRA +0.035 macro over shared LoRA, no agreeing market worse in any seed). On the demo's data (5
markets, 2.4×, 4 seeds) MTL-LoRA's macro stayed (0.868 → 0.870) while shared LoRA's fell (0.789 → 0.751): a
baseline cost, reported with it, and it is collapses — on a Zen 3 in fp32, 2 of 4 shared LoRA seeds scored every
row alike from step 75 or 100 at 2.4× and none at 1× (``divergence_guard{,_lora_one_rate}.md``), as per-market
LoRA's own-market B faded one market to a constant score in 2 of 6 demo-conflict seeds at 4× and none at 1×
(``collapse_search_demo_conflict_eval20*.md``); the divergence guard rolls back the ones it can see
(``divergence.py``). 8× and 16× were unstable at lr 5e-4 (crossing seed 2: es's valid AUC fell to
0.45 under MTL-LoRA at 8×, shared LoRA never left AUC 0.5 at 16×). Figures:
``benchmarks/results/policy_{crossing,nested}.md`` (labels ``lora-plus-4``, ``lora-plus-2``, ``lora-plus-3``),
``quality_lora_plus{,2,_tlr3,_rule}_zen5.md``, ``lora_plus_demo{,_one_rate}.md``.
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


def is_up_projection(name: str) -> bool:
    """True for an adapter's up-projection B (shared, stacked or per market), e.g. ``…query.lora_B``."""
    return "lora_B" in name.split(".")


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float, own_lr_scale: float = 1.0,
    b_lr_ratio: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: the shared rest (lr, decay); MTL-LoRA's Λ_t/w_t
    (``own_lr_scale`` × lr, no decay); per-market LoRA's A_t/B_t (``own_lr_scale`` × lr, decay).

    One scale serves both kinds: a model has only one of them. ``b_lr_ratio`` ≠ 1 (LoRA+) moves the
    up-projections B of every method into groups of their own at ``b_lr_ratio`` × their group's lr, same
    decay; at 1 the groups are exactly the ones above, so older checkpoints' optimizer states still load.
    Empty groups are left out, except the first.
    """
    kinds: dict[str, list[nn.Parameter]] = {k: [] for k in ("shared", "task", "market", "shared_b", "market_b")}
    for name, param in named:
        if param.requires_grad:
            kind = "task" if is_task_parameter(name) else "market" if is_market_lora_parameter(name) else "shared"
            if b_lr_ratio != 1.0 and kind != "task" and is_up_projection(name):
                kind += "_b"
            kinds[kind].append(param)
    settings = {"shared": (lr, weight_decay), "task": (lr * own_lr_scale, 0.0),
                "market": (lr * own_lr_scale, weight_decay), "shared_b": (lr * b_lr_ratio, weight_decay),
                "market_b": (lr * own_lr_scale * b_lr_ratio, weight_decay)}
    return [{"params": kinds[k], "lr": settings[k][0], "weight_decay": settings[k][1]}
            for k in kinds if k == "shared" or kinds[k]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, own_lr_scale: float = 1.0,
                   b_lr_ratio: float = 1.0) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the LR schedule multiplies every group's own lr alike.

    ``foreach``: PyTorch picks its multi-tensor AdamW only for CUDA tensors, and MTL-LoRA has two small
    tensors per market and adapted layer (672 for 7 markets on e5-small), which the per-tensor loop
    steps one by one in Python: 23 -> 14 ms per step on a 2-core CPU, with the same bits (tested).
    Not ``fused`` (4 ms): on CPU (torch 2.13) the fused kernel leaves the parameters' version counters
    unchanged, which the adapters' scoring cache (``AdapterLayer._per_task``) relies on to notice a step
    (``torch.autograd.graph.increment_version`` in a post-step hook would fix that), and it rounds
    differently (≤ 1e-6 after 20 steps): on the demo data, seed 0, that alone tipped MTL-LoRA's run into a
    divergence (valid loss 0.61 at step 50, then ln 2 = constant scores in every market at 100 and 150)
    where the loop's rounding trains to 0.47; seeds 1-3 trained alike under both. It bought ≤ 0.01 of
    MTL-LoRA's step ratio to shared LoRA, inside that ratio's run-to-run spread: not worth it (2026-12-05).
    """
    groups = param_groups(model.named_parameters(), lr, weight_decay, own_lr_scale, b_lr_ratio)
    return torch.optim.AdamW(groups, foreach=True)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor at step s: linear warmup to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(s: int) -> float:
        return (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    return factor
