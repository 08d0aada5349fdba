"""Per-market prior offsets: o_t = logit(p_t) − logit(p), exact on hand-made labels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from relevance.training.priors import RATE_CLIP, logit, per_example, prior_offsets


def test_offsets_are_each_markets_log_odds_against_the_pooled_rate() -> None:
    markets = ["de"] * 6 + ["de-broad"] * 6 + ["es"] * 3
    labels = [1, 1, 0, 0, 0, 0] + [1, 1, 1, 1, 0, 0] + [1, 0, 0]
    offsets, ref = prior_offsets(markets, labels)
    pooled = 7 / 15
    assert ref == pytest.approx(math.log(pooled / (1 - pooled)))
    assert offsets["de"] == pytest.approx(math.log(0.5) - ref)  # logit(1/3) = log(1/2)
    assert offsets["de-broad"] == pytest.approx(math.log(2.0) - ref)
    assert offsets["de-broad"] - offsets["de"] == pytest.approx(math.log(4.0))  # independent of the reference
    np.testing.assert_allclose(per_example(markets, offsets)[[0, 6, 12]],
                               [offsets["de"], offsets["de-broad"], offsets["es"]], rtol=1e-6)


def test_a_given_reference_and_one_class_markets() -> None:
    offsets, ref = prior_offsets(["it", "it", "jp"], [1, 1, 0], reference=0.25)
    assert ref == 0.25
    assert offsets["it"] == pytest.approx(logit(RATE_CLIP[1]) - 0.25)  # all positive: clipped, finite
    assert offsets["jp"] == pytest.approx(logit(RATE_CLIP[0]) - 0.25)
    with pytest.raises(ValueError, match="differ in length"):
        prior_offsets(["de"], [1, 0])
    with pytest.raises(ValueError, match="no training rows"):
        prior_offsets([], [])
