"""Which model a market ships, decided on the *valid* split: plain functions, no MLflow.

Why these rules (issue 12):

- **Selection on valid, confirmation on test.** Every trained method's merged model is a candidate.
  The one with the best valid AUC is preferred, but it has to *earn* its place over the simpler choice
  (the current champion, else shared LoRA): when the paired valid difference's interval (cluster
  bootstrap over ``query_id``) includes 0, the simpler one stands. Test AUC is reported beside the
  choice and never read by it, so the report's test figures stay an honest estimate.
- **A sanity floor, not a beauty contest.** A candidate whose valid AUC is undefined or ≤ ``floor``
  (default 0.55: barely better than a coin) is not a model; a market whose candidates all fail it is
  refused loudly, and keeps whatever champion it had.
- **Degenerate is not healthy.** A candidate whose valid predictions are degenerate (near-constant
  scores, or an AUC whose interval contains 0.5: :mod:`relevance.evaluation.degenerate`) fails the
  sanity check whatever its point AUC, and the reasons are written into the decision.
- **Tolerance on both checks.** The chosen model must reach the champion's valid AUC − tolerance and
  shared LoRA's − tolerance: a difference inside the tolerance is noise, not a regression.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SANITY_FLOOR = 0.55
DEFAULT_TOLERANCE = 0.002
BASELINE_METHOD = "lora"


@dataclass(frozen=True)
class Candidate:
    """One registered model of a market, as measured now on the current data."""

    version: int
    method: str
    valid: Mapping[str, Any]  # {auc, ci_low, ci_high, n, …, degenerate, degenerate_reasons} on the valid split
    test: Mapping[str, Any] = field(default_factory=dict)  # reported only

    @property
    def auc(self) -> float | None:
        value = self.valid.get("auc")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    @property
    def degenerate_reasons(self) -> list[str]:
        """Why the valid predictions are degenerate; empty when they are not (or were never checked)."""
        if not self.valid.get("degenerate"):
            return []
        return list(self.valid.get("degenerate_reasons") or ["valid predictions flagged degenerate"])

    def label(self) -> str:
        return f"v{self.version} ({self.method})"

    def summary(self) -> str:
        """``v3 (mtl-lora) 0.7190``, plus ``⚠ degenerate: …`` with the reasons when it is."""
        flags = self.degenerate_reasons
        return f"{self.label()} {_fmt(self.auc)}" + (f" ⚠ degenerate: {'; '.join(flags)}" if flags else "")


@dataclass(frozen=True)
class Choice:
    """What a market ships and why: ``chosen`` is ``None`` when no candidate is fit to serve."""

    chosen: Candidate | None
    simpler: Candidate | None
    reasons: list[str]
    edge: Mapping[str, Any] | None = None  # paired valid difference chosen-or-best − simpler


def healthy(c: Candidate, floor: float = SANITY_FLOOR) -> bool:
    """Valid AUC defined and above the sanity floor, and valid predictions not degenerate.
    ``floor == 0`` switches both checks off (smoke tests of the mechanics with models that learn nothing)."""
    if floor == 0:
        return c.auc is not None
    return c.auc is not None and c.auc > floor and not c.degenerate_reasons


def check_floor(floor: float) -> float:
    if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not 0 <= floor < 1:
        raise ValueError(f"sanity floor={floor!r} is invalid: expected a valid AUC in [0, 1), e.g. {SANITY_FLOOR}")
    return float(floor)


def _fmt(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.4f}"


def best_candidate(candidates: list[Candidate], floor: float = SANITY_FLOOR) -> Candidate | None:
    """Highest valid AUC among the healthy; ties go to the shared-LoRA model, then the lower version."""
    fit = [c for c in candidates if healthy(c, floor)]
    if not fit:
        return None
    return max(fit, key=lambda c: (c.auc, c.method == BASELINE_METHOD, -c.version))


def candidates_and_champion(candidates: list[Candidate], champion: Candidate | None) -> list[Candidate]:
    """The pool the best is taken from: the new candidates, and the champion (it competes too)."""
    if champion is None or any(c.version == champion.version for c in candidates):
        return list(candidates)
    return [*candidates, champion]


def simpler_choice(candidates: list[Candidate], champion: Candidate | None,
                   floor: float = SANITY_FLOOR) -> Candidate | None:
    """The current champion while it is healthy, else the healthy shared-LoRA candidate, else ``None``."""
    if champion is not None and healthy(champion, floor):
        return champion
    return next((c for c in candidates if c.method == BASELINE_METHOD and healthy(c, floor)), None)


def choose(candidates: list[Candidate], champion: Candidate | None, edge: Mapping[str, Any] | None,
           floor: float = SANITY_FLOOR) -> Choice:
    """Apply the rules of the module docstring.

    ``edge`` is the paired valid difference *best − simpler* (``{diff, ci_low, ci_high, …}`` from
    :func:`relevance.evaluation.metrics.paired_comparison`); the caller computes it for the pair that
    :func:`best_candidate` (over :func:`candidates_and_champion`) and :func:`simpler_choice` name, and
    passes ``None`` when they coincide.
    """
    floor = check_floor(floor)
    pool = candidates_and_champion(candidates, champion)
    best = best_candidate(pool, floor)
    simpler = simpler_choice(candidates, champion, floor)
    listed = ", ".join(c.summary() for c in sorted(pool, key=lambda c: c.version))
    if best is None:
        keep = f"; champion {champion.label()} stays" if champion is not None else "; the market has no model"
        return Choice(None, simpler, [f"every candidate fails the sanity floor (valid AUC ≤ {floor}, or degenerate "
                                      f"valid predictions): {listed}{keep}"])
    if simpler is None:
        return Choice(best, None, [f"best valid AUC: {best.label()} {_fmt(best.auc)} (no champion and no healthy "
                                   f"shared-LoRA candidate to prefer); candidates: {listed}"])
    if best.version == simpler.version:
        role = "champion" if simpler is champion else "shared LoRA"
        return Choice(simpler, simpler, [f"{role} {simpler.label()} has the best valid AUC {_fmt(simpler.auc)}; "
                                         f"candidates: {listed}"])
    if edge is None or edge.get("ci_low") is None:
        raise ValueError(f"choose() needs the paired valid difference {best.label()} − {simpler.label()}")
    role = "champion" if simpler is champion else "shared LoRA"
    span = f"{edge['diff']:+.4f} [{edge['ci_low']:+.4f}, {edge['ci_high']:+.4f}]"
    if edge["ci_low"] > 0:
        return Choice(best, simpler, [f"{best.label()} beats {role} {simpler.label()} on valid by {span}: the "
                                      f"interval excludes 0; candidates: {listed}"], edge)
    return Choice(simpler, simpler, [f"{best.label()} leads {role} {simpler.label()} on valid by {span}, inside "
                                     f"the interval: the simpler {role} stands; candidates: {listed}"], edge)


@dataclass(frozen=True)
class Check:
    """One gate rule's outcome, with the numbers that decided it."""

    name: str
    passed: bool
    detail: str


