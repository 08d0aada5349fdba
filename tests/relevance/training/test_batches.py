"""Tests for relevance.training.batches: the multi-market sampler and its resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from relevance.training.batches import MultiMarketSampler, market_probabilities


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


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_single_market_batches_hold_one_market_and_the_same_examples(temperature: float) -> None:
    markets = np.array(["us"] * 300 + ["de"] * 100 + ["jp"] * 40)
    mixed = _sampler(seed=4, temperature=temperature)
    single = _sampler(seed=4, temperature=temperature, single_market=True)
    epoch = [single.next_batch() for _ in range(single.batches_per_epoch)]
    assert all(len(set(markets[b])) == 1 for b in epoch), "every step must belong to one market"
    # Each market contributes its quota, as in a mixed epoch: the same examples per market.
    assert Counter(markets[np.concatenate(epoch)]) == Counter(mixed.quotas)
    if temperature == 1.0:
        assert sorted(np.concatenate(epoch).tolist()) == list(range(440))
    # A market's batches are spread over the epoch (so over the learning-rate schedule), not in a block.
    firsts = [i for i, b in enumerate(epoch) if markets[b[0]] == "jp"]
    assert firsts[-1] - firsts[0] > len(epoch) / 2
    with pytest.raises(ValueError, match="single_market: saved None vs now True"):
        _sampler(seed=4, temperature=temperature, single_market=True).load_state_dict(mixed.state_dict())


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
