"""Tests for relevance.evaluation.metrics: exactness against scikit-learn, the bootstrap against a slow
reference loop over the same draws, one-class markets, determinism, paired comparisons."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from relevance.evaluation import bootstrap as B
from relevance.evaluation import metrics as M


def make_preds(sizes: dict[str, int], seed: int = 0, signal: float = 0.8, decimals: int | None = 1,
               prefix: str = "") -> pd.DataFrame:
    """Synthetic predictions; rounding the scores plants many ties (the tricky case for AUCs)."""
    rng = np.random.default_rng(seed)
    frames = []
    for market, n in sizes.items():
        y = rng.integers(0, 2, n)
        s = rng.normal(size=n) + signal * y
        if decimals is not None:
            s = np.round(s, decimals)
        ids = [f"{prefix}{market}-{i}" for i in range(n)]
        frames.append(pd.DataFrame({"example_id": ids, "market": market, "label": y, "score": s}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def preds() -> pd.DataFrame:
    p = make_preds({"us": 600, "de": 200, "jp": 60})
    one_class = pd.DataFrame({"example_id": ["fr-0", "fr-1", "fr-2"], "market": "fr",
                              "label": [1, 1, 1], "score": [0.2, 0.5, 0.9]})
    return pd.concat([p, one_class], ignore_index=True)


@pytest.fixture(scope="module")
def table(preds: pd.DataFrame) -> dict:
    return M.auc_table(preds, n_boot=1000, seed=0)


def test_point_estimates_equal_sklearn(preds: pd.DataFrame, table: dict) -> None:
    for market in ("us", "de", "jp"):
        g = preds[preds.market == market]
        e = table["markets"][market]
        assert e["auc"] == pytest.approx(roc_auc_score(g.label, g.score), abs=1e-12)
        assert e["pr_auc"] == pytest.approx(average_precision_score(g.label, g.score), abs=1e-12)
        assert (e["n"], e["n_pos"], e["n_neg"]) == (len(g), int(g.label.sum()), int((g.label == 0).sum()))
        assert e["status"] == "ok"
        assert e["ci_low"] <= e["auc"] <= e["ci_high"]
        assert e["pr_ci_low"] <= e["pr_auc"] <= e["pr_ci_high"]
    pooled = preds[preds.market != "fr"]
    assert table["micro"]["auc"] == pytest.approx(roc_auc_score(pooled.label, pooled.score), abs=1e-12)
    defined = [table["markets"][m]["auc"] for m in ("de", "jp", "us")]
    assert table["macro"]["auc"] == pytest.approx(np.mean(defined), abs=1e-15)
    assert table["macro"]["ci_low"] < table["macro"]["auc"] < table["macro"]["ci_high"]


def test_bootstrap_equals_reference_loop_with_same_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """No query_id: every row is a cluster. Replay the exact draws through sklearn, one resample at a time."""
    g = make_preds({"de": 90}, seed=3)
    y, s = g.label.to_numpy(), g.score.to_numpy()
    ids = M._cluster_ids(g, use_qid=False)
    assert sorted(ids) == list(range(len(g)))  # one cluster per row
    clusters = B.make_clusters(ids, y)
    assert len(clusters.strata[0]) == 0  # rows hold one class each: positives and negatives are the strata
    row_of = np.argsort(ids)
    n_boot = 300
    monkeypatch.setattr(B, "_CHUNK_ELEMENTS", 50 * 100)  # several chunks: the chunked path is the one checked
    fast = M.auc_table(g, n_boot=n_boot, seed=7)
    ref_auc, ref_ap = [], []
    for draws in B._cluster_draws(clusters, n_boot, B.rng_for(7, "de"), len(g)):
        for drawn in draws:
            rows = row_of[drawn]
            assert y[rows].sum() == y.sum()  # class counts of every resample equal the market's
            ref_auc.append(roc_auc_score(y[rows], s[rows]))
            ref_ap.append(average_precision_score(y[rows], s[rows]))
    assert len(ref_auc) == n_boot and fast["cluster"] == "row"
    e = fast["markets"]["de"]
    assert e["n_clusters"] == len(g)
    lo, hi = np.quantile(ref_auc, [0.025, 0.975])
    plo, phi = np.quantile(ref_ap, [0.025, 0.975])
    assert e["ci_low"] == pytest.approx(lo, abs=1e-12)
    assert e["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert e["pr_ci_low"] == pytest.approx(plo, abs=1e-12)
    assert e["pr_ci_high"] == pytest.approx(phi, abs=1e-12)


def test_interval_width_shrinks_with_n() -> None:
    widths = []
    for n in (100, 1600):
        e = M.auc_table(make_preds({"us": n}, seed=1, decimals=None), n_boot=500)["markets"]["us"]
        widths.append(e["ci_high"] - e["ci_low"])
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(16) = 1/4 in theory


def test_one_class_market_is_undefined_and_excluded(table: dict) -> None:
    fr = table["markets"]["fr"]
    assert fr["status"] == "undefined: only positives"
    assert fr["auc"] is None and fr["ci_low"] is None and fr["pr_auc"] is None
    assert (fr["n"], fr["n_pos"], fr["n_neg"], fr["n_clusters"]) == (3, 3, 0, 3)
    assert table["cluster"] == "row"  # no query_id column: every row is its own cluster
    assert table["macro"]["excluded"] == ["fr"] and table["micro"]["excluded"] == ["fr"]
    assert table["macro"]["markets"] == ["de", "jp", "us"]
    text = json.dumps(table, allow_nan=False)  # JSON-serialisable, no NaN anywhere
    assert "NaN" not in text


def test_only_negatives_and_all_markets_undefined() -> None:
    p = pd.DataFrame({"example_id": ["a", "b"], "market": ["us", "de"], "label": [0, 1], "score": [0.1, 0.2]})
    t = M.auc_table(p, n_boot=50)
    assert t["markets"]["us"]["status"] == "undefined: only negatives"
    assert t["markets"]["de"]["status"] == "undefined: only positives"
    assert t["macro"]["auc"] is None and t["micro"]["auc"] is None
    assert t["macro"]["status"].startswith("undefined")
    json.dumps(t, allow_nan=False)


def test_determinism_and_seed_sensitivity(preds: pd.DataFrame, table: dict) -> None:
    assert M.auc_table(preds, n_boot=1000, seed=0) == table
    other = M.auc_table(preds, n_boot=1000, seed=1)
    assert other["markets"]["us"]["ci_low"] != table["markets"]["us"]["ci_low"]
    # A market's interval does not depend on which other markets are present.
    alone = M.auc_table(preds[preds.market == "de"], n_boot=1000, seed=0)
    assert alone["markets"]["de"] == table["markets"]["de"]


@pytest.mark.parametrize("bad, match", [
    (pd.DataFrame(columns=["example_id", "market", "label", "score"]), "empty"),
    (pd.DataFrame({"example_id": ["a"], "market": ["us"], "label": [1]}), r"\['score'\]"),
    (pd.DataFrame({"example_id": ["a"], "market": ["us"], "label": [2], "score": [0.5]}), r"\[2\]"),
    (pd.DataFrame({"example_id": ["a", "b"], "market": "us", "label": [1, 0],
                   "score": [0.5, math.nan]}), "1 non-finite score.*'b'"),
])
def test_bad_input_errors(bad: pd.DataFrame, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        M.auc_table(bad)


def test_paired_detects_a_real_difference() -> None:
    a = make_preds({"us": 400, "de": 150}, seed=5, signal=0.5)
    b = a.copy()
    rng = np.random.default_rng(9)
    b["score"] = a.score + 0.6 * a.label + rng.normal(scale=0.3, size=len(a))  # better by construction
    b = b.sample(frac=1.0, random_state=0)  # row order must not matter: joined on example_id
    res = M.paired_comparison(a, b, n_boot=1000, seed=0)
    for market in ("us", "de"):
        e = res["markets"][market]
        g = a[a.market == market]
        gb = b.set_index("example_id").loc[g.example_id]
        assert e["auc_a"] == pytest.approx(roc_auc_score(g.label, g.score), abs=1e-12)
        assert e["auc_b"] == pytest.approx(roc_auc_score(gb.label, gb.score), abs=1e-12)
        assert e["diff"] > 0.05 and e["ci_low"] > 0 and e["significant"] is True
    assert res["macro"]["significant"] is True and res["macro"]["ci_low"] > 0
    assert all(res["markets"][k]["holm_significant"] is True for k in ("us", "de"))
    assert res["markets"]["us"]["p_value"] == 1 / 1000  # every resample favours b: floored at 1/n_boot
    assert (res["n_compared"], res["n_significant"], res["n_holm_significant"]) == (2, 2, 2)
    assert res["expected_false_positives"] == pytest.approx(0.1) and res["cluster"] == "row"
    # The paired interval is narrower than the unpaired intervals would suggest.
    ta = M.auc_table(a, n_boot=1000)["markets"]["us"]
    assert res["markets"]["us"]["ci_high"] - res["markets"]["us"]["ci_low"] < ta["ci_high"] - ta["ci_low"]


def test_paired_null_difference_is_exactly_zero() -> None:
    a = make_preds({"us": 300, "de": 80}, seed=2)
    res = M.paired_comparison(a, a.copy(), n_boot=500, seed=0)
    for e in [*res["markets"].values(), res["macro"]]:
        assert e["diff"] == 0.0 and e["ci_low"] == 0.0 and e["ci_high"] == 0.0
        assert e["significant"] is False and e["p_value"] == 1.0
        assert e.get("holm_significant", False) is False
    assert (res["n_significant"], res["n_holm_significant"]) == (0, 0)


def test_paired_noise_only_is_not_significant() -> None:
    a = make_preds({"us": 500}, seed=4, decimals=None)
    b = a.copy()
    b["score"] = a.score + np.random.default_rng(0).normal(scale=0.05, size=len(a))
    assert M.paired_comparison(a, b, n_boot=1000)["markets"]["us"]["significant"] is False


def test_paired_mismatched_examples_error() -> None:
    a = make_preds({"us": 50}, seed=1)
    b = a.iloc[3:].copy()
    b = pd.concat([b, pd.DataFrame({"example_id": ["new-1"], "market": "us", "label": [1], "score": [0.3]})])
    with pytest.raises(ValueError, match="3 example_id.*only in a, 1 only in b"):
        M.paired_comparison(a, b)
    c = a.copy()
    c.loc[0, "label"] = 1 - c.loc[0, "label"]
    with pytest.raises(ValueError, match="different label"):
        M.paired_comparison(a, c)
    with pytest.raises(ValueError, match="duplicated example_id"):
        M.paired_comparison(a, pd.concat([a, a.iloc[:1]]))
    qa = a.assign(query_id=[f"q{i // 3}" for i in range(len(a))])
    qb = qa.copy()
    qb.loc[4, "query_id"] = "other"
    with pytest.raises(ValueError, match="1 example.*different query_id.*'us-4'"):
        M.paired_comparison(qa, qb)
    qb.loc[4, "query_id"] = None  # one side null: the other side's query_id is used
    one_sided = M.paired_comparison(qa, a, n_boot=50)  # only a has query_id: its clusters are used
    assert one_sided == M.paired_comparison(qa, qb, n_boot=50) == M.paired_comparison(a, qa, n_boot=50)
    assert one_sided["cluster"] == "query_id" and one_sided["markets"]["us"]["n_clusters"] == 17


def test_paired_one_class_market() -> None:
    a = pd.concat([make_preds({"us": 60}), pd.DataFrame(
        {"example_id": ["x"], "market": "fr", "label": [0], "score": [0.1]})], ignore_index=True)
    res = M.paired_comparison(a, a.copy(), n_boot=100)
    assert res["markets"]["fr"]["status"] == "undefined: only negatives"
    assert res["markets"]["fr"]["diff"] is None and res["macro"]["excluded"] == ["fr"]
    assert res["markets"]["fr"]["holm_significant"] is False and res["n_compared"] == 1
    json.dumps(res, allow_nan=False)


def test_evaluate_run_writes_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run1"
    (run / "predictions").mkdir(parents=True)
    p = make_preds({"us": 100, "de": 40})
    p.to_parquet(run / "predictions" / "test.parquet")
    p.to_parquet(run / "predictions" / "valid.parquet")
    (run / "run_info.json").write_text(json.dumps({"method": "mtl-lora", "run_name": "r1"}))
    res = M.evaluate_run(run, n_boot=200, seed=3)
    assert res["method"] == "mtl-lora" and res["split"] == "test" and res["n_boot"] == 200
    assert json.loads((run / "metrics.json").read_text()) == res
    assert res["markets"] == M.auc_table(p, n_boot=200, seed=3)["markets"]
    M.evaluate_run(run, n_boot=50, split="valid")
    assert (run / "metrics_valid.json").exists()
    assert json.loads((run / "metrics.json").read_text())["split"] == "test"  # not overwritten
    with pytest.raises(FileNotFoundError, match="holdout.parquet"):
        M.evaluate_run(run, split="holdout")
    pd.DataFrame(columns=p.columns).to_parquet(run / "predictions" / "test.parquet")
    with pytest.raises(ValueError, match="test.parquet.*empty"):
        M.evaluate_run(run)
