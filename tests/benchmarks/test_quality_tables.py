"""The quality benchmark's pure pieces: the policy-twin option and the win/tie/loss count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402
from quality_tables import win_tie_loss  # noqa: E402


def test_parse_twins_reads_code_language_policy_and_rejects_bad_parts() -> None:
    assert quality.parse_twins("de-top=de:topical, de-any=de:exact-any") == {
        "de-top": ("de", "topical"), "de-any": ("de", "exact-any")}
    assert quality.parse_twins("") == {}
    with pytest.raises(SystemExit, match="POLICY one of"):
        quality.parse_twins("de-x=de:broad")
    with pytest.raises(SystemExit, match="DE_X"):
        quality.parse_twins("DE_X=de:strict")


def test_win_tie_loss_counts_intervals_per_market_and_seed() -> None:
    def seeds(*cells):
        return {"per_seed": [{"diff": d, "significant": s} for d, s in cells]}

    table = {"a": seeds((0.1, True), (0.02, False)), "b": seeds((-0.05, True), (None, None)),
             "c": seeds((0.03, False), (0.2, True))}
    assert win_tie_loss(table, ["a", "b", "c"]) == (2, 2, 1)
    assert win_tie_loss(table, ["b"]) == (0, 0, 1)
