"""Per-market ROC-AUC / PR-AUC with cluster-bootstrap intervals, and paired run comparisons.

Why a bootstrap: markets are small and unequal, so a point AUC alone cannot say whether MTL-LoRA
really beats shared LoRA on a market. Why over *clusters*: rows are not independent. Several rows
share a ``query_id`` (three per question in the QA benchmark, many per query in ad logs), and rows
of one query share its difficulty, so resampling rows pretends there is more evidence than there
is and gives intervals that are too narrow. Within each market we therefore resample whole
``query_id`` clusters with replacement. A row whose ``query_id`` is null is its own cluster; when
the predictions carry no ``query_id`` at all, every row is (``"cluster": "row"`` in the output),
which is the old row bootstrap.

Why *stratified by cluster composition*: every resample needs both classes for its AUC to be
defined, and silently dropping one-class resamples would bias the interval. Clusters are split
into three strata (both classes / only positives / only negatives) and each stratum is resampled
to its own size: a resample then always holds a both-class cluster, or a positive-only and a
negative-only one. With one row per cluster this is exactly the old class-stratified bootstrap.

Why histograms: both AUCs only depend on how many resampled positives / negatives sit at each
distinct score. A resample's cluster multiplicities become per-row weights, and one weighted
``bincount`` turns (resamples × rows) weights into (resamples × distinct scores) counts; Mann–Whitney
AUC and average precision are then cumulative sums over that matrix: all resamples at once, ties
handled exactly as scikit-learn does (half credit for ROC, threshold-per-distinct-score for PR).
Resamples are processed in chunks only to bound memory (:mod:`relevance.evaluation.bootstrap`).

Resamples are drawn from a generator seeded by ``(seed, crc32(market))`` over clusters in sorted
key order: a market's interval does not change when another market is added or rows are
reordered, and two runs evaluated with the same seed draw the same clusters, which is what makes
:func:`paired_comparison` paired. Many markets compared at once will show some "significant"
differences by chance; a comparison therefore also reports bootstrap p-values, Holm's step-down
decision across its markets, and how many false positives chance alone would produce.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from relevance.evaluation.bootstrap import (bootstrap_stats, holm, interval, make_clusters, p_value, point_stats,
                                            rng_for)
from relevance.evaluation.degenerate import market_flags

REQUIRED_COLUMNS = ("example_id", "market", "label", "score")
_MICRO_KEY = "\x00micro"  # RNG key of the pooled (micro) bootstrap; no market code can collide


def _validate(preds: pd.DataFrame, name: str = "predictions") -> None:
    """Raise ``ValueError`` naming what is wrong with a predictions frame."""
    missing = [c for c in REQUIRED_COLUMNS if c not in preds.columns]
    if missing:
        raise ValueError(f"{name} lack column(s) {missing}; have {list(preds.columns)}")
    if len(preds) == 0:
        raise ValueError(f"{name} are empty: no rows to evaluate (an empty split?)")
    bad = sorted(set(pd.unique(preds["label"]).tolist()) - {0, 1}, key=str)
    if bad:
        raise ValueError(f"{name} have label values {bad[:5]}; labels must be 0 or 1")
    scores = pd.to_numeric(preds["score"], errors="coerce").to_numpy(dtype=float)
    nonfinite = ~np.isfinite(scores)
    if nonfinite.any():
        first = preds["example_id"].iloc[int(np.argmax(nonfinite))]
        raise ValueError(
            f"{name} have {int(nonfinite.sum())} non-finite score(s) (first at example_id {first!r})"
        )


def _check_params(n_boot: int, ci: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")


def _has_query_ids(preds: pd.DataFrame) -> bool:
    """Whether clusters come from ``query_id`` (a column with at least one value) or are rows."""
    return "query_id" in preds.columns and bool(preds["query_id"].notna().any())


def _cluster_ids(frame: pd.DataFrame, use_qid: bool, by_market: bool = False) -> np.ndarray:
    """Dense cluster id per row: one per ``query_id`` (per market when ``by_market``), one per row
    where the id is null or ``use_qid`` is false.

    Ids are numbered in sorted key order (a row's own key is its example_id), so the clusters, and
    hence the draws, do not depend on row order: two runs' files line up however they are sorted.
    """
    eid = frame["example_id"].astype(str).to_numpy(dtype=object)
    if use_qid:
        null = frame["query_id"].isna().to_numpy()
        key = np.where(null, eid, frame["query_id"].astype(str).to_numpy(dtype=object))
    else:
        null, key = np.ones(len(frame), dtype=bool), eid
    keys = pd.DataFrame({"null": null, "key": key})
    occurrence = keys.groupby(["null", "key"], sort=False, dropna=False).cumcount()
    keys["occ"] = occurrence.where(keys["null"], 0)  # duplicated example_ids stay separate rows
    if by_market:
        keys.insert(0, "market", frame["market"].astype(str).to_numpy(dtype=object))
    return keys.groupby(list(keys.columns), sort=True, dropna=False).ngroup().to_numpy(dtype=np.int64)


def _one_class_status(n_pos: int, n_neg: int) -> str:
    return "undefined: only positives" if n_neg == 0 else "undefined: only negatives"


def _auc_entry(frame: pd.DataFrame, use_qid: bool, n_boot: int, rng: np.random.Generator, ci: float,
               by_market: bool = False) -> tuple[dict[str, Any], np.ndarray | None]:
    """One market's (or the pooled rows') entry, plus its ROC-AUC bootstrap for the macro mean."""
    y = frame["label"].to_numpy().astype(int)
    s = frame["score"].to_numpy(dtype=float)
    ids = _cluster_ids(frame, use_qid, by_market)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    entry: dict[str, Any] = {"n": len(y), "n_pos": n_pos, "n_neg": n_neg,
                             "n_clusters": int(ids.max()) + 1 if len(ids) else 0}
    if n_pos == 0 or n_neg == 0:
        nones = dict.fromkeys(("auc", "ci_low", "ci_high", "pr_auc", "pr_ci_low", "pr_ci_high"))
        return {**nones, **entry, "status": _one_class_status(n_pos, n_neg)}, None
    auc, ap = point_stats(y, s)
    [(boot_auc, boot_ap)] = bootstrap_stats(y, [s], make_clusters(ids, y), n_boot, rng)
    lo, hi = interval(boot_auc, ci)
    plo, phi = interval(boot_ap, ci)  # type: ignore[arg-type]
    return {"auc": auc, "ci_low": lo, "ci_high": hi, "pr_auc": ap, "pr_ci_low": plo,
            "pr_ci_high": phi, **entry, "status": "ok"}, boot_auc


def _by_market(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return sorted(((str(k), g) for k, g in frame.groupby("market", sort=True)), key=lambda kv: kv[0])


def auc_table(preds: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Per-market ROC-AUC and PR-AUC with cluster-bootstrap intervals, plus macro and micro.

    Clusters are ``query_id`` values when the predictions carry them (``"cluster": "query_id"``),
    rows otherwise (``"cluster": "row"``); each entry says how many clusters it has
    (``n_clusters``). A one-class market gets ``None`` values and an ``"undefined: …"`` status,
    and is left out of macro and micro (listed under ``excluded``) so a mean is never NaN. The
    macro interval is the quantile of the per-resample mean over markets, reusing each market's
    resamples; micro resamples (market, query_id) clusters of the pooled rows. Every market entry
    also says whether its predictions are degenerate (``score_std``, ``degenerate``,
    ``degenerate_reasons``: :func:`relevance.evaluation.degenerate.market_flags`).
    """
    _validate(preds)
    _check_params(n_boot, ci)
    use_qid = _has_query_ids(preds)
    markets: dict[str, Any] = {}
    boots: dict[str, np.ndarray] = {}
    for market, frame in _by_market(preds):
        markets[market], boot = _auc_entry(frame, use_qid, n_boot, rng_for(seed, market), ci)
        flags = market_flags(frame["score"].to_numpy(dtype=float), markets[market])
        markets[market].update(score_std=flags["score_std"], degenerate=flags["degenerate"],
                               degenerate_reasons=flags["reasons"])
        if boot is not None:
            boots[market] = boot
    defined = list(boots)
    excluded = [m for m in markets if m not in boots]
    macro: dict[str, Any] = {"markets": defined, "excluded": excluded}
    if defined:
        lo, hi = interval(np.mean([boots[m] for m in defined], axis=0), ci)
        macro.update(auc=float(np.mean([markets[m]["auc"] for m in defined])), ci_low=lo,
                     ci_high=hi, status="ok")
    else:
        macro.update(auc=None, ci_low=None, ci_high=None, status="undefined: no market has both classes")
    pooled = preds[preds["market"].astype(str).isin(defined)]
    micro, _ = _auc_entry(pooled, use_qid, n_boot, rng_for(seed, _MICRO_KEY), ci, by_market=True)
    if not defined:
        micro["status"] = "undefined: no market has both classes"
    micro.update(markets=defined, excluded=excluded)
    return {"markets": markets, "macro": macro, "micro": micro, "n_boot": int(n_boot),
            "seed": int(seed), "ci": float(ci), "cluster": "query_id" if use_qid else "row"}


