"""fp32 / bf16 parity of one registered model, measured on its market's valid rows at registration.

Why measured, not assumed: bf16 keeps 8 significant bits, and whether that moves a market's ranking
depends on the model and the data (close pairs, a head trained on few directions). ``register`` scores
the valid rows in both precisions with the very model it packages and records the agreement in the
model's config (``bf16_parity``, read by ``RelevanceModel.resolve_precision``) and as version tags
(``bf16_parity_*``). ``auto`` scoring then uses bf16 only where ``ok``: |AUC(bf16) − AUC(fp32)| ≤
:data:`MAX_AUC_DELTA` and score correlation ≥ :data:`MIN_CORR` (a fixed threshold on the scores keeps
its meaning) on at least :data:`MIN_ROWS` rows holding both labels. No valid rows, or one
class only, leaves ``ok`` false with the reason: such a version scores in fp32.

AUC moves in steps of 1/(positives × negatives): on a small valid split the bar is finer than the
measurement (60 rows of 20 positives and 40 negatives: one pair of rows swapping order moves AUC by
0.00125). So the AUC bar is ``max(MAX_AUC_DELTA, 1/(P·N))`` (``auc_tolerance`` in the record): bf16
may swap at most one positive–negative pair there, never more. Measured: trained e5-small markets of
the quality benchmark failed 0.001 with exactly 0.00125 on their 60 valid rows, and moved test AUC
by 0.0001 and 0.0003 on 216 rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MAX_AUC_DELTA = 0.001  # the scoring benchmark's bar: |ΔAUC| ≤ 0.001
MIN_CORR = 0.999  # and the scores themselves agree (a threshold on them means the same)
MIN_ROWS = 20
MAX_ROWS = 4096  # a bound on registration time; whole queries are kept (first ones by query_id)


def parity_rows(data: str | Path | None, market: str, max_rows: int = MAX_ROWS) -> pd.DataFrame | None:
    """The market's valid rows of curated ``data`` (whole queries, at most ~``max_rows``); None if unreadable."""
    from relevance.data.curated import read_split

    if data is None or not Path(data).exists():
        return None
    try:
        rows = read_split(data, "valid", [market])
    except (ValueError, FileNotFoundError, OSError):
        return None
    if len(rows) > max_rows and "query_id" in rows.columns:
        keep = rows["query_id"].drop_duplicates().sort_values()
        sizes = rows.groupby("query_id").size().reindex(keep).cumsum()
        rows = rows[rows["query_id"].isin(sizes[sizes <= max_rows].index)]
    return rows.reset_index(drop=True)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def auc_tolerance(labels: np.ndarray) -> float:
    """The AUC bar for ``labels``: :data:`MAX_AUC_DELTA`, or one swapped pair where AUC is coarser (module doc)."""
    positives = int(np.sum(labels == 1))
    pairs = positives * (len(labels) - positives)
    return max(MAX_AUC_DELTA, 1.0 / pairs) if pairs else MAX_AUC_DELTA


def compare(labels: np.ndarray, fp32: np.ndarray, bf16: np.ndarray) -> dict[str, Any]:
    """Agreement of two score vectors of the same rows: AUCs, their difference, correlation, max |diff|, ok."""
    labels = np.asarray(labels).astype(int)
    out: dict[str, Any] = {"n": int(len(labels)), "auc_fp32": None, "auc_bf16": None, "auc_delta": None,
                           "corr": None, "max_abs_diff": None, "ok": False, "reason": None}
    if len(labels) < MIN_ROWS:
        out["reason"] = f"{len(labels)} valid rows, fewer than {MIN_ROWS}"
        return out
    out["max_abs_diff"] = round(float(np.max(np.abs(fp32 - bf16))), 6)
    if np.std(fp32) > 0 and np.std(bf16) > 0:
        out["corr"] = round(float(np.corrcoef(fp32, bf16)[0, 1]), 6)
    if len(set(labels.tolist())) < 2:
        out["reason"] = "valid rows hold one label only: AUC undefined"
        return out
    a32, a16 = _auc(labels, fp32), _auc(labels, bf16)
    tolerance = auc_tolerance(labels)
    out.update(auc_fp32=round(a32, 6), auc_bf16=round(a16, 6), auc_delta=round(a16 - a32, 6),
               auc_tolerance=round(tolerance, 6))
    # 1e-9: the AUCs are sums of pair counts divided in floating point; one swapped pair must compare equal.
    reasons = [f"|AUC delta| {abs(a16 - a32):.5f} > {tolerance:.5f}"] if abs(a16 - a32) > tolerance + 1e-9 else []
    if out["corr"] is None or out["corr"] < MIN_CORR:
        reasons.append(f"score correlation {out['corr']} < {MIN_CORR}")
    out["ok"] = not reasons
    out["reason"] = "; ".join(reasons) or None
    return out


