"""Tests for relevance.data.curated: reading splits back, and the dataset fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from relevance.data.curated import curated_root, data_fingerprint, read_split


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest

    root = tmp_path_factory.mktemp("data")
    write_demo_data(root / "raw", "us,de,fr", rows_per_market=300, seed=1)
    ingest(str(root / "raw"), root / "ds", progress=False)
    return root / "ds"


def test_read_split_columns_markets_and_order(dataset: Path) -> None:
    df = read_split(dataset, "train")
    assert list(df.columns) == ["example_id", "market", "query", "ad_title", "ad_description", "label", "query_id"]
    assert set(df["market"]) == {"us", "de", "fr"}
    assert df.equals(df.sort_values(["market", "example_id"]).reset_index(drop=True))
    assert set(df["label"].unique()) <= {0, 1}
    only = read_split(dataset, "valid", ["fr"])
    assert set(only["market"]) == {"fr"} and len(only) > 0
    # The ingest output directory and its curated/ directory are both accepted.
    assert read_split(dataset / "curated", "valid", ["fr"]).equals(only)
    # No row in two splits.
    ids = [set(read_split(dataset, s)["example_id"]) for s in ("train", "valid", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_read_split_empty_split_names_split_and_directory(dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    for folder in (copy / "curated").glob("market=*/split=valid"):
        shutil.rmtree(folder)
    with pytest.raises(ValueError, match=r"split 'valid'.*empty") as err:
        read_split(copy, "valid")
    assert str(copy / "curated") in str(err.value)
    with pytest.raises(ValueError, match=r"for markets \['jp'\]"):
        read_split(dataset, "train", ["jp"])


def test_read_split_bad_arguments(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split 'dev' is invalid"):
        read_split(dataset, "dev")
    with pytest.raises(ValueError, match="invalid market code"):
        read_split(dataset, "train", ["../etc"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        curated_root(tmp_path / "nope")


def test_data_fingerprint_is_sha256_of_ingest_summary(dataset: Path, tmp_path: Path) -> None:
    import hashlib

    expected = hashlib.sha256((dataset / "ingest_summary.json").read_bytes()).hexdigest()
    assert data_fingerprint(dataset) == expected
    assert data_fingerprint(tmp_path) is None
