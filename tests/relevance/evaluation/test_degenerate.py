"""Degenerate markets (relevance.evaluation.degenerate): the definition on real AUC tables, and the flags
where a user looks: auc_table / metrics.json and the `evaluate` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from relevance.evaluation.degenerate import (CHANCE_AUC, SPREAD_FLOOR, degenerate_markets, describe, market_flags,
                                             score_spread)
from relevance.evaluation.metrics import auc_table, evaluate_run

N_BOOT = 400


def market(name: str, y: np.ndarray, s: np.ndarray) -> pd.DataFrame:
    n = len(y)
    return pd.DataFrame({"example_id": [f"{name}-{i}" for i in range(n)], "market": name, "label": y,
                         "query_id": [f"{name}-q{i // 3}" for i in range(n)], "score": s})


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def preds() -> pd.DataFrame:
    """``flat``: the multilingual-e5 failure (mean 0.719, std 0.001 over 450 rows, a faint signal);
    ``coin``: random scores on random labels; ``good``: well separated; ``one``: only positives."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 450)
    flat = 0.719 + 0.001 * rng.normal(size=450) + 0.0004 * y
    y_coin = rng.integers(0, 2, 900)
    y_good = rng.integers(0, 2, 300)
    return pd.concat([market("flat", y, flat), market("coin", y_coin, rng.random(900)),
                      market("good", y_good, sigmoid(rng.normal(size=300) + 3 * y_good)),
                      market("one", np.ones(30, dtype=int), rng.random(30))], ignore_index=True)


@pytest.fixture(scope="module")
def table(preds: pd.DataFrame) -> dict:
    return auc_table(preds, n_boot=N_BOOT, seed=0)


def test_constant_scores_are_degenerate_with_the_spread_reason() -> None:
    flags = market_flags(np.full(50, 0.7), {"auc": 0.5, "ci_low": 0.5, "ci_high": 0.5})
    assert flags["degenerate"] and flags["score_std"] == pytest.approx(0.0, abs=1e-12)
    assert flags["reasons"][0].startswith("score spread ")
    assert flags["reasons"][0].endswith(f"< {SPREAD_FLOOR} (near-constant scores)")
    assert flags["reasons"][1] == "AUC 0.500 [0.500, 0.500] is within noise of 0.5"


def test_near_constant_scores_are_caught_even_with_an_auc_above_chance(table: dict) -> None:
    e = table["markets"]["flat"]
    assert e["ci_low"] > CHANCE_AUC, "the faint signal gives an interval above 0.5: only the spread can tell"
    assert e["degenerate"] is True and e["score_std"] == pytest.approx(0.001, rel=0.2)
    [reason] = e["degenerate_reasons"]
    assert reason.startswith("score spread 0.00") and f"< {SPREAD_FLOOR} (near-constant scores)" in reason


def test_random_scores_on_random_labels_are_within_noise_of_chance(table: dict) -> None:
    e = table["markets"]["coin"]
    assert e["ci_low"] <= CHANCE_AUC <= e["ci_high"] and e["score_std"] > 0.25
    assert e["degenerate"] is True
    assert e["degenerate_reasons"] == [f"AUC {e['auc']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}] is within "
                                       "noise of 0.5"]


def test_a_well_separated_market_is_not_degenerate(table: dict) -> None:
    e = table["markets"]["good"]
    assert e["auc"] > 0.9 and e["degenerate"] is False and e["degenerate_reasons"] == []
    assert 0.1 < e["score_std"] < 0.5


def test_a_one_class_market_is_not_flagged(table: dict) -> None:
    e = table["markets"]["one"]
    assert e["auc"] is None and e["degenerate"] is False and e["degenerate_reasons"] == []
    assert market_flags(np.full(5, 0.3), {"auc": None, "ci_low": None, "ci_high": None})["reasons"] == []


def test_flags_join_the_auc_table_without_changing_its_keys(preds: pd.DataFrame, table: dict) -> None:
    for e in table["markets"].values():
        assert {"auc", "ci_low", "ci_high", "pr_auc", "n", "n_pos", "n_neg", "n_clusters", "status"} <= set(e)
        assert isinstance(e["score_std"], float) and isinstance(e["degenerate"], bool)
    assert degenerate_markets(table) == {m: table["markets"][m]["degenerate_reasons"] for m in ("coin", "flat")}
    assert table["markets"]["good"]["score_std"] == pytest.approx(score_spread(preds[preds.market == "good"].score))
    json.dumps(table, allow_nan=False)
    assert degenerate_markets({"markets": {"us": {"auc": 0.8}}}) == {}  # metrics.json from before the check


def test_describe_names_run_split_market_and_reasons() -> None:
    line = describe("de", ["a", "b"], "valid", "r1")
    assert line == "degenerate predictions for market de (run r1, split valid): a; b"


def test_evaluate_writes_the_flags_and_the_cli_says_so_loudly(preds: pd.DataFrame, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from relevance.cli.app import app

    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    preds.to_parquet(run / "predictions" / "test.parquet")
    res = evaluate_run(run, n_boot=N_BOOT)
    written = json.loads((run / "metrics.json").read_text())
    assert written["markets"]["flat"]["degenerate"] is True and res["markets"]["good"]["degenerate"] is False
    out = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--n-boot", str(N_BOOT)])
    assert out.exit_code == 0, out.output
    warnings = [line for line in out.output.splitlines() if line.startswith("⚠ WARNING")]
    assert len(warnings) == 2 and "market coin (run" in warnings[0] and "market flat (run" in warnings[1]
    assert "split test" in warnings[1] and "near-constant scores" in warnings[1]
    flat_row = next(line for line in out.output.splitlines() if line.startswith("| flat"))
    assert "⚠ degenerate" in flat_row
