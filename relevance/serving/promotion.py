"""The promotion gate: ``candidate`` becomes ``champion`` only when the evidence says so.

Evidence is the *valid* split of the current data (``--data DS``), scored now by the registered
models themselves (never training-time numbers), with cluster-bootstrap intervals over ``query_id``.
The test split is scored too and reported, never used to decide (:mod:`relevance.serving.selection`
holds the rules: sanity floor, champion − tolerance, shared LoRA − tolerance).

``force`` promotes anyway and needs a ``reason``. Every decision — promoted, refused, forced, or
unchanged — is written as ``gate.*`` tags on the candidate version and as a JSON document (a file under
``report_dir`` and an artifact ``promotions/…json`` of the version's registration run).

**Consistency**: one gate at a time per market (:func:`gate_lock`, a registry-side lock that works on
any MLflow backend); the ``champion`` alias moves in one call, after every measurement, so a store that
fails mid-gate leaves the previous champion in place. An alias names exactly one version, so there are
never two champions.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
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
from relevance.serving.selection import DEFAULT_TOLERANCE, SANITY_FLOOR, Check, check_floor, gate_checks

SPLITS = ("valid", "test")  # valid decides, test is reported
LOCK_WAIT_S, LOCK_STALE_S = 300.0, 3600.0


class GateBusy(RuntimeError):
    """Another gate holds this market's lock."""


def split_frames(data: str | Path, market: str) -> dict[str, Any]:
    """The market's valid and test rows of the current data (a split without rows is left out)."""
    from relevance.data.curated import read_split

    out = {}
    for split in SPLITS:
        try:
            out[split] = read_split(data, split, [market])
        except ValueError:
            continue
    return out