def _versus(name: str, label: str, candidate: float | None, ref: float | None, tolerance: float) -> Check:
    """candidate ≥ ref − tolerance, with the numbers; undefined AUCs fail (the data needs both classes)."""
    if candidate is None or ref is None:
        return Check(name, False, f"valid AUC undefined (candidate {_fmt(candidate)}, {label} {_fmt(ref)}): "
                                  "the valid data needs both classes")
    ok = candidate >= ref - tolerance
    return Check(name, ok, f"candidate valid AUC {candidate:.4f} {'≥' if ok else '<'} {label} {ref:.4f} − "
                           f"tolerance {tolerance}")


def _sanity(candidate: float | None, floor: float, flags: Sequence[str]) -> Check:
    """AUC above the floor and no degenerate flag; the detail carries the numbers and the reasons."""
    above = candidate is not None and candidate > floor
    detail = f"candidate valid AUC {_fmt(candidate)} {'>' if above else '≤'} sanity floor {floor}"
    if flags:
        detail += f", but its valid predictions are degenerate: {'; '.join(flags)}"
    if floor == 0:
        return Check("sanity", candidate is not None, detail + " (sanity checks off: floor 0)")
    return Check("sanity", above and not flags, detail)


def gate_checks(candidate: float | None, champion: float | None, baseline: float | None,
                has_champion: bool, has_baseline: bool, tolerance: float,
                floor: float = SANITY_FLOOR, candidate_flags: Sequence[str] = (),
                added_from: str | None = None) -> list[Check]:
    """The promotion gate's rules on valid AUCs, as plain data (what a unit test and the decision read).

    ``candidate_flags`` are the reasons the candidate's valid predictions are degenerate
    (:attr:`Candidate.degenerate_reasons`); any fails the sanity check. ``added_from`` names the run a
    market was added to with ``add-market``: no shared LoRA was ever trained on such a market, so
    the baseline check does not apply to it (the sanity floor and the champion still do).
    """
    checks = [_sanity(candidate, floor, candidate_flags)]
    checks.append(_versus("champion", "champion", candidate, champion, tolerance) if has_champion
                  else Check("champion", True, "no champion yet: nothing to fall behind"))
    if not has_baseline and added_from:
        checks.append(Check("baseline", True, f"market added to run {added_from} without retraining: no shared-LoRA "
                                              "model exists for it to compare with"))
        return checks
    checks.append(_versus("baseline", "shared-LoRA", candidate, baseline, tolerance) if has_baseline
                  else Check("baseline", False, "no shared-LoRA baseline is registered with this candidate: register "
                                                "its run again with --baseline-run RUN, or promote with --force --reason"))
    return checks
