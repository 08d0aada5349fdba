"""Ingest end to end on small raw datasets written here: every bad input of the issue, nothing lost."""

import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from relevance.data import ingest as ingest_mod
from relevance.data.ingest import IngestError, ingest
from relevance.data.write_behind import PartitionWriters


def rows(market="us", n=6, start=0, **overrides):
    cols = {
        "example_id": [f"{market}-{i}" for i in range(start, start + n)],
        "market": [market] * n,
        "query": [f"red bike {i % 3}" for i in range(n)],
        "ad_title": ["Apex Bike – Red"] * n,
        "ad_description": ["From $90."] * n,
        "label": [i % 2 for i in range(n)],
    }
    cols.update(overrides)
    return cols


def write(root, market_dir, name, cols, schema=None):
    folder = root / f"market={market_dir}" if market_dir is not None else root
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), folder / name)


def read(path):
    return ds.dataset(path, partitioning="hive").to_table().to_pandas()


def check_reconciles(summary):
    for m, v in summary["markets"].items():
        assert v["rows_in"] == sum(v["curated"].values()) + sum(v["quarantined"].values()), m


def test_clean_data_is_split_by_query_and_reconciles(tmp_path):
    raw = tmp_path / "raw"
    write(raw, "us", "a.parquet", rows("us", 60))
    write(raw, "de", "a.parquet", rows("de", 30))
    s = ingest(str(raw), tmp_path / "ds", progress=False)
    check_reconciles(s)
    assert s["markets"]["us"]["rows_in"] == 60 and s["totals"]["rows_in"] == 90
    cur = read(tmp_path / "ds" / "curated")
    assert len(cur) == 90 and set(cur.columns) >= {"query_id", "split", "market", "label"}
    assert cur.groupby("query_id")["split"].nunique().max() == 1
    on_disk = json.loads((tmp_path / "ds" / "ingest_summary.json").read_text())
    assert on_disk == s and s["contract_version"] == "query-ad/v1"


def test_every_bad_row_kind_is_quarantined_with_its_rule(tmp_path):
    raw = tmp_path / "raw"
    bad = rows("us", 16)  # rows 0..13 get one fault each, rows 14 and 15 stay valid
    edits = {
        0: ("query", None), 1: ("query", "  "), 2: ("ad_title", None), 3: ("ad_title", " "),
        4: ("label", 2), 5: ("label", -1), 6: ("label", None), 7: ("market", "../etc"),
        8: ("market", "US "), 9: ("market", ""), 10: ("market", "x"), 11: ("market", "gb"),
        12: ("query", "q" * 2001), 13: ("ad_description", "d" * 10_001),
    }
    for i, (col, value) in edits.items():
        bad[col][i] = value
    write(raw, "us", "a.parquet", bad)
    write(raw, "us", "b.parquet", rows("us", 3, start=14))  # us-14, us-15 repeat valid rows of a.parquet
    write(raw, "us", "b2.parquet", rows("us", 1, start=0))  # us-0 was invalid in a.parquet: this one is kept
    write(raw, "us", "c.parquet", rows("us", 2, start=100, label=["yes", "no"]))
    write(raw, "us", "d.parquet", {k: v for k, v in rows("us", 2, start=200).items() if k != "ad_title"})
    s = ingest(str(raw), tmp_path / "ds", progress=False)
    check_reconciles(s)
    q = s["markets"]["us"]["quarantined"]
    assert q == {
        "query_empty": 2, "ad_title_empty": 2, "label_not_binary": 3, "market_invalid": 4,
        "market_partition_mismatch": 1, "query_too_long": 1, "ad_description_too_long": 1,
        "duplicate_example_id": 2, "wrong_type": 2, "missing_column": 2,
    }
    quarantine = read(tmp_path / "ds" / "quarantine")
    assert {"rule", "detail", "source_file", "query", "label"} <= set(quarantine.columns)
    dup = quarantine[quarantine.rule == "duplicate_example_id"]
    assert sorted(dup.example_id) == ["us-14", "us-15"] and set(dup.source_file.str[-9:]) == {"b.parquet"}
    assert "us-0" in set(read(tmp_path / "ds" / "curated").example_id)
    assert s["markets"]["us"]["rows_in"] == 16 + 3 + 1 + 2 + 2


def test_duplicate_first_kept(tmp_path):
    raw = tmp_path / "raw"
    write(raw, "us", "a.parquet", rows("us", 4, query=["first"] * 4))
    write(raw, "us", "b.parquet", rows("us", 4, query=["second"] * 4))
    ingest(str(raw), tmp_path / "ds", progress=False)
    cur, quar = read(tmp_path / "ds" / "curated"), read(tmp_path / "ds" / "quarantine")
    assert sorted(cur.example_id) == [f"us-{i}" for i in range(4)] and set(cur["query"]) == {"first"}
    assert set(quar.rule) == {"duplicate_example_id"} and set(quar["query"]) == {"second"}


def test_market_from_partition_and_bad_partition_dir(tmp_path):
    raw = tmp_path / "raw"
    write(raw, "de", "a.parquet", {k: v for k, v in rows("de", 4).items() if k != "market"})
    write(raw, "US ", "a.parquet", {k: v for k, v in rows("zz", 3).items() if k != "market"})
    s = ingest(str(raw), tmp_path / "ds", progress=False)
    check_reconciles(s)
    assert sum(s["markets"]["de"]["curated"].values()) == 4
    assert s["markets"]["_unknown"]["quarantined"] == {"market_invalid": 3}


