"""The input side of batch scoring: planning files, streaming windows, validation, quarantine, parts.

Shared by both engines (:mod:`relevance.serving.scoring` local, :mod:`relevance.serving.spark_scoring`). Reuses the
ingest's discovery helpers (``resolve_filesystem``, ``discover_files``, ``partition_market``), the
query–ad contract's ``validate`` and ``SeenIds`` (dataset-wide unique ``example_id``), so scoring
rejects exactly the rows ingest would, under the same rule names.

Parts of one input file are named ``part-<file index>.parquet`` and written aside
(``.part-….parquet.tmp``), renamed only when the whole file is done: a killed job leaves either a
complete file's parts or parts that :func:`discard_parts` removes before the file is redone.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import query_ad, scores
from data_contracts.markets import is_valid_market
from relevance.data.dedup import SeenIds
from relevance.data.ingest import IngestError, discover_files, partition_market, resolve_filesystem


class ScoringError(RuntimeError):
    """The job cannot run as asked (corrupt input, unknown market, changed input on resume)."""


def generic_no_model_detail(market: str) -> str:
    """Quarantine detail of a row whose market has no model, when the caller gives no better one."""
    return f"no model for market {market!r} under the requested alias"


@dataclass(frozen=True)
class InputFile:
    index: int
    path: str
    market: str | None  # the market=… partition value, if any
    size: int
    columns: tuple[str, ...]


@dataclass
class FileCounts:
    """What one input file contributed, per market (kept in the manifest)."""

    rows_in: Counter = field(default_factory=Counter)
    scored: Counter = field(default_factory=Counter)
    quarantined: dict[str, Counter] = field(default_factory=dict)
    outside_selection: int = 0

    def quarantine(self, market: str, rules: Sequence[str]) -> None:
        self.quarantined.setdefault(market, Counter()).update(rules)

    def to_dict(self) -> dict[str, Any]:
        return {"rows_in": dict(self.rows_in), "scored": dict(self.scored), "outside_selection": self.outside_selection,
                "quarantined": {m: dict(c) for m, c in self.quarantined.items()}}


def plan_inputs(source: str) -> tuple[Any, str, list[InputFile]]:
    """(filesystem, base, files) with every file's footer opened: a corrupt file fails here, named."""
    fs, base = resolve_filesystem(source)
    try:
        paths = discover_files(fs, base)
    except IngestError as err:
        raise ScoringError(f"scoring input: {err}") from err
    files = []
    for i, path in enumerate(paths):
        try:
            with fs.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh)
                columns = tuple(meta.schema_arrow.names)
                size = fh.size()
        except Exception as err:  # pyarrow raises several types for garbage
            raise ScoringError(f"cannot read input file {path} as Parquet ({type(err).__name__}: {err}); "
                               "nothing was written: fix or remove the file and rerun") from err
        files.append(InputFile(i, path, partition_market(path, base), size, columns))
    return fs, base, files


def file_markets(fs: Any, f: InputFile) -> set[str]:
    """Valid market codes a file's rows can be scored under (partition, else its market column)."""
    if f.market is not None:
        return {f.market} if is_valid_market(f.market) else set()
    if "market" not in f.columns:
        return set()
    with fs.open_input_file(f.path) as fh:
        values = pq.read_table(fh, columns=["market"]).column("market").unique().to_pylist()
    return {m for m in values if is_valid_market(m)}


class PartWriters:
    """Per-(kind, market) ParquetWriters of one input file, written aside and renamed on commit."""

    def __init__(self, root: Path, index: int):
        self.root, self.index = root, index
        self.open: dict[tuple[str, str], tuple[pq.ParquetWriter, Path, Path]] = {}

    def write(self, kind: str, market: str, table: pa.Table) -> None:
        key = (kind, market)
        if key not in self.open:
            folder = self.root / (f"market={market}" if kind == "scores" else f"_quarantine/market={market}")
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / f"part-{self.index:05d}.parquet"
            tmp = folder / f".part-{self.index:05d}.parquet.tmp"
            self.open[key] = (pq.ParquetWriter(tmp, table.schema), tmp, final)
        self.open[key][0].write_table(table)

    def commit(self) -> None:
        for writer, tmp, final in self.open.values():
            writer.close()
            os.replace(tmp, final)
        self.open.clear()

    def abort(self) -> None:
        for writer, _, _ in self.open.values():
            writer.close()
        self.open.clear()


def discard_parts(root: Path, index: int) -> None:
    """Remove every (partial or renamed) part of input file ``index``: it is about to be redone."""
    names = {f"part-{index:05d}.parquet", f".part-{index:05d}.parquet.tmp"}
    for path in root.rglob("*part-*"):
        if path.name in names:
            path.unlink()


