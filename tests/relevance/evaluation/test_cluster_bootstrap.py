"""Tests for the query_id cluster bootstrap (relevance.evaluation.bootstrap, through metrics): the fast
vectorised resamples against a slow sklearn loop over the same drawn clusters, clustered vs row
intervals, null query_ids, and multiplicity (bootstrap p-values, Holm)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from relevance.evaluation import bootstrap as B
from relevance.evaluation import metrics as M


def clustered(n_queries: int, seed: int, market: str = "us", offset: float = 1.5, sizes: tuple[int, int] = (1, 9),
              null_fraction: float = 0.0, decimals: int | None = 1) -> pd.DataFrame:
    """Rows grouped by query: uneven sizes, a per-query label rate (so some queries hold one class
    only) and a per-query score offset shared by its rows; rounding plants ties."""
    rng = np.random.default_rng(seed)
    q = np.repeat(np.arange(n_queries), rng.integers(sizes[0], sizes[1], n_queries))
    rate = rng.choice([0.0, 0.3, 0.7, 1.0], n_queries)
    y = (rng.random(len(q)) < rate[q]).astype(int)
    s = rng.normal(size=len(q)) + 0.8 * y + rng.normal(scale=offset, size=n_queries)[q]
    qid = np.array([f"{market}-q{i}" for i in q], dtype=object)
    qid[rng.random(len(q)) < null_fraction] = None
    return pd.DataFrame({"example_id": [f"{market}-{i}" for i in range(len(q))], "market": market, "label": y,
                         "score": s if decimals is None else np.round(s, decimals), "query_id": qid})


@pytest.fixture(scope="module")
def market() -> pd.DataFrame:
    return clustered(40, seed=3, market="de", null_fraction=0.15)


def _members(frame: pd.DataFrame, ids: np.ndarray) -> list[np.ndarray]:
    """Row positions of each cluster, checked against the query_ids themselves."""
    qid, null = frame["query_id"].to_numpy(), frame["query_id"].isna().to_numpy()
    members = [np.flatnonzero(ids == c) for c in range(int(ids.max()) + 1)]
    for rows in members:
        if null[rows].any():  # a null query_id is a cluster of its own
            assert len(rows) == 1
        else:  # one query_id per cluster, and all of its rows
            values = set(qid[rows])
            assert len(values) == 1 and set(np.flatnonzero(qid == values.pop())) == set(rows)
    return members


def _reference(frame: pd.DataFrame, score_cols: list[str], n_boot: int, seed: int, key: str
               ) -> list[list[tuple[float, float]]]:
    """Slow reference: for each replayed draw, concatenate the drawn queries' rows and ask sklearn."""
    y = frame["label"].to_numpy()
    ids = M._cluster_ids(frame, use_qid=True)
    members = _members(frame, ids)
    clusters = B.make_clusters(ids, y)
    composition = [len(s) for s in clusters.strata]
    out: list[list[tuple[float, float]]] = [[] for _ in score_cols]
    for draws in B._cluster_draws(clusters, n_boot, B.rng_for(seed, key), len(frame)):
        for drawn in draws:
            rows = np.concatenate([members[c] for c in drawn])
            assert [int(np.isin(drawn, s).sum()) for s in clusters.strata] == composition
            for k, col in enumerate(score_cols):
                s = frame[col].to_numpy()[rows]
                out[k].append((roc_auc_score(y[rows], s), average_precision_score(y[rows], s)))
    return out


def test_cluster_ids_follow_query_ids_and_ignore_row_order(market: pd.DataFrame) -> None:
    ids = M._cluster_ids(market, use_qid=True)
    _members(market, ids)
    n_null = int(market["query_id"].isna().sum())
    assert ids.max() + 1 == market["query_id"].nunique() + n_null and n_null > 0
    shuffled = market.sample(frac=1.0, random_state=0)
    again = pd.Series(M._cluster_ids(shuffled, use_qid=True), index=shuffled["example_id"])
    assert (again.loc[market["example_id"]].to_numpy() == ids).all()


