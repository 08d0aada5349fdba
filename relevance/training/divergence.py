"""The divergence guard: a run that learned and then lost its signal goes back to its best weights.

Why (issue 15): a run can learn and then *diverge*. On ``make demo``'s data and recipe (MiniLM-L6,
lr 1e-3, 150 × 32, five markets) MTL-LoRA's seed 0 reached valid loss 0.61 / AUC 0.75 at step 50, then a
gradient spike (norm 2.6 before clipping, at step 58) left the top layer's [CLS] state equal for every
input within seven steps: valid loss ln 2, a constant score in every market, from step 100 to the end. A
perturbation of 1e-7 per parameter (another AdamW kernel's rounding) decided it; seeds 1-3 trained. Best-step
selection kept the collapsed weights from shipping, but it shipped step 50's: the rest of the budget was
lost (macro test AUC 0.741 instead of 0.870).

A market has *collapsed* at an evaluation when its valid scores were spread at some evaluation so far
(standard deviation ≥ :data:`relevance.evaluation.degenerate.SPREAD_FLOOR`) and are near-constant now: below
the floor *and* below :data:`DROP` × their spread at the best evaluation — the near-constant half of the
degenerate-market check, measured against the run's own past. The drop keeps a market whose spread hovers
at the floor (a model that has barely learned, 0.011 then 0.009) from counting; the collapses this guard is
for lose two orders of magnitude (the demo's logit spread fell 0.73 → 0.009, issue 15's e5 market scored
with std 0.001). "Some evaluation", not only the best, because the best is chosen on the mean over markets
and one market can fade while the others improve: per-market LoRA on the demo's conflict data (MiniLM-L6,
120 × 16, seed 0) had us at 0.014 at step 40, 0.0096 at step 60 — the best, as de and fr rose — and 0.0005 at
step 80, where us's own training loss had risen to that of a constant score (0.6668 → 0.6776) while fr's
adapter scored the same rows at 0.6233: a failed optimisation, not a minimum.
On a collapse :func:`roll_back`

1. restores the best evaluation's trainable weights,
2. clears AdamW's moments (they hold the spike: its first moment would repeat it, its second moment would
   shrink every step after it), so the next steps start Adam afresh,
3. multiplies every group's learning rate by :data:`LR_FACTOR` (the schedule keeps its shape and position),

and training goes on with the next batches (the data stream is not rewound, so the batches that led there
are not replayed).

Where every collapsed market has an adapter of its own (``per-market-lora``'s A_t/B_t, ``separate``'s head
copies too) and some market has not collapsed, the rollback is *per market* instead (:func:`roll_back_markets`):
only the collapsed markets' own parameters go back to the best evaluation's, only their AdamW moments are
cleared, and the learning rate stays; the run is evaluated again at once, so the mix can become the best.
Why: the other markets need not lose what they learned since. Per-market LoRA, nested policies (e5-small,
200 × 16, fp32, seed 0): de-broad faded between steps 100 and 150 (valid spread 0.175 → 0.001) while de and es
rose (valid AUC 0.685 / 0.830 → 0.918 / 0.936); the whole-model rollback to step 100 at half the rate shipped
test AUC de 0.726, es 0.835, de-broad 0.676 (macro 0.746, below the 0.791 of no rollback at all), while step
200's weights with de-broad's step-100 adapter alone score de 0.899, es 0.927, de-broad 0.658 (macro 0.828):
the shared head that moved on still reads the old adapter. MTL-LoRA's markets share A and the B_i, so a
collapse there always rolls the whole model back.

At most ``TrainConfig.max_rollbacks`` times a run (:data:`DEFAULT_MAX_ROLLBACKS`; 0 switches the guard off);
after that a collapse is only logged and the best weights still ship. A run that never collapses is untouched,
bit for bit. Every rollback is in ``run_info.json`` (``rollbacks``), the evaluation history and the MLflow run
(metric ``rollbacks``, tag ``rollbacks``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from relevance.evaluation.degenerate import SPREAD_FLOOR, score_spread
from relevance.model.adapters.inject import CONFIG_ATTR
from relevance.training.checkpoint import Progress, load_trainable_state
from relevance.training.optim import is_market_lora_parameter

logger = logging.getLogger(__name__)
DEFAULT_MAX_ROLLBACKS = 2
LR_FACTOR = 0.5
DROP = 0.1  # a collapsed market kept at most a tenth of the spread it had at the best evaluation


def market_spreads(preds: pd.DataFrame) -> dict[str, float]:
    """``{market: standard deviation of its scores}`` of a predictions frame (``market``, ``score``)."""
    return {str(m): round(score_spread(g["score"].to_numpy()), 6) for m, g in preds.groupby("market", sort=True)}


def collapsed_markets(best: Mapping[str, float], now: Mapping[str, float], floor: float = SPREAD_FLOOR,
                      peak: Mapping[str, float] | None = None) -> list[str]:
    """Markets whose spread reached ``floor`` at some evaluation (``peak``, each market's largest spread so
    far; ``best`` when not given) and is now below both ``floor`` and :data:`DROP` × what it was at the best
    evaluation (``best``).

    The peak, not the best evaluation alone, because the best is chosen on the mean over markets: one market
    can fade while the others improve, so that the evaluations which become the best already have it below the
    floor (per-market LoRA on the demo's conflict data: us 0.014 at step 40, 0.0096 at the best step 60, 0.0005 at
    step 80; module docstring). A market that never spread its scores (a tiny model that learned nothing yet) has
    not collapsed: there is nothing better to go back to.
    """
    peak = best if peak is None else peak
    return sorted(m for m, s in now.items()
                  if max(peak.get(m, 0.0), best.get(m, 0.0)) >= floor and s < min(floor, DROP * best.get(m, 0.0)))


def peak_spreads(history: list[dict[str, Any]]) -> dict[str, float]:
    """Each market's largest spread over the evaluations in ``history``."""
    peak: dict[str, float] = {}
    for entry in history:
        for m, s in (entry.get("score_std") or {}).items():
            peak[m] = max(peak.get(m, 0.0), s)
    return peak


