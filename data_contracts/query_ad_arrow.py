"""Contract v1 on Arrow record batches: ingest's hot path, with the semantics of the pandera reference.

Why a second backend: pandera runs every check through pandas with per-row bookkeeping of failure cases,
which cost about half of ingest's time. Here each :class:`~data_contracts.query_ad.RowCheck` of
:data:`~data_contracts.query_ad.ROW_CHECKS` (the one definition of the row rules: limits, pattern,
order) becomes one vectorised Arrow kernel giving a per-row "fails" mask; ``rule`` and ``detail`` are
built in Python only for the (few) failing rows, with the reference's own text helpers, so they read
the same. Batches whose column types the kernels do not cover (a string ``label``, a numeric
``query``…: the ``wrong_type`` cases) are declined by :func:`supports`; the caller then uses the
reference :func:`data_contracts.query_ad.validate`.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_contracts import query_ad
from data_contracts.query_ad import LABEL, RULES, RowCheck, contract_columns, row_checks

_PRIORITY = {name: i for i, name in enumerate(RULES)}
QUARANTINE_COLUMNS = ("rule", "detail")


@dataclass(frozen=True)
class ArrowValidated:
    """A batch split by the contract: ``valid`` (text as string, ``label`` int8) and ``quarantined``
    (every contract column as text, plus ``rule`` and ``detail``), rows in batch order."""

    valid: pa.Table
    quarantined: pa.Table


def _text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _label_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_float64(t) or pa.types.is_null(t) or _text_type(t)


def supports(schema: pa.Schema, require_label: bool = True) -> bool:
    """True when every contract column present has a type the kernels handle exactly like pandas would
    (text: string/large_string/null; label: integer/float64/null, or text: every value is then
    ``wrong_type``, as the reference says of ``"yes"`` and of ``"1"``). Otherwise use the reference."""
    for name in contract_columns(require_label):
        if name in schema.names:
            ok = _label_type if name == LABEL else _text_type
            if not ok(schema.field(name).type):
                return False
    return True


@functools.lru_cache(maxsize=1)
def blank_regex() -> str:
    """RE2 pattern of a string that Python's ``str.strip()`` empties: the reference's notion of blank.
    Built from ``str.isspace`` (29 code points), not from Arrow's own whitespace definition."""
    spaces = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()]
    return "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in spaces) + "]*$"


def _fails(check: RowCheck, col: pa.Array) -> np.ndarray:
    """The per-row failure mask of one check (nulls are checked too, as ``ignore_na=False`` does)."""
    n = len(col)
    text = pa.types.is_string(col.type)
    if check.kind == "number_or_null" and text:
        return col.is_valid().to_numpy(zero_copy_only=False)  # a string label is never a number
    if check.kind in ("str_or_null", "number_or_null"):
        return np.zeros(n, dtype=bool)  # the other types are guaranteed by supports()
    if check.kind == "binary" and text:
        return np.ones(n, dtype=bool)  # not a number, so not 0/1 either
    if check.kind == "nonblank":
        bad = pc.or_kleene(pc.is_null(col), pc.match_substring_regex(col, blank_regex()))
    elif check.kind == "max_len":
        bad = pc.greater(pc.utf8_length(col), int(check.arg))  # type: ignore[arg-type]
    elif check.kind == "pattern":
        bad = pc.invert(pc.match_substring_regex(col, str(check.arg)))
        bad = pc.or_kleene(pc.is_null(col), bad)
    elif check.kind == "binary":
        values = col.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls → NaN, as pandas
        return ~np.isin(values, [0, 1])
    else:
        raise ValueError(f"unknown check kind {check.kind!r} of rule {check.rule!r}")
    return pc.fill_null(bad, False).to_numpy(zero_copy_only=False)


def _work_columns(batch: pa.RecordBatch, require_label: bool, partition_market: str | None) -> dict[str, pa.Array]:
    """The contract columns as the reference sees them after ``to_pandas``: text as string, an absent
    column as nulls, ``market`` from the partition when absent, an integer label with nulls as float64."""
    n, out = batch.num_rows, {}
    for name in contract_columns(require_label):
        if name in batch.schema.names:
            col = batch.column(name)
            if name != LABEL or _text_type(col.type):
                col = col.cast(pa.string())
            elif pa.types.is_null(col.type) or (pa.types.is_integer(col.type) and col.null_count):
                col = col.cast(pa.float64())
        elif name == "market" and partition_market is not None:
            col = pa.array([partition_market] * n, pa.string())
        else:
            col = pa.nulls(n, pa.float64() if name == LABEL else pa.string())
        out[name] = col
    return out


