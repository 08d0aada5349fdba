"""The Arrow ingest backend against the pandera reference, row for row: same files, same rows in the
same order (every column, curated and quarantine, ``rule`` and ``detail`` included), same summary."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import query_ad
from data_contracts.query_ad import RULES
from relevance.data.demo_data import write_demo_data
from relevance.data.ingest import ingest


def outputs(dst: Path) -> dict[str, pa.Table]:
    """Every Parquet file of an ingest output by relative path (curated/…, quarantine/…)."""
    return {str(p.relative_to(dst)): pq.read_table(p) for p in sorted(dst.rglob("*.parquet"))}


def assert_same_ingest(raw: Path, tmp: Path, monkeypatch, reference_batches: int = 0, **kwargs) -> dict:
    """Both backends on ``raw``; the Arrow one must take the reference path for exactly
    ``reference_batches`` batches (those with column types its kernels decline)."""
    ref = ingest(str(raw), tmp / "ref", progress=False, backend="pandera", **kwargs)
    calls = []
    real = query_ad.validate
    monkeypatch.setattr(query_ad, "validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    new = ingest(str(raw), tmp / "new", progress=False, backend="arrow", **kwargs)
    monkeypatch.setattr(query_ad, "validate", real)
    assert len(calls) == reference_batches
    assert new == ref
    assert (tmp / "new" / "ingest_summary.json").read_bytes() == (tmp / "ref" / "ingest_summary.json").read_bytes()
    a, b = outputs(tmp / "ref"), outputs(tmp / "new")
    assert sorted(a) == sorted(b)
    for path in a:
        assert b[path].schema == a[path].schema, path
        assert b[path].to_pylist() == a[path].to_pylist(), path
    return new


@pytest.mark.parametrize("batch_size", [97, 65_536])
def test_demo_data_with_every_planted_fault(tmp_path, monkeypatch, batch_size):
    raw = tmp_path / "raw"
    write_demo_data(raw, rows_per_market=400, seed=3, corrupt_fraction=0.05)
    s = assert_same_ingest(raw, tmp_path, monkeypatch, batch_size=batch_size)
    assert set(s["totals"]["quarantined"]) == set(RULES)  # every rule was exercised


def test_other_seed_and_fractions(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_demo_data(raw, markets="us,pt-br", rows_per_market=300, seed=5, corrupt_fraction=0.1)
    assert_same_ingest(raw, tmp_path, monkeypatch, seed=7, fractions=(0.5, 0.3, 0.2))


def write(root: Path, rel: str, cols: dict, schema: pa.Schema | None = None) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), path)


def base(n: int, prefix: str, market: str = "us") -> dict:
    return {
        "example_id": [f"{prefix}-{i}" for i in range(n)],
        "market": [market] * n,
        "query": [f"Red  Bike {i % 4}" for i in range(n)],
        "ad_title": ["Apex Bike – Red"] * n,
        "ad_description": ["From $90."] * n,
        "label": [i % 2 for i in range(n)],
    }


def test_hand_made_rules_types_and_layouts(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    rows = base(16, "a")
    faults = {  # several rows break several rules at once: rule = first in RULES order, detail = all
        0: {"query": None, "ad_title": "  ", "label": 2},
        1: {"example_id": " ", "market": "US ", "query": "q" * 2001},
        2: {"market": "gb", "ad_description": "d" * 10_001},
        3: {"ad_title": "t" * 2001, "label": None},
        4: {"query": "\x1c\u3000\t", "example_id": None},
        5: {"market": "us\n"}, 6: {"market": None}, 7: {"query": "Ünïcode\u00a0 query"},
        8: {"example_id": "a-9"}, 9: {"example_id": "a-8"},  # swapped ids: no duplicate
        10: {"example_id": "a-11"},  # duplicate within the batch: the first (row 10) is kept
        12: {"market": "gb"},
    }
    for i, edits in faults.items():
        for col, value in edits.items():
            rows[col][i] = value
    rows["query_id"] = [None, "", " ", "qid-1", "\u3000", None, "qid-1", "x", None, None, "q", "q", None, "z", "z", None]
    write(raw, "market=us/a.parquet", rows)
    write(raw, "market=us/b-float-label.parquet", base(4, "b") | {"label": [0.0, -0.0, 2.5, float("nan")]})
    text = [k for k in base(1, "x") if k != "label"]
    write(raw, "market=us/c-uint-label.parquet", base(3, "c"), pa.schema([(k, pa.string()) for k in text] + [("label", pa.uint8())]))
    write(raw, "market=us/d-large-string.parquet", base(3, "a") | {"ad_description": [None, None, None]},
          pa.schema([(k, pa.large_string()) for k in base(1, "x") if k not in ("label", "ad_description")]
                    + [("ad_description", pa.null()), ("label", pa.int64())]))
    write(raw, "market=us/e-numeric-query.parquet", base(3, "e") | {"query": [1, 2, 3]})
    write(raw, "market=us/f-string-label.parquet", base(4, "f") | {"label": ["1", "yes", None, "0"]})
    write(raw, "market=us/g-no-title.parquet", {k: v for k, v in base(2, "g").items() if k != "ad_title"})
    write(raw, "market=de/a.parquet", {k: v for k, v in base(5, "de", "de").items() if k != "market"})
    write(raw, "market=US /a.parquet", {k: v for k, v in base(2, "up").items() if k != "market"})
    loose = base(6, "l")
    loose["market"] = ["fr", "pt-br", "../etc", None, "FR", "fr"]
    loose["example_id"][5] = "id-with-\x00-nul"
    write(raw, "loose.parquet", loose)
    write(raw, "market=fr/z-dup.parquet", base(3, "l", "fr") | {"example_id": ["l-0", "id-with-\x00-nul", "l-2"]})
    for batch_size, numeric_query_batches in ((2, 2), (1000, 1)):
        s = assert_same_ingest(raw, tmp_path / f"b{batch_size}", monkeypatch, numeric_query_batches, batch_size=batch_size)
    assert {"wrong_type", "missing_column", "duplicate_example_id", "market_partition_mismatch"} <= set(s["totals"]["quarantined"])
    quarantine = pq.read_table(tmp_path / "b1000" / "new" / "quarantine" / "market=us" / "part-00000.parquet").to_pylist()
    first = next(r for r in quarantine if r["example_id"] == "a-0")
    assert first["rule"] == "query_empty"
    assert first["detail"] == "query_empty: query=null; ad_title_empty: ad_title='  ' (2 chars); label_not_binary: label=2"


def test_unknown_backend_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="'polars'"):
        ingest(str(tmp_path), tmp_path / "ds", progress=False, backend="polars")


def test_seen_ids_first_occurrence_matches_a_set(tmp_path):
    from relevance.data.dedup import SeenIds

    batches = [["a", "b", "a", "é", "😀"], [], ["b", "c", "c", "😀", "nul\x00x", "nul\x00y"],
               ["nul\x00x", "\\u0000", "d"], ["\\u0000", "nul"]]
    seen, oracle = SeenIds(tmp_path / "seen.sqlite"), set()
    for ids in batches:
        expected = []
        for i in ids:
            expected.append(i not in oracle)
            oracle.add(i)
        assert seen.first_occurrence(ids) == expected, ids
    seen.close()
