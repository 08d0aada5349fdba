"""The curated dataset as the training and evaluation code sees it: one split as a DataFrame, all three
splits read up front, and the fingerprint that identifies the ingest output a model was trained on."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from data_contracts.markets import validate_market
from data_contracts.splits import SPLITS

logger = logging.getLogger(__name__)

COLUMNS = ("example_id", "market", "query", "ad_title", "ad_description", "label", "query_id")


def curated_root(dataset_dir: str | Path) -> Path:
    """``DS/curated`` when ``dataset_dir`` is an ingest output, else ``dataset_dir`` itself."""
    root = Path(dataset_dir)
    if (root / "curated").is_dir():
        root = root / "curated"
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset {str(dataset_dir)!r} does not exist: expected an ingest output directory "
            "(with curated/market=xx/split=yy/*.parquet), e.g. from `ads-relevance ingest`"
        )
    return root


def data_fingerprint(dataset_dir: str | Path) -> str | None:
    """sha256 of ``DS/ingest_summary.json`` (identifies the curated data); ``None`` when absent."""
    path = Path(dataset_dir) / "ingest_summary.json"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_split(dataset_dir: str | Path, split: str, markets: Sequence[str] | None = None) -> pd.DataFrame:
    """One split of the curated dataset as a DataFrame sorted by (market, example_id).

    Columns: example_id, market, query, ad_title, ad_description, label (int), query_id. An empty
    result is a ``ValueError`` naming the split and the directory, never a silent empty frame.
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    if split not in SPLITS:
        raise ValueError(f"split {split!r} is invalid: expected one of {list(SPLITS)}")
    codes = [validate_market(m) for m in markets] if markets is not None else None
    root = curated_root(dataset_dir)
    part = ds.partitioning(pa.schema([("market", pa.string()), ("split", pa.string())]), flavor="hive")
    dataset = ds.dataset(str(root), format="parquet", partitioning=part)
    flt = ds.field("split") == split
    if codes is not None:
        flt = flt & ds.field("market").isin(codes)
    table = dataset.to_table(filter=flt)
    if table.num_rows == 0:
        which = f" for markets {codes}" if codes is not None else ""
        raise ValueError(
            f"split {split!r} of dataset {str(root)!r} is empty{which}: expected Parquet files under "
            f"market=xx/split={split}/ (run `ads-relevance ingest`, or choose markets that have "
            f"{split} rows)"
        )
    df = table.to_pandas()
    if "ad_description" not in df.columns:
        df["ad_description"] = None
    if "query_id" not in df.columns:
        df["query_id"] = None
    df = df[list(COLUMNS)].sort_values(["market", "example_id"], kind="stable").reset_index(drop=True)
    df["market"] = df["market"].astype(str)
    df["label"] = df["label"].astype("int64")
    return df


def read_training_splits(
    dataset_dir: str | Path, markets: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    """(train, valid, test, markets): all three read up front so that a missing split fails before
    any training. ``markets`` defaults to every market with train rows; one without any is an error."""
    train_df = read_split(dataset_dir, "train", markets)
    found = tuple(sorted(set(train_df["market"])))
    absent = sorted(set(markets or ()) - set(found))
    if absent:
        raise ValueError(f"markets {absent} have no train rows in {dataset_dir}; markets with data: {list(found)}")
    valid_df, test_df = read_split(dataset_dir, "valid", found), read_split(dataset_dir, "test", found)
    for name, frame in (("valid", valid_df), ("test", test_df)):
        gone = sorted(set(found) - set(frame["market"]))
        if gone:
            logger.warning("markets %s have no %s rows: they get no %s AUC", gone, name, name)
    return train_df, valid_df, test_df, found