def rebuild_seen(root: Path, seen: SeenIds) -> None:
    """Feed ids of already committed rows back into a fresh ``SeenIds`` (the state after those files)."""
    for path in sorted(root.glob("market=*/part-*.parquet")) + sorted(root.glob("_valid/market=*/part-*.parquet")):
        seen.first_occurrence(pq.read_table(path, columns=["example_id"]).column("example_id").to_pylist())
    for path in sorted(root.glob("_quarantine/market=*/part-*.parquet")):
        t = pq.read_table(path, columns=["example_id", "rule"]).to_pandas()
        seen.first_occurrence(t.loc[t["rule"] == scores.MARKET_NO_MODEL, "example_id"].astype(str).tolist())


def _quarantine_table(q: pd.DataFrame, source: str) -> pa.Table:
    q = q.copy()
    q["source_file"] = source
    for c in scores.QUARANTINE_SCHEMA.names:
        if c not in q.columns:
            q[c] = None
    return pa.Table.from_pandas(q[scores.QUARANTINE_SCHEMA.names], schema=scores.QUARANTINE_SCHEMA, preserve_index=False)


def process_file(fs: Any, f: InputFile, writers: PartWriters, seen: SeenIds, known: Collection[str],
                 selection: set[str] | None, window: int, on_valid: Callable[[str, pd.DataFrame], int],
                 on_window: Callable[[int], None] | None = None, *,
                 no_model_detail: Callable[[str], str] = generic_no_model_detail) -> FileCounts:
    """Stream one file: select, validate, quarantine; ``on_valid(market, rows)`` scores or stores rows.

    ``known`` are the markets with a model; valid rows of other markets are quarantined
    (``market_no_model``, detail ``no_model_detail(market)``: the job names the model and alias it
    looked for, so the row says what to promote). ``on_window(n_rows)`` runs after each window (tests
    kill the job there).
    """
    counts = FileCounts()
    if selection is not None and f.market is not None and f.market not in selection:
        counts.outside_selection = _num_rows(fs, f)
        return counts
    missing = query_ad.missing_columns(list(f.columns), require_label=False, partition_market=f.market)
    try:
        with fs.open_input_file(f.path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=window):
                df = batch.to_pandas()
                if selection is not None and f.market is None:
                    keep = df["market"].isin(selection) if "market" in df.columns else pd.Series(False, index=df.index)
                    counts.outside_selection += int((~keep).sum())
                    df = df[keep]
                _process_window(df, f, missing, writers, seen, known, on_valid, counts, no_model_detail)
                if on_window is not None:
                    on_window(len(df))
    except (pa.ArrowException, OSError) as err:
        raise ScoringError(f"cannot read input file {f.path} ({type(err).__name__}: {err}); the output "
                           "directory was not touched: fix or remove the file and rerun") from err
    return counts


def _num_rows(fs: Any, f: InputFile) -> int:
    with fs.open_input_file(f.path) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def _keys(markets: Any, f: InputFile) -> list[str]:
    """Counting / quarantine key of each row: the file's partition market if any (as ingest does),
    else the row's market; invalid codes become ``_invalid`` before they can become a path."""
    if f.market is not None:
        return [scores.quarantine_key(f.market)] * len(markets)
    return [scores.quarantine_key(m) for m in markets]


def _process_window(df: pd.DataFrame, f: InputFile, missing: list[str], writers: PartWriters, seen: SeenIds,
                    known: Collection[str], on_valid: Callable[[str, pd.DataFrame], int], counts: FileCounts,
                    no_model_detail: Callable[[str], str]) -> None:
    res = query_ad.validate(df, require_label=False, partition_market=f.market, missing=missing, seen_ids=seen)
    counts.rows_in.update(_keys(df["market"] if "market" in df.columns else [None] * len(df), f))
    valid, quarantined = res.valid, res.quarantined
    unknown = ~valid["market"].isin(list(known))
    if unknown.any():
        extra = valid[unknown].copy()
        extra["rule"] = scores.MARKET_NO_MODEL
        details = {m: no_model_detail(str(m)) for m in extra["market"].unique()}
        extra["detail"] = extra["market"].map(details)
        quarantined = pd.concat([quarantined, extra], ignore_index=True)
        valid = valid[~unknown]
    for market, group in valid.groupby("market", sort=True):
        counts.scored[str(market)] += on_valid(str(market), group.reset_index(drop=True))
    if len(quarantined):
        quarantined["_key"] = _keys(quarantined["market"], f)
        for key, group in quarantined.groupby("_key", sort=True):
            writers.write("quarantine", str(key), _quarantine_table(group.drop(columns="_key"), f.path))
            counts.quarantine(str(key), group["rule"].tolist())
