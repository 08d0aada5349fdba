"""Every market gets the model its evidence supports.

One call (:func:`select_models`, the CLI's ``select`` and the pipeline's last training step) registers
the merged per-market models of every trained method, then decides each market on its own:

1. score every candidate version (and the current champion) on the market's *valid* and *test* rows
   of the current data, with the registered models themselves;
2. choose with :func:`relevance.serving.selection.choose` (best valid AUC, unless its edge over the
   simpler champion / shared LoRA is inside the paired cluster-bootstrap interval; sanity floor);
3. point ``candidate`` at the choice, run the gate's checks (:func:`relevance.serving.selection.gate_checks`)
   and move ``champion`` when they pass; record the decision like :mod:`relevance.serving.promotion`.

A market is decided under its gate lock, and a failure in one market becomes that market's ``error``
decision: the others are still decided.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relevance.serving.promotion import (
    evidence_note,
    finish,
    gate_lock,
    guarded,
    new_decision,
    score_version,
    split_frames,
    check_args,
)
from relevance.serving.registry import CANDIDATE, CHAMPION, DEFAULT_PREFIX, client_for, model_name, register, version_by_alias
from relevance.serving.selection import (
    BASELINE_METHOD,
    DEFAULT_TOLERANCE,
    SANITY_FLOOR,
    Candidate,
    best_candidate,
    candidates_and_champion,
    choose,
    gate_checks,
    simpler_choice,
)
from relevance.training.runs import read_training_run


def select_models(run_dirs: Sequence[str | Path], data: str | Path, *, tracking_uri: str | None = None,
                  prefix: str = DEFAULT_PREFIX, tolerance: float = DEFAULT_TOLERANCE, floor: float = SANITY_FLOOR,
                  report_dir: str | Path | None = None, n_boot: int = 200, batch_size: int = 64) -> dict[str, Any]:
    """Register every run (shared LoRA first, so the others link to it as their baseline), then decide
    every market any run was trained on. Returns ``{"registered": [...], "decisions": [...]}``."""
    check_args(tolerance, False, None, floor)
    if not run_dirs:
        raise ValueError("no training runs given: pass at least one run directory (--run RUN)")
    runs = sorted((read_training_run(r) for r in run_dirs), key=lambda r: r.method != BASELINE_METHOD)
    methods = [r.method for r in runs]
    if len(set(methods)) != len(methods):
        raise ValueError(f"several runs of one method {methods}: pass one run per method")
    from relevance.data.curated import data_fingerprint

    current = data_fingerprint(data)
    stale = [str(r.path) for r in runs if current and r.info.get("data_fingerprint") not in (None, current)]
    if stale:
        raise ValueError(f"runs {stale} were trained on other data than {data} (ingest_summary.json differs): "
                         "choose on the data the runs were trained on, or retrain them")
    baseline = runs[0].path if runs[0].method == BASELINE_METHOD else None
    registered: list[dict[str, Any]] = []
    for run in runs:
        registered += register(run.path, tracking_uri=tracking_uri, prefix=prefix, set_candidate=False,
                               baseline_run=baseline)
    client = client_for(tracking_uri)
    by_market: dict[str, list[dict[str, Any]]] = {}
    for row in registered:
        by_market.setdefault(row["market"], []).append(row)
    added = {m: str(r.path) for r in runs for m in (r.info.get("added_markets") or [])}  # add-market runs
    decisions = [guarded(m, prefix, lambda m=m: decide_market(client, m, by_market[m], data, prefix=prefix,
                                                              tolerance=tolerance, floor=floor, report_dir=report_dir,
                                                              n_boot=n_boot, batch_size=batch_size,
                                                              added_from=added.get(m)))
                 for m in sorted(by_market)]
    return {"registered": registered, "decisions": decisions}


def decide_market(client, market: str, versions: Sequence[dict[str, Any]], data: str | Path, *, prefix: str,
                  tolerance: float, floor: float, report_dir: str | Path | None, n_boot: int,
                  batch_size: int, added_from: str | None = None) -> dict[str, Any]:
    """Choose, gate and record one market (module docstring)."""
    name = model_name(market, prefix)
    with gate_lock(client, name):
        champ = version_by_alias(client, name, CHAMPION)
        decision = new_decision(market, name, None, champ, data, tolerance, floor)
        frames = split_frames(data, market)
        decision["evidence"] = evidence_note(frames, n_boot)
        if "valid" not in frames:
            decision.update(decision="refused", reasons=[f"no valid rows for market {market!r} in {data}: nothing "
                                                         "to choose on" + ("; the champion stays" if champ else "")])
            return finish(client, name, None, champ, decision, report_dir)
        decision["n_valid"] = len(frames["valid"])
        cands, preds, champ_cand = _measure(client, name, versions, champ, frames, n_boot, batch_size)
        best = best_candidate(candidates_and_champion(cands, champ_cand), floor)
        simpler = simpler_choice(cands, champ_cand, floor)
        edge = None
        if best is not None and simpler is not None and best.version != simpler.version:
            from relevance.evaluation.metrics import paired_comparison

            diff = paired_comparison(preds[simpler.version], preds[best.version], n_boot=n_boot)
            edge = diff["markets"][market]
        choice = choose(cands, champ_cand, edge, floor)
        decision["candidates"] = {c.label(): {"version": c.version, "method": c.method, "valid": dict(c.valid),
                                              "test": dict(c.test)} for c in cands}
        if champ_cand is not None:
            decision["auc"]["champion"] = {"valid": dict(champ_cand.valid), "test": dict(champ_cand.test)}
        if edge is not None:
            decision["edge"] = {k: edge.get(k) for k in ("diff", "ci_low", "ci_high", "p_value")}
        if choice.chosen is None:
            decision.update(decision="refused", reasons=choice.reasons)
            return finish(client, name, None, champ, decision, report_dir)
        chosen = choice.chosen
        cand = client.get_model_version(name, str(chosen.version))
        client.set_registered_model_alias(name, CANDIDATE, chosen.version)
        decision.update(candidate_version=chosen.version, candidate_method=chosen.method)
        decision["auc"]["candidate"] = {"valid": dict(chosen.valid), "test": dict(chosen.test)}
        if champ is not None and int(champ.version) == chosen.version:
            decision.update(decision="unchanged", reasons=choice.reasons)
            return finish(client, name, cand, champ, decision, report_dir)
        base = next((c for c in cands if c.method == BASELINE_METHOD), None)
        if base is not None:
            decision["auc"]["baseline"] = {"valid": dict(base.valid), "test": dict(base.test)}
        checks = gate_checks(chosen.auc, champ_cand.auc if champ_cand else None, base.auc if base else None,
                             champ is not None, base is not None, tolerance, floor, chosen.degenerate_reasons,
                             added_from)
        decision["checks"] = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]
        decision["decision"] = "promoted" if all(c.passed for c in checks) else "refused"
        decision["reasons"] = choice.reasons + [c.detail for c in checks]
        return finish(client, name, cand, champ, decision, report_dir)


def _measure(client, name: str, versions: Sequence[dict[str, Any]], champ, frames: dict[str, Any], n_boot: int,
             batch_size: int) -> tuple[list[Candidate], dict[int, Any], Candidate | None]:
    """Score each candidate version and the champion (once, even when it is also a candidate)."""
    todo = {int(v["version"]): v["method"] for v in versions}
    if champ is not None:
        todo.setdefault(int(champ.version), champ.tags.get("method", "unknown"))
    measured, preds = {}, {}
    with tempfile.TemporaryDirectory(prefix="ads-relevance-select-") as tmp:
        for version, method in sorted(todo.items()):
            uri = client.get_model_version_download_uri(name, str(version))
            aucs, p = score_version(client, uri, frames, Path(tmp, f"v{version}"), n_boot, batch_size)
            measured[version] = Candidate(version, method, aucs["valid"], aucs.get("test", {}))
            preds[version] = p["valid"]
    cands = [measured[int(v["version"])] for v in versions]
    return cands, preds, measured[int(champ.version)] if champ is not None else None
