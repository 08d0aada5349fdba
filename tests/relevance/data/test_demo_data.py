"""The demo generator: deterministic bytes, unequal markets, planted signals, planted bad rows."""

import hashlib

import pyarrow.dataset as ds
import pytest

from relevance.data.demo_data import AD_TYPES, CONFLICT_MARKETS, LABELS, write_demo_data
from relevance.data.ingest import ingest


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    write_demo_data(tmp_path / "a", rows_per_market=300, seed=7, corrupt_fraction=0.05)
    write_demo_data(tmp_path / "b", rows_per_market=300, seed=7, corrupt_fraction=0.05)
    write_demo_data(tmp_path / "c", rows_per_market=300, seed=8, corrupt_fraction=0.05)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_markets_unequal_and_rows_read_like_ads(tmp_path):
    write_demo_data(tmp_path / "raw", rows_per_market=500)
    df = ds.dataset(tmp_path / "raw", partitioning="hive").to_table().to_pandas()
    sizes = df.groupby("market").size()
    assert sizes["us"] == 500 and len(set(sizes)) >= 3
    assert df["ad_description"].str.contains(r"From [$£€¥]").all()
    assert df.loc[df.market == "jp", "ad_description"].str.contains("¥").all()
    assert set(df.label) == {0, 1}


def test_planted_conflict_is_in_the_labels():
    # same surface pattern, opposite labels: what no market-blind model can fit
    acc, ref = AD_TYPES.index("accessory"), AD_TYPES.index("refurbished")
    de, fr = LABELS[CONFLICT_MARKETS[0]], LABELS[CONFLICT_MARKETS[1]]
    assert de[acc] != fr[acc] and de[ref] != fr[ref]
    assert all(LABELS[m][AD_TYPES.index("exact")] == 1 and LABELS[m][AD_TYPES.index("other_product")] == 0 for m in LABELS)


def test_de_and_fr_text_is_indistinguishable_but_labels_disagree(tmp_path):
    write_demo_data(tmp_path / "raw", markets="de,fr", rows_per_market=3000)
    df = ds.dataset(tmp_path / "raw", partitioning="hive").to_table().to_pandas()
    acc = df[df.ad_title.str.contains("Sleeve|Case|Bag|Stand|Filters|Laces|Stakes|Lock|Strap|Mount|Cover|Jar|Mat|Arm")]
    rate = acc.groupby("market").label.mean()
    assert rate["de"] > 0.9 and rate["fr"] < 0.1
    share = df.groupby("market").ad_title.apply(lambda s: s.str.startswith("Refurbished").mean())
    assert abs(share["de"] - share["fr"]) < 0.03


def test_every_planted_bad_row_is_quarantined_under_its_rule(tmp_path):
    manifest = write_demo_data(tmp_path / "raw", rows_per_market=1000, corrupt_fraction=0.05)
    summary = ingest(str(tmp_path / "raw"), tmp_path / "ds", progress=False)
    q = ds.dataset(tmp_path / "ds" / "quarantine", partitioning="hive").to_table().to_pandas()
    rules = manifest["rules"]
    assert set(rules.values()) == set(q.rule)  # every rule is exercised
    for market, info in manifest["markets"].items():
        mq = q[q.market == market]
        for kind, ids in info["planted"].items():
            got = mq[mq.rule == rules[kind]]
            named = [i for i in ids if i is not None]
            assert set(named) <= set(got.example_id), (market, kind)
            assert len(got) >= len(ids)
        planted = sum(len(v) for v in info["planted"].values())
        assert sum(summary["markets"][market]["quarantined"].values()) == planted
        m = summary["markets"][market]
        assert m["rows_in"] == info["rows"] == sum(m["curated"].values()) + planted


@pytest.mark.parametrize("kwargs,match", [
    ({"markets": "us,../x"}, "invalid market"), ({"rows_per_market": 0}, "rows_per_market"),
    ({"corrupt_fraction": 0.9}, "corrupt_fraction"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_demo_data(tmp_path / "raw", **kwargs)


def test_refuses_to_overwrite_without_flag(tmp_path):
    write_demo_data(tmp_path / "raw", rows_per_market=10)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_demo_data(tmp_path / "raw", rows_per_market=10)
    write_demo_data(tmp_path / "raw", rows_per_market=10, overwrite=True)