def test_empty_input_directory_is_an_error(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "_SUCCESS").write_text("")
    with pytest.raises(IngestError, match="holds no data files"):
        ingest(str(tmp_path / "raw"), tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()
    with pytest.raises(IngestError, match="does not exist"):
        ingest(str(tmp_path / "nope"), tmp_path / "ds", progress=False)


def test_corrupt_file_names_it_and_leaves_dst_untouched(tmp_path):
    raw = tmp_path / "raw"
    write(raw, "us", "a.parquet", rows("us", 5))
    ingest(str(raw), tmp_path / "ds", progress=False)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ds").rglob("*"))
    (raw / "market=us" / "zz-broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(IngestError, match="zz-broken.parquet"):
        ingest(str(raw), tmp_path / "ds", progress=False)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ds").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_crash_mid_run_keeps_previous_output(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write(raw, "us", "a.parquet", rows("us", 5))
    write(raw, "us", "b.parquet", rows("us", 5, start=5))
    first = ingest(str(raw), tmp_path / "ds", progress=False)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = ingest_mod._write_valid
    monkeypatch.setattr(ingest_mod, "_write_valid", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest(str(raw), tmp_path / "ds", progress=False)
    assert json.loads((tmp_path / "ds" / "ingest_summary.json").read_text()) == first
    assert len(read(tmp_path / "ds" / "curated")) == 10


def test_a_write_failing_on_the_writer_thread_fails_ingest_and_keeps_previous_output(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write(raw, "us", "a.parquet", rows("us", 5))
    write(raw, "us", "b.parquet", rows("us", 5, start=5))
    first = ingest(str(raw), tmp_path / "ds", progress=False)
    real = PartitionWriters._write

    def boom(self, key, table):
        if self.root.name == "curated" and any("split=train" in k for k in key) and self.open:
            raise OSError("disk full on the writer thread")
        return real(self, key, table)

    monkeypatch.setattr(PartitionWriters, "_write", boom)
    with pytest.raises(OSError, match="writer thread"):
        ingest(str(raw), tmp_path / "ds", progress=False, batch_size=2)
    assert json.loads((tmp_path / "ds" / "ingest_summary.json").read_text()) == first
    assert len(read(tmp_path / "ds" / "curated")) == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_rerun_replaces_output(tmp_path):
    raw = tmp_path / "raw"
    write(raw, "us", "a.parquet", rows("us", 5))
    ingest(str(raw), tmp_path / "ds", progress=False)
    (tmp_path / "ds" / "stale.txt").write_text("old")
    ingest(str(raw), tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds" / "stale.txt").exists()
    assert len(read(tmp_path / "ds" / "curated")) == 5


def test_reads_through_a_filesystem_uri_in_small_batches(tmp_path):
    raw = tmp_path / "raw"
    write(raw, "us", "a.parquet", rows("us", 50))
    s = ingest("file://" + os.fspath(raw), tmp_path / "ds", batch_size=7, progress=False)
    assert s["totals"]["rows_in"] == 50 and sum(s["totals"]["curated"].values()) == 50


def test_splits_are_identical_across_runs_and_batch_sizes(tmp_path):
    raw = tmp_path / "raw"
    write(raw, "us", "a.parquet", rows("us", 40, query=[f"q{i % 13}" for i in range(40)]))
    ingest(str(raw), tmp_path / "a", batch_size=5, progress=False)
    ingest(str(raw), tmp_path / "b", batch_size=1000, progress=False)
    a = read(tmp_path / "a" / "curated").sort_values("example_id").reset_index(drop=True)
    b = read(tmp_path / "b" / "curated").sort_values("example_id").reset_index(drop=True)
    assert a[["example_id", "split", "query_id"]].equals(b[["example_id", "split", "query_id"]])


def test_batches_never_span_row_groups_and_every_row_arrives_once(tmp_path):
    """Read one row group at a time (memory stays at one group's size, not the file's)."""
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table(rows("us", 53)), path, row_group_size=10)  # groups of 10, 10, 10, 10, 10, 3
    fs, base = ingest_mod.resolve_filesystem(str(path))
    sizes = [b.num_rows for b in ingest_mod._batches(fs, base, batch_size=4)]
    assert sizes == [4, 4, 2] * 5 + [3]
    got = [i for b in ingest_mod._batches(fs, base, batch_size=4) for i in b.column("example_id").to_pylist()]
    assert got == rows("us", 53)["example_id"]


def test_output_does_not_depend_on_the_input_row_groups(tmp_path):
    cols = rows("us", 60, query=[f"q{i % 7}" for i in range(60)])
    cols["example_id"][40] = cols["example_id"][3]  # a duplicate in a later row group
    cols["label"][11] = 7  # a bad row
    for name, group in (("one", 1000), ("many", 9)):
        folder = tmp_path / name / "market=us"
        folder.mkdir(parents=True)
        pq.write_table(pa.table(cols), folder / "a.parquet", row_group_size=group)
    a = ingest(str(tmp_path / "one"), tmp_path / "a", batch_size=8, progress=False)
    b = ingest(str(tmp_path / "many"), tmp_path / "b", batch_size=8, progress=False)
    assert a == b and a["totals"]["quarantined"] == {"duplicate_example_id": 1, "label_not_binary": 1}
    key = ["example_id", "split", "query_id", "label"]
    for sub in ("curated", "quarantine"):
        x = read(tmp_path / "a" / sub).sort_values("example_id").reset_index(drop=True)
        y = read(tmp_path / "b" / sub).sort_values("example_id").reset_index(drop=True)
        cols_ = [c for c in key + ["rule", "detail"] if c in x.columns]
        assert x[cols_].equals(y[cols_])