def test_fast_cluster_bootstrap_equals_slow_reference(market: pd.DataFrame, monkeypatch) -> None:
    y = market["label"].to_numpy()
    clusters = B.make_clusters(M._cluster_ids(market, use_qid=True), y)
    assert all(len(s) > 0 for s in clusters.strata)  # mixed, positive-only and negative-only queries
    assert market["score"].duplicated().any()  # ties
    n_boot = 200
    monkeypatch.setattr(B, "_CHUNK_ELEMENTS", 30 * len(market))  # several chunks: the chunked path is checked
    [(auc, ap)] = B.bootstrap_stats(y, [market["score"].to_numpy()], clusters, n_boot, B.rng_for(7, "de"))
    [ref] = _reference(market, ["score"], n_boot, seed=7, key="de")
    np.testing.assert_allclose(auc, [r[0] for r in ref], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ap, [r[1] for r in ref], rtol=0, atol=1e-12)  # type: ignore[arg-type]
    e = M.auc_table(market, n_boot=n_boot, seed=7)["markets"]["de"]
    assert (e["ci_low"], e["ci_high"]) == pytest.approx(tuple(np.quantile(auc, [0.025, 0.975])), abs=1e-12)
    assert e["n_clusters"] == clusters.n


def test_fast_paired_difference_equals_slow_reference(market: pd.DataFrame, monkeypatch) -> None:
    rng = np.random.default_rng(11)
    a = market.rename(columns={"score": "score_a"})
    a["score_b"] = np.round(a["score_a"] + 0.2 * a["label"] + rng.normal(scale=0.8, size=len(a)), 1)
    n_boot = 200
    monkeypatch.setattr(B, "_CHUNK_ELEMENTS", 30 * len(market))
    ref_a, ref_b = _reference(a, ["score_a", "score_b"], n_boot, seed=5, key="de")
    ref = np.array([rb[0] - ra[0] for ra, rb in zip(ref_a, ref_b)])
    pa = a.drop(columns="score_b").rename(columns={"score_a": "score"})
    pb = a.drop(columns="score_a").rename(columns={"score_b": "score"}).sample(frac=1.0, random_state=2)
    res = M.paired_comparison(pa, pb, n_boot=n_boot, seed=5)
    e = res["markets"]["de"]
    assert res["cluster"] == "query_id" and e["n_clusters"] == M._cluster_ids(market, True).max() + 1
    lo, hi = np.quantile(ref, [0.025, 0.975])
    assert (e["ci_low"], e["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    ref[np.abs(ref) < 1e-12] = 0.0  # sklearn's trapezoids may leave 1e-17 where the AUCs are equal
    share = min(np.mean(ref <= 0), np.mean(ref >= 0))
    assert e["p_value"] == pytest.approx(max(1 / n_boot, min(1.0, 2 * share)), abs=1e-12)
    assert 0.05 < e["p_value"] < 0.5  # a p-value from the draws, not the floor or the ceiling


def test_clustered_intervals_are_wider_when_queries_are_correlated() -> None:
    f = clustered(150, seed=0, sizes=(4, 9))
    by_query = M.auc_table(f, n_boot=500)
    by_row = M.auc_table(f.drop(columns="query_id"), n_boot=500)
    assert (by_query["cluster"], by_row["cluster"]) == ("query_id", "row")
    q, r = by_query["markets"]["us"], by_row["markets"]["us"]
    assert (q["n_clusters"], r["n_clusters"]) == (150, len(f))
    assert q["auc"] == r["auc"]
    assert q["ci_high"] - q["ci_low"] > 1.4 * (r["ci_high"] - r["ci_low"])
    width = {k: t["micro"]["ci_high"] - t["micro"]["ci_low"] for k, t in (("query", by_query), ("row", by_row))}
    assert width["query"] > width["row"]


def test_one_row_per_query_is_the_row_bootstrap() -> None:
    f = clustered(150, seed=0, sizes=(4, 9))
    singletons = f.assign(query_id=f["example_id"])
    q = M.auc_table(singletons, n_boot=300)
    r = M.auc_table(f.drop(columns="query_id"), n_boot=300)
    assert q["cluster"] == "query_id" and q["markets"] == r["markets"]  # same clusters, same draws


def test_null_query_ids() -> None:
    f = clustered(60, seed=1)
    all_null = M.auc_table(f.assign(query_id=None), n_boot=200)
    assert all_null["cluster"] == "row"
    assert all_null == M.auc_table(f.drop(columns="query_id"), n_boot=200)
    part = f.copy()
    part.loc[part.index[:10], "query_id"] = None
    e = M.auc_table(part, n_boot=200)["markets"]["us"]
    assert e["n_clusters"] == part["query_id"].nunique() + 10
    json.dumps(M.auc_table(part, n_boot=50), allow_nan=False)


def test_micro_clusters_are_per_market() -> None:
    """The same query_id in two markets is two clusters in the pooled bootstrap."""
    us = clustered(30, seed=2, market="us")
    gb = clustered(30, seed=2, market="gb").assign(query_id=us["query_id"].to_numpy())
    t = M.auc_table(pd.concat([us, gb], ignore_index=True), n_boot=100)
    assert t["micro"]["n_clusters"] == t["markets"]["us"]["n_clusters"] + t["markets"]["gb"]["n_clusters"]


def test_p_value_by_hand() -> None:
    assert B.p_value(np.array([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8])) == pytest.approx(0.4)  # 2 · min(2/10, 9/10)
    assert B.p_value(np.arange(1.0, 101.0)) == pytest.approx(0.01)  # none ≤ 0: floored at 1/n_boot
    assert B.p_value(np.zeros(50)) == 1.0


def test_holm_by_hand() -> None:
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
    # sorted d, a, c, b against 0.05/4, 0.05/3, 0.05/2, 0.05/1: d and a pass, c fails and stops (b is never tried)
    assert B.holm(p, 0.05) == {"a": True, "b": False, "c": False, "d": True}
    # Holm is uniformly more powerful than Bonferroni (0.025 each): y passes at the second step
    assert B.holm({"x": 0.02, "y": 0.04}, 0.05) == {"x": True, "y": True}
    assert B.holm({"x": 0.03, "y": 0.04}, 0.05) == {"x": False, "y": False}
    assert B.holm({}, 0.05) == {}


def _null_pair(markets: list[str], seed: int, n: int = 200) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two runs that are noisy copies of the same latent score: no real difference anywhere."""
    rng = np.random.default_rng(seed)
    fa, fb = [], []
    for m in markets:
        y = rng.integers(0, 2, n)
        latent = rng.normal(size=n) + 0.8 * y
        base = pd.DataFrame({"example_id": [f"{m}-{i}" for i in range(n)], "market": m, "label": y})
        fa.append(base.assign(score=latent + rng.normal(scale=0.7, size=n)))
        fb.append(base.assign(score=latent + rng.normal(scale=0.7, size=n)))
    return pd.concat(fa, ignore_index=True), pd.concat(fb, ignore_index=True)


def test_a_lucky_market_among_null_markets_does_not_survive_holm() -> None:
    markets = [f"m{i:02d}" for i in range(20)]
    a, b = _null_pair(markets, seed=3)  # a seed where chance makes exactly one market "significant"
    res = M.paired_comparison(a, b, n_boot=1000)
    lucky = [k for k, e in res["markets"].items() if e["significant"]]
    assert len(lucky) == 1
    e = res["markets"][lucky[0]]
    assert 0.05 / 20 < e["p_value"] <= 0.05 and e["holm_significant"] is False
    assert (res["n_compared"], res["n_significant"], res["n_holm_significant"]) == (20, 1, 0)
    assert res["expected_false_positives"] == pytest.approx(1.0)
    assert not any(e["holm_significant"] for e in res["markets"].values())