def score_version(client, source: str, frames: dict[str, Any], dst: Path, n_boot: int, batch_size: int,
                  seed: int = 0) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Score every frame with the model at ``source``: ({split: AUC entry}, {split: predictions})."""
    import pandas as pd

    from relevance.evaluation.metrics import auc_table

    model = load_local(download_model(client, source, dst))
    aucs, preds = {}, {}  # in fp32, the reference: a decision must not depend on the hardware it ran on
    for split, frame in frames.items():
        p = pd.DataFrame({"example_id": frame["example_id"], "market": frame["market"], "label": frame["label"],
                          "query_id": frame["query_id"], "score": model.score_frame(frame, batch_size=batch_size,
                                                                              precision="fp32")})
        entry = auc_table(p, n_boot=n_boot, seed=seed)["markets"][str(frame["market"].iloc[0])]
        keys = ("auc", "ci_low", "ci_high", "n", "n_pos", "n_neg", "n_clusters", "status", "score_std", "degenerate",
                "degenerate_reasons")
        aucs[split], preds[split] = {k: entry.get(k) for k in keys}, p
    return aucs, preds


def evidence_note(frames: dict[str, Any], n_boot: int) -> str:
    valid = frames.get("valid")
    if valid is None:
        return "no valid rows: nothing to decide on"
    clusters = valid["query_id"].nunique()
    return (f"valid split: {len(valid)} rows, {clusters} query_id clusters; 95% cluster bootstrap "
            f"({n_boot} resamples); test AUC reported, not used to decide")


@contextmanager
def gate_lock(client, name: str, wait_s: float | None = None, stale_s: float | None = None) -> Iterator[None]:
    """Hold the registry-side lock ``gate-lock.<name>`` (a registered model: creating one is atomic on
    every MLflow backend). Waits up to ``wait_s`` (default ``LOCK_WAIT_S``) for another gate; a lock
    older than ``stale_s`` (default ``LOCK_STALE_S``: its holder died) is broken."""
    from mlflow.exceptions import MlflowException

    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    stale_s = LOCK_STALE_S if stale_s is None else stale_s

    lock, owner = f"gate-lock.{name}", f"{socket.gethostname()} pid {os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"owner": owner}, description="promotion gate lock")
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = client.get_registered_model(lock)
        age = time.time() - (held.creation_timestamp or 0) / 1000
        if age > stale_s:
            client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise GateBusy(f"market model {name} is being decided by another gate ({held.tags.get('owner', '?')}, "
                           f"for {age:.0f} s): retry later, or delete the registered model {lock!r} if that "
                           "process is gone")
        time.sleep(min(2.0, max(0.1, wait_s / 50)))
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def check_args(tolerance: float, force: bool, reason: str | None, floor: float = SANITY_FLOOR) -> None:
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance={tolerance!r} is invalid: expected a non-negative AUC difference such as 0.002")
    if force and not (reason and reason.strip()):
        raise ValueError("--force needs --reason: say why the gate is overridden (it is recorded on the version)")
    check_floor(floor)


def new_decision(market: str, name: str, cand, champ, data: str | Path, tolerance: float, floor: float,
                 force: bool = False, reason: str | None = None) -> dict[str, Any]:
    from relevance.data.curated import data_fingerprint

    return {"market": market, "name": name, "candidate_version": int(cand.version) if cand else None,
            "candidate_method": cand.tags.get("method") if cand else None,
            "champion_version": int(champ.version) if champ else None, "tolerance": tolerance, "floor": floor,
            "data": str(Path(data).absolute()), "data_fingerprint": data_fingerprint(data), "forced": force,
            "force_reason": reason if force else None, "auc": {}, "checks": [], "reasons": [],
            "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def promote(market: str, data: str | Path, *, tracking_uri: str | None = None, prefix: str = DEFAULT_PREFIX,
            tolerance: float = DEFAULT_TOLERANCE, force: bool = False, reason: str | None = None,
            report_dir: str | Path | None = None, n_boot: int = 200, batch_size: int = 64,
            floor: float = SANITY_FLOOR) -> dict[str, Any]:
    """Run the gate for one market's ``candidate`` and return the decision (also tagged and written)."""
    check_args(tolerance, force, reason, floor)
    client = client_for(tracking_uri)
    name = model_name(market, prefix)
    with gate_lock(client, name):
        cand = version_by_alias(client, name, CANDIDATE)
        if cand is None:
            raise LookupError(f"{name} has no {CANDIDATE!r} version in {client.tracking_uri}: register a run first "
                              f"(`ads-relevance register --run RUN`); markets with a candidate: "
                              f"{markets_with_alias(client, CANDIDATE, prefix)}")
        champ = version_by_alias(client, name, CHAMPION)
        decision = new_decision(market, name, cand, champ, data, tolerance, floor, force, reason)
        if champ is not None and champ.version == cand.version:
            decision.update(decision="unchanged", reasons=[f"candidate v{cand.version} is already the champion"])
            return finish(client, name, cand, None, decision, report_dir)
        frames = split_frames(data, market)
        decision["evidence"] = evidence_note(frames, n_boot)
        baseline_uri = cand.tags.get("baseline_model_uri", "none")
        has_baseline = baseline_uri not in ("", "none")
        if "valid" in frames:
            decision["n_valid"] = len(frames["valid"])
            with tempfile.TemporaryDirectory(prefix="ads-relevance-gate-") as tmp:
                cand_uri = client.get_model_version_download_uri(name, cand.version)
                sources = {"candidate": cand_uri}
                if champ is not None:
                    sources["champion"] = client.get_model_version_download_uri(name, champ.version)
                if has_baseline:
                    sources["baseline"] = baseline_uri
                for role, source in sources.items():
                    same = role == "baseline" and source in (cand.source, cand_uri)
                    decision["auc"][role] = (decision["auc"]["candidate"] if same else
                                             score_version(client, source, frames, Path(tmp, role), n_boot,
                                                           batch_size)[0])
            valid = {k: v["valid"]["auc"] for k, v in decision["auc"].items()}
            flags = decision["auc"]["candidate"]["valid"].get("degenerate_reasons") or ()
            added_from = cand.tags.get("added_from", "none")  # a market launched with add-market
            checks = gate_checks(valid["candidate"], valid.get("champion"), valid.get("baseline"),
                                 champ is not None, has_baseline, tolerance, floor, flags,
                                 None if added_from == "none" else added_from)
        else:
            checks = [Check("valid_data", False, f"no valid rows for market {market!r} in {data}: nothing to decide on")]
        passed = all(c.passed for c in checks)
        decision["checks"] = [asdict(c) for c in checks]
        decision["decision"] = "promoted" if passed else ("forced" if force else "refused")
        decision["reasons"] = [c.detail for c in checks] + ([f"forced: {reason}"] if force and not passed else [])
        return finish(client, name, cand, champ, decision, report_dir)