def _check_unique(preds: pd.DataFrame, name: str) -> None:
    dup = preds["example_id"].duplicated()
    if dup.any():
        raise ValueError(f"{name} have {int(dup.sum())} duplicated example_id(s), "
                         f"e.g. {preds.loc[dup, 'example_id'].iloc[0]!r}")


def _check_same(m: pd.DataFrame, col: str, both: pd.Series | None = None) -> None:
    """Raise when ``col`` differs between a and b on some example (only where ``both`` is true)."""
    differ = m[f"{col}_a"].astype(str) != m[f"{col}_b"].astype(str)
    if both is not None:
        differ &= both
    if differ.any():
        raise ValueError(f"{int(differ.sum())} example(s) have a different {col} in a and b, "
                         f"e.g. example_id {m.loc[differ, 'example_id'].iloc[0]!r}")


def _merge_pair(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """One row per example: example_id, market, label, score_a, score_b and, when either run has
    it, query_id (a's value, else b's; both filled and different is an error)."""
    ids_a, ids_b = set(a["example_id"]), set(b["example_id"])
    only_a, only_b = ids_a - ids_b, ids_b - ids_a
    if only_a or only_b:
        sample = sorted(map(str, only_a | only_b))[:3]
        raise ValueError(f"example sets differ: {len(only_a)} example_id(s) only in a, "
                         f"{len(only_b)} only in b (e.g. {sample}); compare runs on the same split")
    cols = [*REQUIRED_COLUMNS, "query_id"]
    m = a[[c for c in cols if c in a.columns]].merge(b[[c for c in cols if c in b.columns]],
                                                      on="example_id", suffixes=("_a", "_b"))
    for col in ("market", "label"):
        _check_same(m, col)
    if "query_id_a" in m.columns:
        _check_same(m, "query_id", m["query_id_a"].notna() & m["query_id_b"].notna())
        m["query_id"] = m["query_id_a"].where(m["query_id_a"].notna(), m["query_id_b"])
    return m.rename(columns={"market_a": "market", "label_a": "label"})


def paired_comparison(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                      ci: float = 0.95) -> dict[str, Any]:
    """Per-market ROC-AUC difference ``b − a`` with a paired cluster-bootstrap interval.

    Both models are scored on the *same* resampled clusters, so shared example difficulty cancels
    and the interval is far narrower than comparing two independent intervals. ``significant``
    means the interval excludes 0; ``p_value`` is the two-sided bootstrap p-value, and
    ``holm_significant`` Holm's step-down decision across this comparison's markets at level
    ``1 − ci`` (it also requires ``significant``, so it never marks more). At the comparison level,
    ``expected_false_positives`` is how many markets chance alone would mark, ``(1 − ci) × n_compared``.
    """
    for frame, name in ((a, "predictions a"), (b, "predictions b")):
        _validate(frame, name)
        _check_unique(frame, name)
    _check_params(n_boot, ci)
    m = _merge_pair(a, b)
    use_qid = _has_query_ids(m)
    markets: dict[str, Any] = {}
    diffs: dict[str, np.ndarray] = {}
    for market, frame in _by_market(m):
        y = frame["label"].to_numpy().astype(int)
        sa, sb = frame["score_a"].to_numpy(dtype=float), frame["score_b"].to_numpy(dtype=float)
        ids = _cluster_ids(frame, use_qid)
        n_pos = int(y.sum())
        entry: dict[str, Any] = {"n": len(y), "n_pos": n_pos, "n_neg": len(y) - n_pos,
                                 "n_clusters": int(ids.max()) + 1}
        if n_pos == 0 or n_pos == len(y):
            nones = dict.fromkeys(("auc_a", "auc_b", "diff", "ci_low", "ci_high", "p_value"))
            markets[market] = {**nones, "significant": False, "holm_significant": False, **entry,
                               "status": _one_class_status(n_pos, len(y) - n_pos)}
            continue
        [(ba, _), (bb, _)] = bootstrap_stats(y, [sa, sb], make_clusters(ids, y), n_boot,
                                             rng_for(seed, market), want_ap=False)
        diffs[market] = bb - ba
        auc_a, auc_b = point_stats(y, sa)[0], point_stats(y, sb)[0]
        markets[market] = {"auc_a": auc_a, "auc_b": auc_b, **_diff_summary(auc_b - auc_a, diffs[market], ci),
                           **entry, "status": "ok"}
    defined = list(diffs)
    rejected = holm({k: markets[k]["p_value"] for k in defined}, 1.0 - ci)
    for k in defined:
        markets[k]["holm_significant"] = bool(rejected[k] and markets[k]["significant"])
    macro: dict[str, Any] = {"markets": defined, "excluded": [k for k in markets if k not in diffs]}
    if defined:
        point = float(np.mean([markets[k]["diff"] for k in defined]))
        macro.update(auc_a=float(np.mean([markets[k]["auc_a"] for k in defined])),
                     auc_b=float(np.mean([markets[k]["auc_b"] for k in defined])),
                     **_diff_summary(point, np.mean([diffs[k] for k in defined], axis=0), ci),
                     status="ok")
    else:
        macro.update(diff=None, ci_low=None, ci_high=None, p_value=None, significant=False,
                     status="undefined: no market has both classes")
    return {"markets": markets, "macro": macro, **_multiplicity(markets, defined, ci),
            "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci),
            "cluster": "query_id" if use_qid else "row"}


def _diff_summary(point: float, boot: np.ndarray, ci: float) -> dict[str, Any]:
    """Point difference, percentile interval, two-sided bootstrap p-value, significance."""
    lo, hi = interval(boot, ci)
    return {"diff": float(point), "ci_low": lo, "ci_high": hi, "p_value": p_value(boot),
            "significant": bool(lo > 0 or hi < 0)}


def _multiplicity(markets: dict[str, Any], defined: list[str], ci: float) -> dict[str, Any]:
    """How many markets look significant, with and without Holm, against what chance alone gives."""
    return {"n_compared": len(defined),
            "n_significant": sum(bool(markets[k]["significant"]) for k in defined),
            "n_holm_significant": sum(bool(markets[k]["holm_significant"]) for k in defined),
            "expected_false_positives": float(round((1.0 - ci) * len(defined), 12))}


def metrics_path(run_dir: Path | str, split: str = "test") -> Path:
    """``RUN/metrics.json`` for the test split, ``RUN/metrics_<split>.json`` otherwise.

    Separate files so that evaluating ``valid`` never overwrites the test metrics a report reads.
    """
    name = "metrics.json" if split == "test" else f"metrics_{split}.json"
    return Path(run_dir) / name


def read_run_info(run_dir: Path | str) -> dict[str, Any]:
    """``RUN/run_info.json`` as a dict; an empty dict when the run has none."""
    path = Path(run_dir) / "run_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def evaluate_run(run_dir: Path | str, n_boot: int = 1000, seed: int = 0, split: str = "test",
                 ci: float = 0.95) -> dict[str, Any]:
    """Evaluate ``RUN/predictions/<split>.parquet`` and write the metrics JSON (see :func:`metrics_path`).

    The method comes from ``run_info.json`` (the directory name if there is none), so a report can
    label runs without reading anything else. The file is written aside and renamed, so a killed
    evaluation never leaves a half-written metrics file for a report to trust.
    """
    run_dir = Path(run_dir)
    pred_path = run_dir / "predictions" / f"{split}.parquet"
    if not pred_path.exists():
        raise FileNotFoundError(f"no predictions for split {split!r}: {pred_path} does not exist")
    preds = pd.read_parquet(pred_path)
    try:
        table = auc_table(preds, n_boot=n_boot, seed=seed, ci=ci)
    except ValueError as exc:
        raise ValueError(f"{pred_path}: {exc}") from exc
    method = read_run_info(run_dir).get("method") or run_dir.name
    result = {"method": method, "split": split, **table}
    out = metrics_path(run_dir, split)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return result