def measure(model: Any, rows: pd.DataFrame | None, batch_size: int = 64) -> dict[str, Any]:
    """Parity of a ``RelevanceModel`` on ``rows`` (labelled valid rows), scored in fp32 and bf16.

    On a CPU bf16 first runs the engine's own attention (``pyfunc_model.cpu_bf16_attention``, faster); where
    its parity fails, sdpa's flash kernel is measured too and, if that holds, recorded instead
    (``cpu_attention``: which one the version's bf16 copy runs). Why both: on 60 valid rows the bar is one
    swapped pair, and which near-tied pairs a kernel swaps is chance (a trained e5 market swapped two with
    one kernel and one with the other, at a higher score correlation for the first). ``auto`` thus serves the
    faster kernel where it holds and never fares worse than sdpa alone did.
    """
    if rows is None or len(rows) == 0:
        return {"n": 0, "ok": False, "reason": "no valid rows of this market to measure on"}
    labels = rows["label"].to_numpy()
    fp32 = model.score_frame(rows, batch_size=batch_size, precision="fp32")
    device = getattr(getattr(model, "model", None), "device", None)
    cpu = bool(getattr(model, "cpu_attention", False)) and getattr(device, "type", None) == "cpu"
    result = {**compare(labels, fp32, model.score_frame(rows, batch_size=batch_size, precision="bf16")),
              "cpu_attention": cpu}
    if cpu and not result["ok"]:
        model.set_cpu_attention(False)
        sdpa = compare(labels, fp32, model.score_frame(rows, batch_size=batch_size, precision="bf16"))
        if sdpa["ok"]:
            return {**sdpa, "cpu_attention": False, "cpu_attention_reason": result["reason"]}
        model.set_cpu_attention(True)
    return result


def parity_tags(parity: dict[str, Any]) -> dict[str, str]:
    """Version tags of a parity record (``none`` for what was not measured)."""
    keys = ("n", "auc_fp32", "auc_bf16", "auc_delta", "auc_tolerance", "corr", "max_abs_diff", "cpu_attention")
    def text(value: Any) -> str:
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    tags = {f"bf16_parity_{k}": text(parity.get(k)) for k in keys}
    tags["bf16_ok"] = str(bool(parity.get("ok"))).lower()
    if parity.get("reason"):
        tags["bf16_parity_reason"] = str(parity["reason"])[:250]
    return tags


def measure_merged(merged_dir: Path, market: str, run: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parity of a run's merged model (a transformers directory) on the market's valid rows of the run's data,
    and whether its tokenizer may load as a plain fast tokenizer (:mod:`relevance.serving.tokenizer_check`),
    checked on the same rows with the tokenizer the model loaded: (parity, tokenizer check)."""
    from types import SimpleNamespace

    from relevance.serving.packaging import model_config
    from relevance.serving.pyfunc_model import RelevanceModel
    from relevance.serving.tokenizer_check import check_generic_tokenizer

    model = RelevanceModel()
    model.load_context(SimpleNamespace(model_config=model_config(market, run), artifacts={"model": str(merged_dir)}))
    rows = parity_rows(run.train_config.get("data"), market)
    result = measure(model, rows)
    if not result["ok"]:
        report_failed(market, run.path, result)
    tokenizer = check_generic_tokenizer(merged_dir, model.tokenizer, rows, market, model.market_token, model.max_length)
    return result, tokenizer


def report_failed(market: str, where: Any, result: dict[str, Any]) -> None:
    """Log a failed parity: a warning where ``auto`` would otherwise score in bf16, a note where it never would.

    Without native bf16 (no AMX or AMD AVX512-BF16, no CUDA) ``auto`` scores in fp32 whatever the parity, so a failed
    parity changes nothing here; the tag still matters on the machines that serve the version.
    """
    import logging

    from relevance.model.precision import native_bf16

    log = logging.getLogger(__name__)
    if native_bf16("cpu"):
        log.warning("market %s of %s scores in fp32 under precision auto: bf16 parity %s",
                    market, where, result.get("reason"))
    else:
        log.info("market %s of %s: bf16 parity %s (recorded; auto scores in fp32 here anyway: no native bf16)",
                 market, where, result.get("reason"))
