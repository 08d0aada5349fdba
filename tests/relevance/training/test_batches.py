"""Tests for relevance.data.curated, relevance.model.batching and relevance.training.batches: reading splits, dynamic padding, multi-market sampling and its resume."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from relevance.data.curated import curated_root, data_fingerprint, read_split
from relevance.model.batching import collate, length_sorted_batches
from relevance.training.batches import MultiMarketSampler, market_probabilities


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


def test_collate_pads_to_longest_in_batch() -> None:
    enc = {"input_ids": [[2, 5, 3], [2, 5, 6, 7, 3], [2, 3]], "token_type_ids": [[0, 0, 0], [0, 0, 1, 1, 1], [0, 0]]}
    batch = collate(enc, [0, 2], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    batch = collate(enc, np.array([1, 0]), pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]


def test_length_sorted_batches_cover_everything_once() -> None:
    lengths = [5, 1, 4, 4, 9, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)


def test_market_probabilities_proportional_and_temperature() -> None:
    counts = {"us": 900, "de": 400, "jp": 100}
    p1 = market_probabilities(counts, 1.0)
    assert p1 == pytest.approx({"us": 900 / 1400, "de": 400 / 1400, "jp": 100 / 1400})
    p2 = market_probabilities(counts, 2.0)
    z = 30 + 20 + 10
    assert p2 == pytest.approx({"us": 30 / z, "de": 20 / z, "jp": 10 / z})
    flat = market_probabilities(counts, 1e6)
    assert max(flat.values()) - min(flat.values()) < 1e-4
    with pytest.raises(ValueError, match="temperature"):
        market_probabilities(counts, 0)


def _sampler(n=(300, 100, 40), **kw) -> MultiMarketSampler:
    markets = [m for m, k in zip(("us", "de", "jp"), n) for _ in range(k)]
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 60, size=len(markets))
    return MultiMarketSampler(markets, lengths, kw.pop("batch_size", 16), **kw)


def test_proportional_epoch_sees_every_example_once_in_mixed_batches() -> None:
    s = _sampler(seed=3)
    epoch = [s.next_batch() for _ in range(s.batches_per_epoch)]
    flat = np.concatenate(epoch)
    assert sorted(flat.tolist()) == list(range(440))
    markets = np.array(["us"] * 300 + ["de"] * 100 + ["jp"] * 40)
    mixed = sum(len(set(markets[b])) > 1 for b in epoch)
    assert mixed / len(epoch) > 0.8, "markets must be mixed inside batches"


def test_temperature_sampling_matches_p_t() -> None:
    s = _sampler(seed=0, temperature=2.0)
    expected = market_probabilities({"us": 300, "de": 100, "jp": 40}, 2.0)
    assert s.probabilities == pytest.approx(expected, abs=2 / 440)
    markets = np.array(["us"] * 300 + ["de"] * 100 + ["jp"] * 40)
    seen = Counter(markets[np.concatenate([s.next_batch() for _ in range(5 * s.batches_per_epoch)])])
    total = sum(seen.values())
    for m, p in expected.items():
        assert seen[m] / total == pytest.approx(p, abs=0.01)
    assert seen["jp"] / total > 40 / 440 * 1.5, "temperature must up-sample the small market"


def test_length_grouping_reduces_padding() -> None:
    s = _sampler(seed=1)
    batches = [s.next_batch() for _ in range(s.batches_per_epoch)]
    waste = sum(s.lengths[b].max() * len(b) - s.lengths[b].sum() for b in batches)
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(s.lengths))
    rand = [perm[i: i + 16] for i in range(0, len(perm), 16)]
    random_waste = sum(s.lengths[b].max() * len(b) - s.lengths[b].sum() for b in rand)
    assert waste < 0.5 * random_waste


def test_sampler_is_deterministic_for_a_seed() -> None:
    a, b, c = _sampler(seed=7), _sampler(seed=7), _sampler(seed=8)
    run_a = [a.next_batch().tolist() for _ in range(40)]
    assert run_a == [b.next_batch().tolist() for _ in range(40)]
    assert run_a != [c.next_batch().tolist() for _ in range(40)]


def test_state_round_trip_continues_exactly() -> None:
    first = _sampler(seed=5, temperature=3.0)
    for _ in range(first.batches_per_epoch + 7):  # into the second epoch
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch().tolist() for _ in range(2 * first.batches_per_epoch)]
    resumed = _sampler(seed=5, temperature=3.0)
    resumed.load_state_dict(state)
    assert [resumed.next_batch().tolist() for _ in range(len(expected))] == expected
    other = _sampler(seed=6, temperature=3.0)
    with pytest.raises(ValueError, match="seed: saved 5 vs now 6"):
        other.load_state_dict(state)


def test_ranks_split_the_same_batches() -> None:
    single = _sampler(seed=2, batch_size=8)
    r0 = _sampler(seed=2, batch_size=8, rank=0, world_size=2)
    r1 = _sampler(seed=2, batch_size=8, rank=1, world_size=2)
    every = single.epoch_batches(0)
    got0 = [r0.next_batch().tolist() for _ in range(r0.batches_per_epoch)]
    got1 = [r1.next_batch().tolist() for _ in range(r1.batches_per_epoch)]
    assert got0 == [b.tolist() for b in every[0::2][: r0.batches_per_epoch]]
    assert got1 == [b.tolist() for b in every[1::2][: r1.batches_per_epoch]]
    assert not set(np.concatenate(got0).tolist()) & set(np.concatenate(got1).tolist())


def test_sampler_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one market and one length"):
        MultiMarketSampler(["us"], [1, 2], 4)
    with pytest.raises(ValueError, match="rank=2 is out of range"):
        MultiMarketSampler(["us"] * 10, [3] * 10, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer batches"):
        MultiMarketSampler(["us"] * 3, [3] * 3, 4, world_size=2)
