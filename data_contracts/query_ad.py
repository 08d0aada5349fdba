"""The query–ad data contract, version 1: what a valid raw row is, and why a bad one is bad.

Written once, used by ingest (training data, ``label`` required) and by batch scoring (the same
contract without ``label``). Validation never drops a row: :func:`validate` splits a batch into
*valid* rows and *quarantined* rows, each quarantined row carrying the name of the rule it broke
(``rule``) and a human-readable ``detail``. ``len(valid) + len(quarantined) == len(batch)``, always.

Row-level rules are one table, :data:`ROW_CHECKS`, run here as pandera checks evaluated lazily (every
failure of a batch is reported, not just the first) and, on Arrow batches, by the vectorised kernels of
:mod:`data_contracts.query_ad_arrow` (ingest's hot path; this module stays the reference). A row
breaking several rules is quarantined once, under the first rule in :data:`RULES` order; ``detail``
lists all of them. Rules that need state across batches (duplicate ``example_id``) and per-file facts
(a missing column, the partition directory) are applied by the caller through :func:`validate`'s
arguments, under the same rule names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_contracts.markets import MARKET_PATTERN

# pandera probes for pyspark when it is installed (the spark extra), and pyspark warns about pandas 3.
warnings.filterwarnings("ignore", message="PySpark does not yet fully support", category=FutureWarning)
import pandera.pandas as pa  # noqa: E402

CONTRACT_VERSION = "query-ad/v1"

MAX_QUERY_CHARS = 2_000
MAX_TITLE_CHARS = 2_000
MAX_DESCRIPTION_CHARS = 10_000

TEXT_COLUMNS = ("example_id", "market", "query", "ad_title", "ad_description", "query_id")
REQUIRED_COLUMNS = ("example_id", "market", "query", "ad_title")
OPTIONAL_COLUMNS = ("ad_description", "query_id")
LABEL = "label"

#: Every rule a row can break, in priority order, with what it means. Names appear in quarantine output.
RULES: dict[str, str] = {
    "missing_column": "a required column is absent from the file",
    "wrong_type": "a value has the wrong type (e.g. label 'yes', a numeric query)",
    "example_id_empty": "example_id is null or blank",
    "market_invalid": f"market does not match {MARKET_PATTERN}",
    "market_partition_mismatch": "the market column disagrees with its market=… partition directory",
    "query_empty": "query is null or blank after trimming",
    "query_too_long": f"query is longer than {MAX_QUERY_CHARS} characters",
    "ad_title_empty": "ad_title is null or blank after trimming",
    "ad_title_too_long": f"ad_title is longer than {MAX_TITLE_CHARS} characters",
    "ad_description_too_long": f"ad_description is longer than {MAX_DESCRIPTION_CHARS} characters",
    "label_not_binary": "label is missing, NaN or not 0/1",
    "duplicate_example_id": "example_id was already seen earlier in the dataset (the first is kept)",
}
_PRIORITY = {name: i for i, name in enumerate(RULES)}
DETAIL_SEP = "; "  # between the failures of one row in ``detail``


@dataclass(frozen=True)
class Validated:
    """A batch split by the contract. ``quarantined`` has the contract columns plus ``rule``, ``detail``."""

    valid: pd.DataFrame
    quarantined: pd.DataFrame


def _is_str(s: pd.Series) -> pd.Series:
    """Element-wise: the value is a Python/NumPy string (nulls are not)."""
    if pd.api.types.is_string_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype):
        return s.notna()
    return s.map(lambda v: isinstance(v, str)).astype(bool)


def _nonblank(s: pd.Series) -> pd.Series:
    return _is_str(s) & s.where(_is_str(s), "").astype(str).str.strip().str.len().gt(0)


def _max_len(limit: int):
    def check(s: pd.Series) -> pd.Series:
        ok_type = _is_str(s)
        return ~ok_type | s.where(ok_type, "").astype(str).str.len().le(limit)

    return check


def _null_or_str(s: pd.Series) -> pd.Series:
    return s.isna() | _is_str(s)


def _label_is_number(s: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
        return pd.Series(True, index=s.index)
    return s.map(
        lambda v: v is None
        or (isinstance(v, (int, float, np.integer, np.floating, bool)) and not isinstance(v, str))
        or v is pd.NA
    ).astype(bool)


def _label_binary(s: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(s.where(_label_is_number(s)), errors="coerce")
    return numeric.isin([0, 1]).astype(bool)


@dataclass(frozen=True)
class RowCheck:
    """One row-level check: ``column`` fails ``rule`` when the ``kind`` test (with ``arg``) is false."""

    column: str
    rule: str
    kind: str  # str_or_null | nonblank | max_len | pattern | number_or_null | binary
    arg: int | str | None = None


#: The row-level checks, column by column in the order they run. The single definition of the row rules:
#: the pandera schema below (the reference) and the Arrow kernels of :mod:`data_contracts.query_ad_arrow`
#: (ingest's hot path) are both built from this table, so a limit or pattern is written only here.
ROW_CHECKS: tuple[RowCheck, ...] = (
    RowCheck("example_id", "wrong_type", "str_or_null"),
    RowCheck("example_id", "example_id_empty", "nonblank"),
    RowCheck("market", "market_invalid", "pattern", MARKET_PATTERN),
    RowCheck("query", "wrong_type", "str_or_null"),
    RowCheck("query", "query_empty", "nonblank"),
    RowCheck("query", "query_too_long", "max_len", MAX_QUERY_CHARS),
    RowCheck("ad_title", "wrong_type", "str_or_null"),
    RowCheck("ad_title", "ad_title_empty", "nonblank"),
    RowCheck("ad_title", "ad_title_too_long", "max_len", MAX_TITLE_CHARS),
    RowCheck("ad_description", "wrong_type", "str_or_null"),
    RowCheck("ad_description", "ad_description_too_long", "max_len", MAX_DESCRIPTION_CHARS),
    RowCheck("query_id", "wrong_type", "str_or_null"),
    RowCheck(LABEL, "wrong_type", "number_or_null"),
    RowCheck(LABEL, "label_not_binary", "binary"),
)


def row_checks(require_label: bool = True) -> tuple[RowCheck, ...]:
    """The checks that apply: the scoring contract (no ``label``) skips the label checks."""
    return tuple(c for c in ROW_CHECKS if require_label or c.column != LABEL)


def _pattern(pattern: str):
    def check(s: pd.Series) -> pd.Series:
        return _is_str(s) & s.where(_is_str(s), "").astype(str).str.fullmatch(pattern)

    return check


def _pandas_check(check: RowCheck) -> pa.Check:
    """The pandera check of one :class:`RowCheck` (element-wise, nulls are checked too)."""
    fns = {
        "str_or_null": lambda: _null_or_str, "nonblank": lambda: _nonblank,
        "number_or_null": lambda: _label_is_number, "binary": lambda: _label_binary,
        "max_len": lambda: _max_len(int(check.arg)), "pattern": lambda: _pattern(str(check.arg)),
    }
    if check.kind not in fns:
        raise ValueError(f"unknown check kind {check.kind!r} of rule {check.rule!r}: expected one of {sorted(fns)}")
    return pa.Check(fns[check.kind](), name=check.rule, ignore_na=False)


def _schema(require_label: bool) -> pa.DataFrameSchema:
    checks: dict[str, list[pa.Check]] = {}
    for check in row_checks(require_label):
        checks.setdefault(check.column, []).append(_pandas_check(check))
    columns = {name: pa.Column(nullable=True, checks=cs) for name, cs in checks.items()}
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


_SCHEMAS: dict[bool, pa.DataFrameSchema] = {}


def schema(require_label: bool = True) -> pa.DataFrameSchema:
    """The pandera schema of the contract (cached; built on first use, not at import)."""
    if require_label not in _SCHEMAS:
        _SCHEMAS[require_label] = _schema(require_label)
    return _SCHEMAS[require_label]


def contract_columns(require_label: bool = True) -> tuple[str, ...]:
    return TEXT_COLUMNS + ((LABEL,) if require_label else ())


def missing_columns(columns: list[str] | tuple[str, ...], require_label: bool = True,
                    partition_market: str | None = None) -> list[str]:
    """Required columns absent from a file (``market`` may come from the partition directory)."""
    need = list(REQUIRED_COLUMNS) + ([LABEL] if require_label else [])
    return [c for c in need if c not in columns and not (c == "market" and partition_market is not None)]


def _row_failures(df: pd.DataFrame, require_label: bool) -> pd.DataFrame:
    """All (row position, rule, detail text) failures of the row-level rules, via pandera lazy validation."""
    try:
        schema(require_label).validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        fc = err.failure_cases
        fc = fc[fc["index"].notna()]
        rules = fc["check"].astype(str).to_numpy()
        texts = [failure_text(r, str(c), v) for r, c, v in zip(rules, fc["column"], fc["failure_case"])]
        return pd.DataFrame({"pos": fc["index"].astype(int).to_numpy(), "rule": rules, "text": texts})
    return pd.DataFrame({"pos": [], "rule": [], "text": []})


def missing_detail(missing: list[str]) -> str:
    return f"missing required column(s) {missing}"


def mismatch_detail(market: object, partition_market: str) -> str:
    return f"market={market!r} but the file is under market={partition_market}"


def duplicate_detail(example_id: object) -> str:
    return f"example_id {example_id!r} seen before; the first occurrence is kept"


def failure_text(rule: str, column: str, value: object) -> str:
    """One failure as ``detail`` lists it (``rule: column=value``); both backends use it."""
    return f"{rule}: {column}={_short(value)}"


def as_text(v: object) -> str | None:
    """A quarantined value as the all-string quarantine table stores it (nulls stay null)."""
    return None if _isnull(v) else (v if isinstance(v, str) else str(v))


def _short(v: object, limit: int = 60) -> str:
    """A failing value as it should read in ``detail``: nulls as null, long strings cut, lengths shown."""
    if _isnull(v):
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, str):
        cut = v[:limit] + ("…" if len(v) > limit else "")
        return f"{cut!r} ({len(v)} chars)"
    return repr(v)


def validate(
    df: pd.DataFrame,
    *,
    require_label: bool = True,
    partition_market: str | None = None,
    missing: list[str] | None = None,
    seen_ids=None,
) -> Validated:
    """Split ``df`` into valid and quarantined rows under contract v1.

    ``partition_market`` is the value of the ``market=`` directory the rows came from (it fills an
    absent ``market`` column and is checked against a present one). ``missing`` names required columns
    the file lacks: every row is then quarantined as ``missing_column``. ``seen_ids`` (an object with
    ``first_occurrence(ids) -> bool mask``) enforces dataset-wide unique ``example_id`` across batches;
    it only sees rows that passed every other rule, so an invalid row never hides a valid duplicate.
    Valid rows come back with the contract columns only, ``label`` as int8.
    """
    df = df.reset_index(drop=True)
    cols = contract_columns(require_label)
    work = pd.DataFrame({c: (df[c] if c in df.columns else pd.Series([None] * len(df), dtype=object)) for c in cols})
    if "market" not in df.columns and partition_market is not None:
        work["market"] = partition_market

    rule = np.full(len(work), None, dtype=object)
    detail = np.full(len(work), "", dtype=object)
    if missing:
        rule[:] = "missing_column"
        detail[:] = missing_detail(missing)
        return _split(work, rule, detail, require_label)

    fails = _row_failures(work, require_label)
    if len(fails):
        fails["prio"] = fails["rule"].map(_PRIORITY).fillna(len(_PRIORITY))
        fails = fails.sort_values(["pos", "prio"], kind="stable")
        msgs = fails["text"].groupby(fails["pos"]).agg(DETAIL_SEP.join)
        first = fails.groupby("pos")["rule"].first()
        rule[first.index.to_numpy()] = first.to_numpy()
        detail[msgs.index.to_numpy()] = msgs.to_numpy()

    if partition_market is not None and "market" in df.columns:
        bad = (rule == None) & (work["market"].astype(object).to_numpy() != partition_market)  # noqa: E711
        rule[bad] = "market_partition_mismatch"
        detail[bad] = [mismatch_detail(v, partition_market) for v in work["market"][bad]]

    if seen_ids is not None:
        ok = np.flatnonzero(rule == None)  # noqa: E711
        first = seen_ids.first_occurrence(work["example_id"].iloc[ok].astype(str).tolist())
        dup = ok[~np.asarray(first, dtype=bool)]
        rule[dup] = "duplicate_example_id"
        detail[dup] = [duplicate_detail(v) for v in work["example_id"].iloc[dup]]
    return _split(work, rule, detail, require_label)


def _split(work: pd.DataFrame, rule: np.ndarray, detail: np.ndarray, require_label: bool) -> Validated:
    bad = rule != None  # noqa: E711
    valid = work.loc[~bad].reset_index(drop=True)
    for c in TEXT_COLUMNS:
        valid[c] = valid[c].astype(object).where(valid[c].notna(), None)
    if require_label:
        valid[LABEL] = pd.to_numeric(valid[LABEL]).astype("int8")
    quarantined = work.loc[bad].reset_index(drop=True).astype(object)
    quarantined = quarantined.map(as_text)
    quarantined["rule"] = rule[bad].astype(str)
    quarantined["detail"] = detail[bad].astype(str)
    return Validated(valid=valid, quarantined=quarantined)


def _isnull(v: object) -> bool:
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):
        return False
