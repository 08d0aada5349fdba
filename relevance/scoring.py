"""Batch scoring: every valid query–ad row of every market, scored by its market's registered model.

Output contract: :mod:`data_contracts.scores`. How the job keeps its promises:

- **Bounded memory.** Input is streamed in record batches of ``window`` rows; within a window each
  market's rows are sorted by token length before batching (``RelevanceModel.score_frame``), so padding
  wastes little compute; forwards run under ``torch.inference_mode``.
- **Bad rows never crash it.** Windows are validated against the scoring contract and rejected rows go
  to ``_quarantine/`` with rule and detail (:mod:`relevance.scoring_input`).
- **Fail before writing.** Every input footer is opened and every market's model resolved before
  anything is written: a corrupt file or a market without a model (unless ``skip_unknown``) is an error
  naming it, and ``DST`` is untouched.
- **Atomic, resumable.** The output is built in the hidden sibling ``.DST.scoring`` and renamed over
  ``DST`` at the end. A finished input file's parts are renamed into place and then recorded in
  ``_manifest.json``; with ``resume``, a killed job skips recorded files and redoes the others from
  scratch, with the model versions it started with, so every input row lands exactly once.

The ``DST`` of a job must be a local path (it is renamed into place); the input may be any pyarrow
filesystem URI. The Spark engine (:mod:`relevance.spark_scoring`) shares :class:`ScoringJob`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from data_contracts import scores
from data_contracts.markets import validate_market
from relevance.dedup import SeenIds
from relevance.ingest import _publish
from relevance.registry import DEFAULT_PREFIX, client_for, download_model, load_local
from relevance.scoring_input import (
    FileCounts,
    PartWriters,
    ScoringError,
    discard_parts,
    file_markets,
    plan_inputs,
    process_file,
    rebuild_seen,
)

logger = logging.getLogger(__name__)
ENGINES = ("local", "spark")
MANIFEST, SUMMARY, SEEN = "_manifest.json", "_scoring_summary.json", "_seen_ids.sqlite"
__all__ = ["ENGINES", "ModelRef", "ScoringError", "ScoringJob", "score_dataset", "score_local"]


@dataclass(frozen=True)
class ModelRef:
    """A pinned registry version: what a market's rows are scored with for the whole job."""

    market: str
    name: str
    version: int
    uri: str


def resolve_models(client: Any, needed: set[str], alias: str, prefix: str, skip_unknown: bool) -> dict[str, ModelRef]:
    """``<prefix>-<market>@<alias>`` of every needed market; a missing one is an error unless skipped."""
    from relevance.registry import markets_with_alias, model_name, version_by_alias

    refs, missing = {}, []
    for m in sorted(needed):
        name = model_name(m, prefix)
        mv = version_by_alias(client, name, alias)
        if mv is None:
            missing.append(m)
        else:
            refs[m] = ModelRef(m, name, int(mv.version), client.get_model_version_download_uri(name, mv.version))
    if missing and not skip_unknown:
        raise ScoringError(
            f"market(s) {missing} have no model {prefix}-<market>@{alias} in {client.tracking_uri}; markets with "
            f"one: {markets_with_alias(client, alias, prefix)}. Register and promote a model, restrict --markets, "
            "or pass --skip-unknown to quarantine their rows")
    return refs