def best_spreads(history: list[dict[str, Any]], best_step: int | None) -> dict[str, float]:
    """The per-market spreads recorded at ``best_step``'s evaluation (empty when there is none); the last one
    when that step was evaluated twice (again after a per-market rollback)."""
    for entry in reversed(history):
        if entry["step"] == best_step:
            return dict(entry.get("score_std") or {})
    return {}


def own_adapter_parameters(model: torch.nn.Module, markets: list[str]) -> list[str] | None:
    """Names of the trainable parameters that belong to ``markets`` alone — per-market LoRA's
    ``…lora_A.<task>`` / ``…lora_B.<task>`` (with its shared adapter: the market's departure ΔA_t, ΔB_t, while
    the shared Ā, B̄ stay, as the shared head does) and head copies ``…copies.<market>.…`` — or ``None`` when one
    of them has no adapter of its own (shared LoRA, MTL-LoRA: A and the B_i serve every market)."""
    config = getattr(model, CONFIG_ATTR, None)
    task_map = getattr(config, "task_map", None) or {}
    names: list[str] = []
    for market in markets:
        if market not in task_map:
            return None
        task = str(task_map[market])
        own = [n for n, p in model.named_parameters() if p.requires_grad and (
               (is_market_lora_parameter(n) and n.endswith(f".{task}")) or f".copies.{market}." in n)]
        if not any(".lora_B." in n for n in own):
            return None
        names += own
    return names


def roll_back_markets(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      best: Mapping[str, torch.Tensor], names: list[str]) -> None:
    """The parameters ``names`` back to ``best``'s values with their AdamW moments cleared; every other
    parameter, its moments and every learning rate stay as they are (module docstring)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(best[name])  # copy_ bumps the version the adapters' scoring cache watches
            optimizer.state.pop(params[name], None)


def roll_back(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, best: Mapping[str, torch.Tensor],
              factor: float = LR_FACTOR) -> None:
    """Best weights back in, AdamW's moments cleared, every learning rate × ``factor`` (module docstring)."""
    load_trainable_state(model, best, "the best evaluation's weights")
    optimizer.state.clear()  # AdamW re-creates each parameter's state (zero moments) at its next step
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor


def guard(prog: Progress, spreads: Mapping[str, float], limit: int, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          best: Mapping[str, torch.Tensor]) -> str | None:
    """After an evaluation whose per-market spreads are ``spreads``: on a collapse, roll back (and record it
    in ``prog.rollbacks``) unless ``limit`` rollbacks were spent. Returns ``"markets"`` after a per-market
    rollback (the loop evaluates again), ``"model"`` after a whole-model one, ``None`` otherwise. Logs either way."""
    markets = collapsed_markets(best_spreads(prog.history, prog.best_step), spreads, peak=peak_spreads(prog.history))
    if not markets:
        return None
    what = (f"step {prog.step}: market(s) {', '.join(markets)} collapsed to near-constant valid scores "
            f"(spread {', '.join(f'{m} {spreads[m]:.2g}' for m in markets)}; below {SPREAD_FLOOR})")
    if len(prog.rollbacks) >= limit:
        logger.warning("%s; no rollback left (--max-rollbacks %d): the best weights (step %s) will ship",
                       what, limit, prog.best_step)
        return None
    halvings = sum(r.get("scope", "model") == "model" for r in prog.rollbacks)
    own = own_adapter_parameters(model, markets) if len(markets) < len(spreads) else None
    if own is not None:
        roll_back_markets(model, optimizer, best, own)
        prog.rollbacks.append({"step": prog.step, "to_step": prog.best_step, "markets": markets,
                               "lr_scale": LR_FACTOR ** halvings, "scope": "markets"})
        logger.warning("%s: their own adapters back to step %s's weights with fresh AdamW moments; the other "
                       "markets keep theirs (rollback %d of at most %d)", what, prog.best_step, len(prog.rollbacks),
                       limit)
        return "markets"
    roll_back(model, optimizer, scheduler, best)
    scale = LR_FACTOR ** (halvings + 1)
    prog.rollbacks.append({"step": prog.step, "to_step": prog.best_step, "markets": markets, "lr_scale": scale})
    logger.warning("%s: back to step %s's weights with fresh AdamW moments at %g× the learning rate "
                   "(rollback %d of at most %d)", what, prog.best_step, scale, len(prog.rollbacks), limit)
    return "model"
