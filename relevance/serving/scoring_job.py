"""One scoring job, whichever engine runs it: the pinned model per market, the staging directory, the
manifest that makes it resumable, the reconciled summary and the atomic publication of ``DST``.

A market without a model under the alias does not stop the others (one market lacking a champion
must not leave every market unscored): its valid rows are quarantined as ``market_no_model`` and the
summary says ``status: "partial"`` with ``unscored_markets: {market: rows}``. ``require_all`` restores
the strict behaviour: the job fails before writing anything, naming the markets.

The engines (:mod:`relevance.serving.scoring` in this process, :mod:`relevance.serving.spark_scoring` on
Spark) both drive a :class:`ScoringJob`; neither imports the other's engine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from data_contracts import scores
from data_contracts.markets import validate_market
from relevance.data.dedup import SeenIds
from relevance.data.ingest import _publish
from relevance.serving.registry import client_for, download_model, model_name
from relevance.serving.scoring_input import (
    FileCounts,
    ScoringError,
    discard_parts,
    file_markets,
    plan_inputs,
    rebuild_seen,
)

logger = logging.getLogger(__name__)
MANIFEST, SUMMARY, SEEN = "_manifest.json", "_scoring_summary.json", "_seen_ids.sqlite"
COMPLETE, PARTIAL = "complete", "partial"


class MarketsWithoutModel(ScoringError, LookupError):
    """``require_all`` and some market has no model. A ``LookupError`` too: the flows' retry policy
    (``pipelines/_policy.py``) does not retry it, since no retry makes a model appear."""


@dataclass(frozen=True)
class ModelRef:
    """A pinned registry version: what a market's rows are scored with for the whole job."""

    market: str
    name: str
    version: int
    uri: str


def resolve_models(client: Any, needed: set[str], alias: str, prefix: str, require_all: bool) -> dict[str, ModelRef]:
    """``<prefix>-<market>@<alias>`` of every needed market; a missing one is left out (its rows will be
    quarantined), or with ``require_all`` an error naming the missing markets."""
    from relevance.serving.registry import markets_with_alias, version_by_alias

    refs, missing = {}, []
    for m in sorted(needed):
        name = model_name(m, prefix)
        mv = version_by_alias(client, name, alias)
        if mv is None:
            missing.append(m)
        else:
            refs[m] = ModelRef(m, name, int(mv.version), client.get_model_version_download_uri(name, mv.version))
    if missing and require_all:
        raise MarketsWithoutModel(
            f"market(s) {missing} have no model {prefix}-<market>@{alias} in {client.tracking_uri}; markets with "
            f"one: {markets_with_alias(client, alias, prefix)}. Nothing was written. Register and promote a model, "
            "restrict --markets, or drop --require-all-markets (require_all) to score the other markets and "
            f"quarantine these rows ({scores.MARKET_NO_MODEL})")
    if missing:
        logger.warning("market(s) %s have no model %s-<market>@%s: their rows will be quarantined (%s)",
                       missing, prefix, alias, scores.MARKET_NO_MODEL)
    return refs


def write_json(path: Path, data: Any) -> None:
    """Write aside and rename: a reader never sees half a manifest or summary."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class ScoringJob:
    """Plan, staging directory, manifest and publication of one scoring job (either engine)."""

    def __init__(self, source: str, output: str | os.PathLike, *, engine: str, alias: str, markets: Sequence[str] | None,
                 require_all: bool, prefix: str, tracking_uri: str | None, resume: bool) -> None:
        self.dst = Path(output).absolute()
        self.staging = self.dst.parent / f".{self.dst.name}.scoring"
        self.client = client_for(tracking_uri)
        self.fs, base, self.files = plan_inputs(source)
        if "://" not in source and (self.dst == Path(base) or Path(base) in self.dst.parents):
            raise ScoringError(f"output {self.dst} is inside the input {base}: its files would be read as input "
                               "next time; choose an output directory outside the input")
        self.selection = None if markets is None else sorted({validate_market(m) for m in markets})
        identity = {"input": source, "files": [[f.path, f.size] for f in self.files], "alias": alias,
                    "selection": self.selection, "require_all": require_all, "prefix": prefix, "engine": engine}
        self.manifest = self._resume(identity) if resume else None
        if self.manifest is None:
            needed = set().union(*(file_markets(self.fs, f) for f in self.files))
            if self.selection is not None:
                needed &= set(self.selection)
            models = resolve_models(self.client, needed, alias, prefix, require_all)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            self.manifest = {**identity, "models": {m: asdict(r) for m, r in models.items()}, "done": {},
                             "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "resumed": 0}
            write_json(self.staging / MANIFEST, self.manifest)
        self.models = {m: ModelRef(**r) for m, r in self.manifest["models"].items()}
        self.seen = SeenIds(self.staging / SEEN)

    def _resume(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        """The manifest of an interrupted job over the same input and options, or ``None`` (fresh start)."""
        path = self.staging / MANIFEST
        if not path.is_file():
            logger.info("nothing to resume in %s: starting from scratch", self.staging)
            return None
        manifest = json.loads(path.read_text())
        differ = {k: (manifest.get(k), v) for k, v in identity.items() if manifest.get(k) != v}
        if differ:
            detail = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ScoringError(f"cannot resume {self.staging}: the job changed ({detail}); rerun without --resume to start over")
        (self.staging / SEEN).unlink(missing_ok=True)
        for f in self.files:
            if str(f.index) not in manifest["done"]:
                discard_parts(self.staging, f.index)
        seen = SeenIds(self.staging / SEEN)
        try:
            rebuild_seen(self.staging, seen)
        finally:
            seen.close()
        manifest["resumed"] = int(manifest.get("resumed", 0)) + 1
        logger.info("resuming %s: %d of %d input files already done", self.dst, len(manifest["done"]), len(self.files))
        return manifest

    def no_model_detail(self, market: str) -> str:
        """Quarantine detail of a row of ``market`` when it has no model: what was looked for, what to do."""
        name, alias = model_name(market, self.manifest["prefix"]), self.manifest["alias"]
        return (f"no model {name}@{alias} (models:/{name}@{alias}); markets with one: {sorted(self.models)}. "
                f"Register and promote a model for {market!r}, then rescore")

    def todo(self) -> list:
        """Input files not yet committed."""
        return [f for f in self.files if str(f.index) not in self.manifest["done"]]

    def total_rows(self) -> int:
        import pyarrow.parquet as pq

        total = 0
        for f in self.todo():
            with self.fs.open_input_file(f.path) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total

    def download_models(self, dst: Path, link_weights: bool = True) -> dict[str, Path]:
        """Local copies of the pinned models (one directory per market; ``registry.download_model``)."""
        return {m: download_model(self.client, r.uri, dst / m, link_weights) for m, r in self.models.items()}

    def commit(self, index: int, counts: FileCounts) -> None:
        """Record a finished input file (its parts are already renamed into place)."""
        self.manifest["done"][str(index)] = counts.to_dict()
        write_json(self.staging / MANIFEST, self.manifest)

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Summary (with ``extra`` entries), then swap the staging directory in for ``DST``."""
        summary = {**summarize(self.manifest), **(extra or {})}
        self.close()
        (self.staging / SEEN).unlink(missing_ok=True)
        (self.staging / MANIFEST).unlink()
        write_json(self.staging / SUMMARY, summary)
        _publish(self.staging, self.dst)
        summary["output"] = str(self.dst)
        return summary

    def close(self) -> None:
        self.seen.close()


