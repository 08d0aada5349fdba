"""Per-market ROC-AUC / PR-AUC with stratified bootstrap intervals, and paired run comparisons.

Why a bootstrap: markets are small and unequal, so a point AUC alone cannot say whether MTL-LoRA
really beats shared LoRA on a market. Why *stratified*: resampling positives and negatives
separately keeps every resample's class counts equal to the market's, so every resample has a
defined AUC (no silently dropped draws that would bias the interval).

Why histograms: both AUCs only depend on how many resampled positives / negatives sit at each
distinct score. One ``bincount`` turns a (resamples × rows) index matrix into (resamples × distinct
scores) counts, and Mann–Whitney AUC and average precision are then cumulative sums over that
matrix: all resamples at once, ties handled exactly as scikit-learn does (half credit for ROC,
threshold-per-distinct-score for PR). Resamples are processed in chunks only to bound memory.

Resamples are drawn from a generator seeded by ``(seed, crc32(market))``: a market's interval
does not change when another market is added, and two runs evaluated with the same seed see the
same resample indices, which is what makes :func:`paired_comparison` paired.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("example_id", "market", "label", "score")
_CHUNK_ELEMENTS = 4_000_000  # bound on resamples × rows held at once (~32 MB of int64)
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


def _split(frame: pd.DataFrame, score_col: str = "score") -> tuple[np.ndarray, np.ndarray]:
    """(positive scores, negative scores) of a frame, in row order."""
    y = frame["label"].to_numpy().astype(int)
    s = frame[score_col].to_numpy(dtype=float)
    return s[y == 1], s[y == 0]


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def _resample_chunks(
    n_pos: int, n_neg: int, n_boot: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (pos index matrix, neg index matrix) chunks, ``n_boot`` resample rows in total.

    Exposed (privately) so tests can replay exactly the same draws in a slow reference loop.
    """
    size = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n_pos, n_neg, 1)))
    done = 0
    while done < n_boot:
        c = min(size, n_boot - done)
        yield rng.integers(0, n_pos, size=(c, n_pos)), rng.integers(0, n_neg, size=(c, n_neg))
        done += c


def _hist(codes: np.ndarray, width: int) -> np.ndarray:
    """Row-wise counts of a (c × k) matrix of codes in [0, width): a (c × width) matrix."""
    c = codes.shape[0]
    flat = (np.arange(c)[:, None] * width + codes).ravel()
    return np.bincount(flat, minlength=c * width).reshape(c, width)