def validate_batch(batch: pa.RecordBatch, *, require_label: bool = True, partition_market: str | None = None,
                   missing: list[str] | None = None, seen_ids=None) -> ArrowValidated:
    """:func:`data_contracts.query_ad.validate` on an Arrow batch (same arguments, same outcome per row).

    Raises ``TypeError`` naming the column when :func:`supports` declines the batch's schema."""
    if not supports(batch.schema, require_label):
        bad = [f"{f.name}: {f.type}" for f in batch.schema if f.name in contract_columns(require_label)]
        raise TypeError(f"the Arrow contract kernels do not cover these column types {bad}; use query_ad.validate")
    work = _work_columns(batch, require_label, partition_market)
    n = batch.num_rows
    rule = np.full(n, -1, dtype=np.int16)  # index into RULES; -1 = valid so far
    detail = np.full(n, "", dtype=object)
    if missing:
        rule[:] = _PRIORITY["missing_column"]
        detail[:] = query_ad.missing_detail(missing)
        return _split(work, rule, detail, require_label)

    checks = sorted(row_checks(require_label), key=lambda c: _PRIORITY[c.rule])  # stable: reference order
    fails = [(c, _fails(c, work[c.column])) for c in checks]
    for c, mask in fails:
        rule[mask & (rule < 0)] = _PRIORITY[c.rule]
    bad = np.flatnonzero(rule >= 0)
    if len(bad):
        detail[bad] = _details(bad, fails, work)

    if partition_market is not None and "market" in batch.schema.names:
        ok = np.flatnonzero(rule < 0)
        markets = work["market"].take(ok)
        mism = ok[~pc.fill_null(pc.equal(markets, partition_market), False).to_numpy(zero_copy_only=False)]
        rule[mism] = _PRIORITY["market_partition_mismatch"]
        detail[mism] = [query_ad.mismatch_detail(v, partition_market) for v in work["market"].take(mism).to_pylist()]

    if seen_ids is not None:
        ok = np.flatnonzero(rule < 0)
        first = seen_ids.first_occurrence(work["example_id"].take(ok).to_pylist())
        dup = ok[~np.asarray(first, dtype=bool)]
        rule[dup] = _PRIORITY["duplicate_example_id"]
        detail[dup] = [query_ad.duplicate_detail(v) for v in work["example_id"].take(dup).to_pylist()]
    return _split(work, rule, detail, require_label)


def _details(bad: np.ndarray, fails: list[tuple[RowCheck, np.ndarray]], work: dict[str, pa.Array]) -> list[str]:
    """``detail`` of the failing rows: every broken check in RULES order, as the reference words it."""
    parts: list[list[str]] = [[] for _ in bad]
    for c, mask in fails:
        hit = np.flatnonzero(mask[bad])
        if len(hit):
            values = work[c.column].take(bad[hit]).to_pylist()
            for j, v in zip(hit, values):
                parts[j].append(query_ad.failure_text(c.rule, c.column, v))
    return [query_ad.DETAIL_SEP.join(p) for p in parts]


def _split(work: dict[str, pa.Array], rule: np.ndarray, detail: np.ndarray, require_label: bool) -> ArrowValidated:
    is_bad = rule >= 0
    keep = pa.array(~is_bad)
    valid = {name: col.filter(keep) for name, col in work.items()}
    if require_label:
        valid[LABEL] = valid[LABEL].cast(pa.int8())
    bad = np.flatnonzero(is_bad)
    names = list(RULES)
    quarantined = {name: col.take(bad) for name, col in work.items()}
    if LABEL in quarantined:  # as the reference prints it: 1, 2.0 (an int column with nulls is float), 'yes'
        quarantined[LABEL] = pa.array([query_ad.as_text(v) for v in quarantined[LABEL].to_pylist()], pa.string())
    quarantined["rule"] = pa.array([names[i] for i in rule[bad]], pa.string())
    quarantined["detail"] = pa.array(detail[bad].tolist(), pa.string())
    return ArrowValidated(valid=pa.table(valid), quarantined=pa.table(quarantined))