def finish(client, name: str, cand, champ, decision: dict[str, Any], report_dir: str | Path | None) -> dict[str, Any]:
    """Move ``champion`` when the decision says so (one call), then tag and write the decision."""
    if decision["decision"] in ("promoted", "forced"):
        client.set_registered_model_alias(name, CHAMPION, cand.version)
    after = version_by_alias(client, name, CHAMPION)
    decision["champion_after"] = int(after.version) if after else None
    decision["served"] = after is not None
    if cand is not None and decision["decision"] != "unchanged":
        _tag(client, name, cand, champ, decision)
    return _write_json(client, cand, decision, report_dir)


def _tag(client, name: str, cand, champ, decision: dict[str, Any]) -> None:
    """``gate.*`` tags on the candidate (and ``superseded_by`` on the champion it replaced)."""
    auc = decision["auc"]
    tags = {
        "gate.decision": decision["decision"], "gate.reasons": json.dumps(decision["reasons"])[:4900],
        "gate.decided_at": decision["decided_at"], "gate.tolerance": decision["tolerance"],
        "gate.evidence": decision.get("evidence"),
        "gate.candidate_valid_auc": ((auc.get("candidate") or {}).get("valid") or {}).get("auc"),
        "gate.candidate_test_auc": ((auc.get("candidate") or {}).get("test") or {}).get("auc"),
        "gate.champion_version": decision["champion_version"],
        "gate.champion_valid_auc": ((auc.get("champion") or {}).get("valid") or {}).get("auc"),
        "gate.baseline_valid_auc": ((auc.get("baseline") or {}).get("valid") or {}).get("auc"),
        "gate.data_fingerprint": decision["data_fingerprint"], "gate.n_valid": decision.get("n_valid"),
        "gate.forced": str(decision["forced"]).lower(), "gate.force_reason": decision["force_reason"],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, cand.version, key, "none" if value is None else str(value))
    if decision["decision"] in ("promoted", "forced") and champ is not None and champ.version != cand.version:
        client.set_model_version_tag(name, champ.version, "gate.superseded_by", str(cand.version))
        client.set_model_version_tag(name, champ.version, "gate.superseded_at", decision["decided_at"])


def _write_json(client, cand, decision: dict[str, Any], report_dir: str | Path | None) -> dict[str, Any]:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")  # unique: several decisions per second
    version = f"-v{decision['candidate_version']}" if decision.get("candidate_version") else ""
    file_name = f"{decision['name']}{version}-{stamp}-{decision['decision']}.json"
    folder = Path(report_dir) if report_dir is not None else default_home() / "promotions"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    tmp = path.with_name(f".{file_name}.tmp")
    tmp.write_text(json.dumps(decision, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    if cand is not None and cand.run_id:
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
    return [guarded(m, prefix, lambda m=m: promote(m, data, tracking_uri=tracking_uri, prefix=prefix, **kwargs))
            for m in markets]


def guarded(market: str, prefix: str, decide) -> dict[str, Any]:
    """``decide()``, or an ``error`` decision naming what went wrong: one market's failure (a busy lock,
    a model that will not load, a store hiccup) is reported and never stops the other markets."""
    try:
        return decide()
    except Exception as err:  # noqa: BLE001 - reported as this market's decision, loudly
        return {"market": market, "name": model_name(market, prefix), "decision": "error", "served": None,
                "candidate_version": None, "champion_version": None, "reasons": [f"{type(err).__name__}: {err}"]}