def _stats(hp: np.ndarray, hn: np.ndarray, want_ap: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """ROC-AUC and average precision per row of positive / negative counts over ascending scores."""
    n_pos = hp[0].sum()
    n_neg = hn[0].sum()
    below = np.cumsum(hn, axis=1) - hn
    auc = (hp * (below + 0.5 * hn)).sum(axis=1) / (n_pos * n_neg)
    if not want_ap:
        return auc, None
    hp_desc = hp[:, ::-1]
    tp = np.cumsum(hp_desc, axis=1)
    predicted = tp + np.cumsum(hn[:, ::-1], axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(tp.shape), where=predicted > 0)
    return auc, (hp_desc * precision).sum(axis=1) / n_pos


def _codes(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Map scores to indices of the sorted distinct scores (ties share an index)."""
    uniq, inv = np.unique(np.concatenate([pos, neg]), return_inverse=True)
    return inv[: len(pos)], inv[len(pos):], len(uniq)


def _point(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    cp, cn, width = _codes(pos, neg)
    auc, ap = _stats(_hist(cp[None, :], width), _hist(cn[None, :], width))
    return float(auc[0]), float(ap[0])  # type: ignore[index]


def _bootstrap(
    sets: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int, rng: np.random.Generator,
    want_ap: bool = True,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Bootstrap AUC (and AP) for score sets sharing class counts, all using the same resamples."""
    n_pos, n_neg = len(sets[0][0]), len(sets[0][1])
    coded = [_codes(p, n) for p, n in sets]
    parts: list[list[tuple[np.ndarray, np.ndarray | None]]] = [[] for _ in sets]
    for pi, ni in _resample_chunks(n_pos, n_neg, n_boot, rng):
        for k, (cp, cn, width) in enumerate(coded):
            parts[k].append(_stats(_hist(cp[pi], width), _hist(cn[ni], width), want_ap))
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for chunks in parts:
        auc = np.concatenate([a for a, _ in chunks])
        ap = np.concatenate([p for _, p in chunks]) if want_ap else None  # type: ignore[misc]
        out.append((auc, ap))
    return out


def _interval(boot: np.ndarray, ci: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def _one_class_status(n_pos: int, n_neg: int) -> str:
    return "undefined: only positives" if n_neg == 0 else "undefined: only negatives"


def _auc_entry(pos: np.ndarray, neg: np.ndarray, n_boot: int, rng: np.random.Generator,
               ci: float) -> tuple[dict[str, Any], np.ndarray | None]:
    """One market's (or the pooled rows') entry, plus its ROC-AUC bootstrap for the macro mean."""
    n_pos, n_neg = len(pos), len(neg)
    entry: dict[str, Any] = {"n": n_pos + n_neg, "n_pos": n_pos, "n_neg": n_neg}
    if n_pos == 0 or n_neg == 0:
        nones = dict.fromkeys(("auc", "ci_low", "ci_high", "pr_auc", "pr_ci_low", "pr_ci_high"))
        return {**nones, **entry, "status": _one_class_status(n_pos, n_neg)}, None
    auc, ap = _point(pos, neg)
    [(boot_auc, boot_ap)] = _bootstrap([(pos, neg)], n_boot, rng)
    lo, hi = _interval(boot_auc, ci)
    plo, phi = _interval(boot_ap, ci)  # type: ignore[arg-type]
    return {"auc": auc, "ci_low": lo, "ci_high": hi, "pr_auc": ap, "pr_ci_low": plo,
            "pr_ci_high": phi, **entry, "status": "ok"}, boot_auc


def auc_table(preds: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Per-market ROC-AUC and PR-AUC with stratified bootstrap intervals, plus macro and micro.

    A one-class market gets ``None`` values and an ``"undefined: …"`` status, and is left out of
    macro and micro (listed under ``excluded``) so a mean is never NaN. The macro interval is the
    quantile of the per-resample mean over markets, reusing each market's resamples.
    """
    _validate(preds)
    _check_params(n_boot, ci)
    markets: dict[str, Any] = {}
    boots: dict[str, np.ndarray] = {}
    for market, frame in sorted(preds.groupby("market", sort=True), key=lambda kv: str(kv[0])):
        pos, neg = _split(frame)
        entry, boot = _auc_entry(pos, neg, n_boot, _rng(seed, str(market)), ci)
        markets[str(market)] = entry
        if boot is not None:
            boots[str(market)] = boot
    defined = list(boots)
    excluded = [m for m in markets if m not in boots]
    macro: dict[str, Any] = {"markets": defined, "excluded": excluded}
    if defined:
        lo, hi = _interval(np.mean([boots[m] for m in defined], axis=0), ci)
        macro.update(auc=float(np.mean([markets[m]["auc"] for m in defined])), ci_low=lo,
                     ci_high=hi, status="ok")
    else:
        macro.update(auc=None, ci_low=None, ci_high=None, status="undefined: no market has both classes")
    pooled = preds[preds["market"].astype(str).isin(defined)]
    micro, _ = _auc_entry(*_split(pooled), n_boot, _rng(seed, _MICRO_KEY), ci)
    if not defined:
        micro["status"] = "undefined: no market has both classes"
    micro.update(markets=defined, excluded=excluded)
    return {"markets": markets, "macro": macro, "micro": micro, "n_boot": int(n_boot),
            "seed": int(seed), "ci": float(ci)}


def _check_unique(preds: pd.DataFrame, name: str) -> None:
    dup = preds["example_id"].duplicated()
    if dup.any():
        raise ValueError(f"{name} have {int(dup.sum())} duplicated example_id(s), "
                         f"e.g. {preds.loc[dup, 'example_id'].iloc[0]!r}")


def paired_comparison(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                      ci: float = 0.95) -> dict[str, Any]:
    """Per-market ROC-AUC difference ``b − a`` with a paired stratified bootstrap interval.

    Both models are scored on the *same* resample indices, so shared example difficulty cancels
    and the interval is far narrower than comparing two independent intervals. ``significant``
    means the interval excludes 0.
    """
    for frame, name in ((a, "predictions a"), (b, "predictions b")):
        _validate(frame, name)
        _check_unique(frame, name)
    _check_params(n_boot, ci)
    ids_a, ids_b = set(a["example_id"]), set(b["example_id"])
    only_a, only_b = ids_a - ids_b, ids_b - ids_a
    if only_a or only_b:
        sample = sorted(map(str, only_a | only_b))[:3]
        raise ValueError(f"example sets differ: {len(only_a)} example_id(s) only in a, "
                         f"{len(only_b)} only in b (e.g. {sample}); compare runs on the same split")
    m = a[list(REQUIRED_COLUMNS)].merge(b[list(REQUIRED_COLUMNS)], on="example_id", suffixes=("_a", "_b"))
    for col in ("market", "label"):
        differ = m[f"{col}_a"].astype(str) != m[f"{col}_b"].astype(str)
        if differ.any():
            raise ValueError(f"{int(differ.sum())} example(s) have a different {col} in a and b, "
                             f"e.g. example_id {m.loc[differ, 'example_id'].iloc[0]!r}")
    m = m.rename(columns={"market_a": "market", "label_a": "label"})
    markets: dict[str, Any] = {}
    diffs: dict[str, np.ndarray] = {}
    for market, frame in sorted(m.groupby("market", sort=True), key=lambda kv: str(kv[0])):
        pa, na = _split(frame, "score_a")
        pb, nb = _split(frame, "score_b")
        entry: dict[str, Any] = {"n": len(frame), "n_pos": len(pa), "n_neg": len(na)}
        if len(pa) == 0 or len(na) == 0:
            nones = dict.fromkeys(("auc_a", "auc_b", "diff", "ci_low", "ci_high", "p_value"))
            markets[str(market)] = {**nones, "significant": False, **entry,
                                    "status": _one_class_status(len(pa), len(na))}
            continue
        (ba, _), (bb, _) = _bootstrap([(pa, na), (pb, nb)], n_boot, _rng(seed, str(market)), False)
        d = bb - ba
        diffs[str(market)] = d
        auc_a, auc_b = _point(pa, na)[0], _point(pb, nb)[0]
        markets[str(market)] = {"auc_a": auc_a, "auc_b": auc_b, **_diff_summary(auc_b - auc_a, d, ci),
                                **entry, "status": "ok"}
    defined = list(diffs)
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
    return {"markets": markets, "macro": macro, "n_boot": int(n_boot), "seed": int(seed), "ci": float(ci)}


def _diff_summary(point: float, boot: np.ndarray, ci: float) -> dict[str, Any]:
    """Point difference, percentile interval, two-sided bootstrap p-value, significance."""
    lo, hi = _interval(boot, ci)
    p = min(1.0, 2.0 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    return {"diff": float(point), "ci_low": lo, "ci_high": hi, "p_value": p,
            "significant": bool(lo > 0 or hi < 0)}


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
