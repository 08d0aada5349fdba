"""The batch-scoring output contract, version 1: what ``ads-relevance score`` writes, and its quarantine.

Layout of an output directory ``DST`` (a hive-partitioned Parquet dataset)::

    DST/market=xx/part-*.parquet          one row per valid input row of market xx
    DST/_quarantine/market=xx/part-*.parquet   input rows that were not scored, with rule + detail
    DST/_scoring_summary.json             per market: rows_in = scored + quarantined, models used;
                                          status "complete" | "partial", unscored_markets {market: rows}

Columns of the scores dataset: ``example_id`` (string), ``market`` (string: the ``market=`` partition,
not stored inside the files, as in the curated data), ``score`` (float64 relevance probability in
[0, 1]), ``model_name`` (string, ``<prefix>-<market>``), ``model_version`` (int64, the MLflow registry
version), ``scored_at`` (timestamp, microseconds, UTC). Names starting with ``_`` or ``.`` are
metadata that dataset readers (pyarrow, Spark, pandas) skip: ``pd.read_parquet(DST)`` is the scores.

Quarantine files keep the row's *raw* ``market`` value (``"DE "``, ``"../x"``…) next to the sanitised
``market=`` directory (as ingest's quarantine does), so read them with ``partitioning=None``.

Scoring input is the query–ad contract without ``label`` (``query_ad.validate(require_label=False)``);
rows it rejects are quarantined under its rule names, plus :data:`MARKET_NO_MODEL` for valid rows of a
market that has no model under the requested alias (the default; ``--require-all-markets`` fails the
job instead). Those rows are what ``unscored_markets`` counts, and any makes the status ``"partial"``.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from data_contracts import query_ad
from data_contracts.markets import is_valid_market

CONTRACT_VERSION = "scores/v1"
COLUMNS = ("example_id", "market", "score", "model_name", "model_version", "scored_at")
FILE_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("score", pa.float64()),
    ("model_name", pa.string()),
    ("model_version", pa.int64()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])
QUARANTINE_SCHEMA = pa.schema(
    [(c, pa.string()) for c in query_ad.contract_columns(require_label=False)]
    + [("source_file", pa.string()), ("rule", pa.string()), ("detail", pa.string())]
)
MARKET_NO_MODEL = "market_no_model"
RULES: dict[str, str] = {
    **{k: v for k, v in query_ad.RULES.items() if k != "label_not_binary"},
    MARKET_NO_MODEL: "the row's market has no model <prefix>-<market>@<alias> (the job's status is partial)",
}
INVALID_MARKET_KEY = "_invalid"  # quarantine partition of rows whose market is not a valid code


def quarantine_key(market: object) -> str:
    """The ``market=`` directory a quarantined row goes to: its market if valid, else ``_invalid``.

    Codes are validated before they become a path, so ``market=../x`` can never be written.
    """
    return market if is_valid_market(market) else INVALID_MARKET_KEY  # type: ignore[return-value]


def check_scores(df: pd.DataFrame) -> list[str]:
    """Problems of a scores frame read back from ``DST`` (empty list: it meets the contract)."""
    problems = [f"missing column {c!r}" for c in COLUMNS if c not in df.columns]
    if problems:
        return problems
    if df["example_id"].isna().any():
        problems.append("null example_id")
    dup = df["example_id"].duplicated()
    if dup.any():
        problems.append(f"{int(dup.sum())} duplicated example_id(s), e.g. {df.loc[dup, 'example_id'].iloc[0]!r}")
    scores = pd.to_numeric(df["score"], errors="coerce")
    bad = scores.isna() | (scores < 0) | (scores > 1)
    if bad.any():
        problems.append(f"{int(bad.sum())} score(s) missing or outside [0, 1]")
    wrong = [m for m in df["market"].astype(str).unique() if not is_valid_market(m)]
    if wrong:
        problems.append(f"invalid market partition(s) {wrong[:5]}")
    # model names are <prefix>-<market>: checked by suffix, without assuming the prefix
    ends = [n for n, m in zip(df["model_name"].astype(str), df["market"].astype(str)) if not n.endswith(f"-{m}")]
    if ends:
        problems.append(f"{len(ends)} row(s) scored by another market's model, e.g. {ends[0]!r}")
    return problems