def write_json(path: Path, data: Any) -> None:
    """Write aside and rename: a reader never sees half a manifest or summary."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class ScoringJob:
    """Plan, staging directory, manifest and publication of one scoring job (either engine)."""

    def __init__(self, source: str, output: str | os.PathLike, *, engine: str, alias: str, markets: Sequence[str] | None,
                 skip_unknown: bool, prefix: str, tracking_uri: str | None, resume: bool) -> None:
        self.dst = Path(output).absolute()
        self.staging = self.dst.parent / f".{self.dst.name}.scoring"
        self.client = client_for(tracking_uri)
        self.fs, base, self.files = plan_inputs(source)
        if "://" not in source and (self.dst == Path(base) or Path(base) in self.dst.parents):
            raise ScoringError(f"output {self.dst} is inside the input {base}: its files would be read as input "
                               "next time; choose an output directory outside the input")
        self.selection = None if markets is None else sorted({validate_market(m) for m in markets})
        identity = {"input": source, "files": [[f.path, f.size] for f in self.files], "alias": alias,
                    "selection": self.selection, "skip_unknown": skip_unknown, "prefix": prefix, "engine": engine}
        self.manifest = self._resume(identity) if resume else None
        if self.manifest is None:
            needed = set().union(*(file_markets(self.fs, f) for f in self.files))
            if self.selection is not None:
                needed &= set(self.selection)
            models = resolve_models(self.client, needed, alias, prefix, skip_unknown)
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

    def download_models(self, dst: Path) -> dict[str, Path]:
        """Local copies of the pinned models (one directory per market)."""
        return {m: download_model(self.client, r.uri, dst / m) for m, r in self.models.items()}

    def commit(self, index: int, counts: FileCounts) -> None:
        """Record a finished input file (its parts are already renamed into place)."""
        self.manifest["done"][str(index)] = counts.to_dict()
        write_json(self.staging / MANIFEST, self.manifest)

    def finish(self) -> dict[str, Any]:
        """Summary, then swap the staging directory in for ``DST``."""
        summary = summarize(self.manifest)
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
    keep = ("input", "alias", "engine", "selection", "models", "started_at", "resumed")
    return {"contract_version": scores.CONTRACT_VERSION, **{k: manifest[k] for k in keep}, "markets": markets,
            "totals": totals, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def scores_table(rows: pd.DataFrame, values: Any, ref: ModelRef) -> pa.Table:
    """The contract's file columns for scored rows (``market`` is the partition directory)."""
    n = len(rows)
    now = pd.Timestamp.now(tz="UTC")
    return pa.table({"example_id": pa.array(rows["example_id"].astype(str).tolist(), pa.string()),
                     "score": pa.array(values, pa.float64()), "model_name": pa.array([ref.name] * n, pa.string()),
                     "model_version": pa.array([ref.version] * n, pa.int64()),
                     "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC"))}, schema=scores.FILE_SCHEMA)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc="score", disable=not enabled, file=sys.stderr)


def score_local(source: str, output: str | os.PathLike, *, tracking_uri: str | None = None, alias: str = "champion",
                markets: Sequence[str] | None = None, resume: bool = False, skip_unknown: bool = False,
                prefix: str = DEFAULT_PREFIX, batch_size: int = 64, window: int = 4096, bf16: bool = False,
                progress: bool = False, on_window: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The streaming engine in this process (module docstring); returns the summary.

    Without ``resume``, what an interrupted job left in the staging directory is discarded.
    ``on_window(n_rows)`` runs after every streamed window (progress hooks; tests kill the job there).
    """
    if window < 1 or batch_size < 1:
        raise ValueError(f"window={window} and batch_size={batch_size} must be positive integers")
    job = ScoringJob(source, output, engine="local", alias=alias, markets=markets, skip_unknown=skip_unknown,
                     prefix=prefix, tracking_uri=tracking_uri, resume=resume)
    tmp = Path(tempfile.mkdtemp(prefix="ads-relevance-models-"))
    bar = _progress(job.total_rows(), progress)
    try:
        models = {m: load_local(p) for m, p in job.download_models(tmp).items()}
        selection = set(job.selection) if job.selection is not None else None
        for f in job.todo():
            writers = PartWriters(job.staging, f.index)

            def on_valid(market: str, rows: pd.DataFrame, writers: PartWriters = writers) -> int:
                values = models[market].score_frame(rows, batch_size=batch_size, bf16=bf16)
                writers.write("scores", market, scores_table(rows, values, job.models[market]))
                return len(rows)

            def tick(n: int) -> None:
                bar.update(n)
                if on_window is not None:
                    on_window(n)

            try:
                counts = process_file(job.fs, f, writers, job.seen, set(models), selection, window, on_valid, tick)
            except BaseException:
                writers.abort()
                raise
            writers.commit()
            job.commit(f.index, counts)
        return job.finish()
    finally:
        bar.close()
        job.close()
        shutil.rmtree(tmp, ignore_errors=True)


def score_dataset(source: str, output: str | os.PathLike, *, engine: str = "local", **kwargs: Any) -> dict[str, Any]:
    """Score ``source`` into ``output`` with ``engine`` (``local`` or ``spark``); returns the summary."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is invalid: expected one of {list(ENGINES)}")
    if engine == "spark":
        from relevance.spark_scoring import score_with_spark

        return score_with_spark(source, output, **kwargs)
    kwargs.pop("spark_master", None)  # meaningful to the Spark engine only
    return score_local(source, output, **kwargs)