def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
    """Per-market totals over the committed files; raises if a market does not reconcile (a bug)."""
    rows_in, scored, outside, quarantined = Counter(), Counter(), 0, {}
    for entry in manifest["done"].values():
        rows_in.update(entry["rows_in"])
        scored.update(entry["scored"])
        outside += entry["outside_selection"]
        for m, c in entry["quarantined"].items():
            quarantined.setdefault(m, Counter()).update(c)
    markets = {}
    for m in sorted(rows_in):
        q = dict(sorted(quarantined.get(m, Counter()).items()))
        if rows_in[m] != scored[m] + sum(q.values()):
            raise AssertionError(f"market {m}: rows_in {rows_in[m]} != scored {scored[m]} + quarantined {q}")
        markets[m] = {"rows_in": rows_in[m], "scored": scored[m], "quarantined": q}
    totals = {"rows_in": sum(rows_in.values()), "scored": sum(scored.values()),
              "quarantined": sum(sum(c.values()) for c in quarantined.values()), "outside_selection": outside}
    unscored = {m: v["quarantined"][scores.MARKET_NO_MODEL] for m, v in markets.items()
                if v["quarantined"].get(scores.MARKET_NO_MODEL)}
    keep = ("input", "alias", "prefix", "engine", "selection", "require_all", "models", "started_at", "resumed")
    return {"contract_version": scores.CONTRACT_VERSION, **{k: manifest[k] for k in keep},
            "status": PARTIAL if unscored else COMPLETE, "unscored_markets": unscored, "markets": markets,
            "totals": totals, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def summary_markets(summary: dict[str, Any]) -> list[str]:
    """The markets of a summary, without the ``_invalid`` bucket of rows whose market code is invalid."""
    return [m for m in summary["markets"] if m != scores.INVALID_MARKET_KEY]


def describe_unscored(summary: dict[str, Any]) -> str:
    """One line on what a job left unscored (the CLI's warning, the flow's state message).

    Why shared: the terminal, the Prefect UI and the logs then say the same thing in the same words.
    """
    unscored, total = summary["unscored_markets"], len(summary_markets(summary))
    if not unscored:
        return f"all {total} market(s) scored"
    listed = ", ".join(f"{m} ({n:,} rows)" for m, n in sorted(unscored.items()))
    return (f"{len(unscored)} of {total} market(s) not scored, no model "
            f"{summary['prefix']}-<market>@{summary['alias']}: {listed}. Their rows are in _quarantine/ "
            f"(rule {scores.MARKET_NO_MODEL}); promote a model and rescore, or leave them out with --markets")


def scores_table(rows: pd.DataFrame, values: Any, ref: ModelRef) -> pa.Table:
    """The contract's file columns for scored rows (``market`` is the partition directory)."""
    n = len(rows)
    now = pd.Timestamp.now(tz="UTC")
    return pa.table({"example_id": pa.array(rows["example_id"].astype(str).tolist(), pa.string()),
                     "score": pa.array(values, pa.float64()), "model_name": pa.array([ref.name] * n, pa.string()),
                     "model_version": pa.array([ref.version] * n, pa.int64()),
                     "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC"))}, schema=scores.FILE_SCHEMA)
