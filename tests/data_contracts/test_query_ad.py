"""Contract v1 row rules, one bad value at a time, on a batch whose other rows are valid."""

import numpy as np
import pandas as pd
import pytest

from data_contracts import query_ad
from data_contracts.query_ad import RULES, missing_columns, validate


def good(n=4, market="us"):
    return pd.DataFrame(
        {
            "example_id": [f"e{i}" for i in range(n)],
            "market": [market] * n,
            "query": ["red bike"] * n,
            "ad_title": ["Apex Bike – Red"] * n,
            "ad_description": ["Fast. From $90."] * n,
            "label": [1, 0] * (n // 2),
        }
    )


def one_bad(column, value, dtype=None):
    df = good()
    if dtype is not None:
        df[column] = df[column].astype(dtype)
    df.loc[2, column] = value
    res = validate(df)
    assert len(res.valid) + len(res.quarantined) == len(df)
    return res


@pytest.mark.parametrize(
    "column,value,rule",
    [
        ("query", None, "query_empty"),
        ("query", "  \t", "query_empty"),
        ("ad_title", None, "ad_title_empty"),
        ("ad_title", "   ", "ad_title_empty"),
        ("query", "q" * 2001, "query_too_long"),
        ("ad_title", "t" * 2001, "ad_title_too_long"),
        ("ad_description", "d" * 10_001, "ad_description_too_long"),
        ("example_id", None, "example_id_empty"),
        ("example_id", " ", "example_id_empty"),
        ("market", "../etc", "market_invalid"),
        ("market", "US ", "market_invalid"),
        ("market", "", "market_invalid"),
        ("market", "x", "market_invalid"),
    ],
)
def test_text_rules(column, value, rule):
    res = one_bad(column, value)
    assert res.quarantined["rule"].tolist() == [rule]
    assert res.quarantined["example_id"].tolist() == ([None] if column == "example_id" and value is None else [res.quarantined["example_id"][0]])
    assert column in res.quarantined["detail"][0]
    assert len(res.valid) == 3


@pytest.mark.parametrize("value", [2, -1, np.nan])
def test_label_not_binary(value):
    res = one_bad("label", value, dtype="float64")
    assert res.quarantined["rule"].tolist() == ["label_not_binary"]
    assert res.valid["label"].dtype == "int8"


def test_label_string_is_wrong_type():
    df = good()
    df["label"] = ["1", "yes", "0", "no"]
    res = validate(df)
    assert set(res.quarantined["rule"]) == {"wrong_type"}
    assert "label='yes'" in " ".join(res.quarantined["detail"])
    assert len(res.valid) == 0


def test_limits_are_inclusive():
    df = good()
    df.loc[0, "query"] = "q" * 2000
    df.loc[1, "ad_description"] = "d" * 10_000
    df.loc[2, "ad_description"] = None  # nullable
    assert len(validate(df).valid) == 4


def test_several_failures_of_one_row_are_all_reported_once():
    df = good()
    df.loc[1, ["query", "ad_title"]] = [None, "   "]
    res = validate(df)
    assert res.quarantined["rule"].tolist() == ["query_empty"]  # RULES order decides the primary rule
    assert "ad_title_empty" in res.quarantined["detail"][0]


def test_partition_fills_and_checks_market():
    df = good().drop(columns="market")
    assert validate(df, partition_market="de").valid["market"].unique().tolist() == ["de"]
    res = validate(good(market="gb"), partition_market="us")
    assert set(res.quarantined["rule"]) == {"market_partition_mismatch"}
    assert "market='gb' but the file is under market=us" in res.quarantined["detail"][0]


def test_missing_column_quarantines_every_row():
    df = good().drop(columns="ad_title")
    miss = missing_columns(list(df.columns))
    assert miss == ["ad_title"]
    res = validate(df, missing=miss)
    assert res.quarantined["rule"].tolist() == ["missing_column"] * 4
    assert "ad_title" in res.quarantined["detail"][0]


def test_scoring_contract_has_no_label():
    df = good().drop(columns="label")
    assert missing_columns(list(df.columns), require_label=False) == []
    assert len(validate(df, require_label=False).valid) == 4


def test_every_rule_is_named_and_described():
    assert query_ad.CONTRACT_VERSION.endswith("v1")
    assert all(isinstance(v, str) and v for v in RULES.values())
