"""The promotion gate: ``candidate`` becomes ``champion`` only when the evidence says so.

Rules (issue 5), all measured on the *same current* test split (``--data DS``), scored now by the
registered models themselves, never read from training-time numbers:

1. candidate AUC ≥ champion AUC − ``tolerance`` (skipped for the first model of a market);
2. candidate AUC ≥ the shared-LoRA baseline's AUC (its model is logged with the candidate at
   registration; a candidate registered without a baseline fails this check).

``force`` promotes anyway and needs a ``reason``. Every decision — promoted, refused, forced, or
unchanged — is written as ``gate.*`` tags on the candidate version and as a JSON document (a file under
``report_dir`` and an artifact ``promotions/…json`` of the version's registration run), so the history
of who became champion, on what evidence, stays in the registry.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from relevance.serving.registry import (
    CANDIDATE,
    CHAMPION,
    DEFAULT_PREFIX,
    client_for,
    default_home,
    download_model,
    load_local,
    markets_with_alias,
    model_name,
    version_by_alias,
)

DEFAULT_TOLERANCE = 0.002


@dataclass(frozen=True)
class Check:
    """One gate rule's outcome, with the numbers that decided it."""

    name: str
    passed: bool
    detail: str


def _fmt(auc: float | None) -> str:
    return "undefined" if auc is None else f"{auc:.4f}"


def gate_checks(candidate: float | None, champion: float | None, baseline: float | None,
                has_champion: bool, has_baseline: bool, tolerance: float) -> list[Check]:
    """The gate's rules as plain data (no MLflow): what a unit test and the decision JSON read."""
    checks = []
    if not has_champion:
        checks.append(Check("champion", True, "no champion yet: the first model of a market needs only the baseline check"))
    elif candidate is None or champion is None:
        checks.append(Check("champion", False, f"AUC undefined (candidate {_fmt(candidate)}, champion {_fmt(champion)}): "
                                               "the test data needs both classes"))
    else:
        ok = candidate >= champion - tolerance
        sign = "≥" if ok else "<"
        detail = f"candidate AUC {candidate:.4f} {sign} champion {champion:.4f} − tolerance {tolerance}"
        checks.append(Check("champion", ok, detail))
    if not has_baseline:
        checks.append(Check("baseline", False, "no shared-LoRA baseline is registered with this candidate: register "
                                               "its run again with --baseline-run RUN, or promote with --force --reason"))
    elif candidate is None or baseline is None:
        checks.append(Check("baseline", False, f"AUC undefined (candidate {_fmt(candidate)}, baseline {_fmt(baseline)})"))
    else:
        ok = candidate >= baseline
        detail = f"candidate AUC {candidate:.4f} {'≥' if ok else '<'} shared-LoRA baseline {baseline:.4f}"
        checks.append(Check("baseline", ok, detail))
    return checks


def _test_frame(data: str | Path, market: str):
    from relevance.data.curated import read_split

    try:
        return read_split(data, "test", [market])
    except ValueError:
        return None


def _evaluate(client, source: str, test, dst: Path, n_boot: int, batch_size: int) -> dict[str, Any]:
    """Score ``test`` with the model at ``source``; ``{auc, ci_low, ci_high, n, …}`` of its market."""
    import pandas as pd

    from relevance.evaluation.metrics import auc_table

    model = load_local(download_model(client, source, dst))
    scores = model.score_frame(test, batch_size=batch_size)
    preds = pd.DataFrame({"example_id": test["example_id"], "market": test["market"], "label": test["label"], "score": scores})
    entry = auc_table(preds, n_boot=n_boot)["markets"][str(test["market"].iloc[0])]
    return {k: entry.get(k) for k in ("auc", "ci_low", "ci_high", "n", "n_pos", "n_neg", "status")}


def _check_args(tolerance: float, force: bool, reason: str | None) -> None:
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance={tolerance!r} is invalid: expected a non-negative AUC difference such as 0.002")
    if force and not (reason and reason.strip()):
        raise ValueError("--force needs --reason: say why the gate is overridden (it is recorded on the version)")


