"""Degenerate markets: predictions that carry no ranking signal although the run "worked".

Why this exists (issue 15): MTL-LoRA on multilingual-e5 once gave one market a *constant* score
(mean 0.719, std 0.001 over 450 test rows, test AUC 0.60) while the other markets were fine. The
macro AUC hid it and nothing told the user. :func:`market_flags` is the one definition; metrics
(``auc_table``), the ``evaluate`` command, the report, training's ``run_info.json`` and MLflow
tags, and the promotion gate all read its result instead of deciding for themselves.

A market's predictions are *degenerate* when either holds:

- **near-constant scores**: the standard deviation of its (sigmoid) scores is below
  :data:`SPREAD_FLOOR`. Healthy markets spread their scores with std ≈ 0.1–0.4; 0.01 is an order
  of magnitude below the weakest healthy market and still far above float noise, so a collapsed
  head or a task adapter that drowned the input is caught even when ties give it a lucky AUC.
- **an AUC within noise of chance**: the market's 95% cluster-bootstrap interval (``ci_low`` …
  ``ci_high``, as :func:`relevance.evaluation.metrics.auc_table` computes it) contains
  :data:`CHANCE_AUC`. Then the data cannot tell the model from a coin, whatever the point AUC says.

A one-class market is never degenerate: its AUC is undefined (``auc_table`` already says so), and
its spread alone says nothing about ranking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

SPREAD_FLOOR = 0.01  # std of the sigmoid scores below which a market's scores are "constant"
CHANCE_AUC = 0.5  # the AUC of a ranking that knows nothing


def score_spread(scores: ArrayLike) -> float:
    """Population standard deviation of the finite scores (0.0 when there are none)."""
    s = np.asarray(scores, dtype=float)
    s = s[np.isfinite(s)]
    return float(np.std(s)) if s.size else 0.0


def _fmt_std(v: float) -> str:
    return f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}"


def market_flags(scores: ArrayLike, entry: Mapping[str, Any]) -> dict[str, Any]:
    """``{"degenerate": bool, "score_std": float, "reasons": [sentence, …]}`` for one market.

    ``scores`` are the market's predicted scores and ``entry`` its AUC entry (``auc``, ``ci_low``,
    ``ci_high``; ``auc`` ``None`` for a one-class market). Each reason is a sentence with the
    numbers that triggered it, meant to be shown to a user as is.
    """
    std = score_spread(scores)
    auc, lo, hi = entry.get("auc"), entry.get("ci_low"), entry.get("ci_high")
    reasons: list[str] = []
    if auc is not None:  # one class: AUC undefined, say nothing
        if std < SPREAD_FLOOR:
            reasons.append(f"score spread {_fmt_std(std)} < {SPREAD_FLOOR} (near-constant scores)")
        if lo is not None and hi is not None and lo <= CHANCE_AUC <= hi:
            reasons.append(f"AUC {auc:.3f} [{lo:.3f}, {hi:.3f}] is within noise of {CHANCE_AUC}")
    return {"degenerate": bool(reasons), "score_std": std, "reasons": reasons}


def degenerate_markets(table: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{market: reasons}`` of the degenerate markets of an ``auc_table`` result (or a metrics JSON).

    Entries written before this check existed carry no flags and count as not degenerate.
    """
    return {m: list(e.get("degenerate_reasons") or []) for m, e in table.get("markets", {}).items()
            if e.get("degenerate")}


def describe(market: str, reasons: list[str], split: str | None = None, run: str | None = None) -> str:
    """One line for a log or a terminal: which run, split and market, and why."""
    where = ", ".join(x for x in (f"run {run}" if run else "", f"split {split}" if split else "") if x)
    return f"degenerate predictions for market {market}" + (f" ({where})" if where else "") + ": " + "; ".join(reasons)