def promote(market: str, data: str | Path, *, tracking_uri: str | None = None, prefix: str = DEFAULT_PREFIX,
            tolerance: float = DEFAULT_TOLERANCE, force: bool = False, reason: str | None = None,
            report_dir: str | Path | None = None, n_boot: int = 200, batch_size: int = 64) -> dict[str, Any]:
    """Run the gate for one market and return the decision (also tagged and written as JSON)."""
    from relevance.data.curated import data_fingerprint

    _check_args(tolerance, force, reason)
    client = client_for(tracking_uri)
    name = model_name(market, prefix)
    cand = version_by_alias(client, name, CANDIDATE)
    if cand is None:
        raise LookupError(f"{name} has no {CANDIDATE!r} version in {client.tracking_uri}: register a run first "
                          f"(`ads-relevance register --run RUN`); markets with a candidate: "
                          f"{markets_with_alias(client, CANDIDATE, prefix)}")
    champ = version_by_alias(client, name, CHAMPION)
    decision: dict[str, Any] = {
        "market": market, "name": name, "candidate_version": int(cand.version),
        "champion_version": int(champ.version) if champ else None, "tolerance": tolerance, "data": str(Path(data).absolute()),
        "data_fingerprint": data_fingerprint(data), "forced": force, "force_reason": reason if force else None,
        "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "auc": {}, "checks": [],
    }
    if champ is not None and champ.version == cand.version:
        decision.update(decision="unchanged", reasons=[f"candidate v{cand.version} is already the champion"])
        return _write_json(client, cand, decision, report_dir)
    test = _test_frame(data, market)
    baseline_uri = cand.tags.get("baseline_model_uri", "none")
    has_baseline = baseline_uri not in ("", "none")
    if test is not None:
        decision["n_test"] = len(test)
        with tempfile.TemporaryDirectory(prefix="ads-relevance-gate-") as tmp:
            cand_uri = client.get_model_version_download_uri(name, cand.version)
            decision["auc"]["candidate"] = _evaluate(client, cand_uri, test, Path(tmp, "candidate"), n_boot, batch_size)
            if champ is not None:
                champ_uri = client.get_model_version_download_uri(name, champ.version)
                decision["auc"]["champion"] = _evaluate(client, champ_uri, test, Path(tmp, "champion"), n_boot, batch_size)
            if has_baseline:
                same = baseline_uri == cand.source or baseline_uri == cand_uri
                decision["auc"]["baseline"] = (decision["auc"]["candidate"] if same else
                                               _evaluate(client, baseline_uri, test, Path(tmp, "baseline"), n_boot, batch_size))
        aucs = {k: v["auc"] for k, v in decision["auc"].items()}
        checks = gate_checks(aucs["candidate"], aucs.get("champion"), aucs.get("baseline"),
                             champ is not None, has_baseline, tolerance)
    else:
        checks = [Check("test_data", False, f"no test rows for market {market!r} in {data}: nothing to decide on")]
    passed = all(c.passed for c in checks)
    decision["checks"] = [asdict(c) for c in checks]
    decision["decision"] = "promoted" if passed else ("forced" if force else "refused")
    decision["reasons"] = [c.detail for c in checks] + ([f"forced: {reason}"] if force and not passed else [])
    _record(client, name, cand, champ, decision)
    return _write_json(client, cand, decision, report_dir)


def _record(client, name: str, cand, champ, decision: dict[str, Any]) -> None:
    """``gate.*`` tags on the candidate; the champion alias moves only on promoted / forced."""
    auc = decision["auc"]
    tags = {
        "gate.decision": decision["decision"], "gate.reasons": json.dumps(decision["reasons"])[:4900],
        "gate.decided_at": decision["decided_at"], "gate.tolerance": decision["tolerance"],
        "gate.candidate_auc": (auc.get("candidate") or {}).get("auc"),
        "gate.champion_version": decision["champion_version"], "gate.champion_auc": (auc.get("champion") or {}).get("auc"),
        "gate.baseline_auc": (auc.get("baseline") or {}).get("auc"), "gate.data_fingerprint": decision["data_fingerprint"],
        "gate.n_test": decision.get("n_test"), "gate.forced": str(decision["forced"]).lower(),
        "gate.force_reason": decision["force_reason"],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, cand.version, key, "none" if value is None else str(value))
    if decision["decision"] in ("promoted", "forced"):
        client.set_registered_model_alias(name, CHAMPION, cand.version)
        if champ is not None:
            client.set_model_version_tag(name, champ.version, "gate.superseded_by", str(cand.version))
            client.set_model_version_tag(name, champ.version, "gate.superseded_at", decision["decided_at"])


def _write_json(client, cand, decision: dict[str, Any], report_dir: str | Path | None) -> dict[str, Any]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")  # unique: several decisions per second
    file_name = f"{decision['name']}-v{decision['candidate_version']}-{stamp}-{decision['decision']}.json"
    folder = Path(report_dir) if report_dir is not None else default_home() / "promotions"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    tmp = path.with_name(f".{file_name}.tmp")
    tmp.write_text(json.dumps(decision, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    if cand.run_id:
        client.log_dict(cand.run_id, decision, f"promotions/{file_name}")
    decision["report"] = str(path)
    return decision


def promote_all(data: str | Path, *, tracking_uri: str | None = None, prefix: str = DEFAULT_PREFIX,
                **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`promote` for every market that has a ``candidate`` (sorted by market)."""
    client = client_for(tracking_uri)
    markets = markets_with_alias(client, CANDIDATE, prefix)
    if not markets:
        raise LookupError(f"no {prefix}-<market> model has a {CANDIDATE!r} version in {client.tracking_uri}: "
                          "register a run first")
    return [promote(m, data, tracking_uri=tracking_uri, prefix=prefix, **kwargs) for m in markets]
