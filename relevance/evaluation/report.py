"""Per-market AUC report over several training runs: ``report.md``, ``report.html``, ``auc_by_market.png``.

The report answers one question per market: is a method better than shared LoRA, and how sure
are we? So next to each method's AUC and interval it shows the *paired* difference to the
baseline (same examples, same resampled query clusters), marked only when that interval excludes
0, with Holm's decision across the markets and how many markets chance alone would mark: with many
markets, some intervals exclude 0 by luck.
The HTML embeds the chart as base64 and carries its own CSS, so it can be mailed or attached to
an MLflow run and still render with no network. Markdown and HTML are rendered from the same
section list, so they cannot disagree.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from relevance.evaluation.degenerate import SPREAD_FLOOR, degenerate_markets
from relevance.evaluation.metrics import evaluate_run, metrics_path, paired_comparison, read_run_info
from relevance.evaluation.report_render import DEGENERATE, SIGNIFICANT, UNDEFINED, Section, Table, fmt_interval
from relevance.evaluation.report_render import md_table, render_html, render_md

__all__ = ["DEGENERATE", "SIGNIFICANT", "UNDEFINED", "build_report", "format_auc_table"]

_METRIC_KEYS = {"auc": ("auc", "ci_low", "ci_high"), "pr_auc": ("pr_auc", "pr_ci_low", "pr_ci_high")}
_CLUSTER_TEXT = {"query_id": "query_id clusters", "row": "rows (predictions without query_id)"}


def _auc_rows(metrics_by_method: Mapping[str, Mapping[str, Any]], markets: Sequence[str] | None,
              metric: str) -> Table:
    keys = _METRIC_KEYS[metric]
    if markets is None:
        markets = sorted({m for met in metrics_by_method.values() for m in met["markets"]})
    header = ["market", "n (pos)", *metrics_by_method]
    rows = []
    for market in markets:
        entries = [met["markets"].get(market) for met in metrics_by_method.values()]
        first = next((e for e in entries if e is not None), None)
        count = f"{first['n']} ({first['n_pos']})" if first else ""
        cells = ["—" if e is None else fmt_interval(*(e[k] for k in keys))
                 + (f" {DEGENERATE}" if metric == "auc" and e.get("degenerate") else "") for e in entries]
        rows.append([market, count, *cells])
    for agg in ("macro", "micro"):
        cells = []
        for met in metrics_by_method.values():
            e = met.get(agg) or {}
            if keys[0] not in e:  # macro PR-AUC is not computed
                cells.append("n/a")
            elif e[keys[0]] is None:
                cells.append("n/a (no market has both classes)")
            else:
                cells.append(fmt_interval(*(e[k] for k in keys)))
        rows.append([f"**{agg}**", "", *cells])
    return header, rows


def format_auc_table(metrics_by_method: Mapping[str, Mapping[str, Any]],
                     markets: Sequence[str] | None = None, metric: str = "auc") -> str:
    """Markdown table: markets (then macro, micro) × methods, each cell ``AUC [low, high]``.

    ``metrics_by_method`` maps a method label to an :func:`relevance.evaluation.metrics.auc_table` result (or
    a ``metrics.json``). Used in ``report.md`` and for printing at the command line. ``metric`` is
    ``"auc"`` (ROC) or ``"pr_auc"`` (average precision; macro is not computed for it).
    """
    if metric not in _METRIC_KEYS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(_METRIC_KEYS)}")
    return md_table(_auc_rows(metrics_by_method, markets, metric))


def _delta_rows(deltas: Mapping[str, Mapping[str, Any]], markets: Sequence[str], baseline: str) -> Table:
    """Per market (then macro): each comparison's paired difference, and its Holm decision."""
    header = ["market"]
    for label in deltas:
        header += [f"{label} − {baseline}", f"Holm ({label})"]
    rows = []
    for market in [*markets, "macro"]:
        cells = []
        for res in deltas.values():
            e = res["macro"] if market == "macro" else res["markets"].get(market)
            if e is None:
                cells += ["—", "—"]
                continue
            cell = fmt_interval(e["diff"], e["ci_low"], e["ci_high"], signed=True)
            cells.append(f"{cell} {SIGNIFICANT}" if e["significant"] else cell)
            holm = market != "macro" and e["diff"] is not None  # macro is not one of the family
            cells.append(("yes" if e["holm_significant"] else "no") if holm else "—")
        rows.append(["**macro**" if market == "macro" else market, *cells])
    return header, rows


def _num(x: float) -> str:
    return f"{round(x, 2):g}"


def _multiplicity_note(label: str, res: Mapping[str, Any]) -> str:
    """How many markets look better or worse, against how many chance alone would mark."""
    ci, k = float(res["ci"]), int(res["n_compared"])
    return (f"`{label}`: Per market at {ci:.0%}: {res['n_significant']} of {k} markets' intervals exclude 0; "
            f"by chance alone one would expect about {_num(res['expected_false_positives'])} "
            f"({_num(1 - ci)} × {k}); after Holm's correction {res['n_holm_significant']} remain significant.")


def degenerate_sections(metrics: Mapping[str, Mapping[str, Any]], dirs: Mapping[str, Path],
                        infos: Mapping[str, Mapping[str, Any]]) -> list[Section]:
    """"Degenerate markets": run, market, split and reasons; nothing when no market is degenerate.

    Test flags come from the metrics the AUC table shows; valid flags from ``metrics_valid.json``
    when the run was evaluated on valid, else from what training recorded in ``run_info.json``.
    """
    rows = []
    for label, met in metrics.items():
        valid_path = metrics_path(dirs[label], "valid")
        valid = (degenerate_markets(json.loads(valid_path.read_text())) if valid_path.exists()
                 else dict((infos[label].get("degenerate") or {}).get("valid") or {}))
        for split, flagged in (("valid", valid), ("test", degenerate_markets(met))):
            rows += [[label, market, split, "; ".join(reasons)] for market, reasons in sorted(flagged.items())]
    if not rows:
        return []
    note = (f"{DEGENERATE}: these predictions carry no usable ranking signal: their scores are near-constant "
            f"(standard deviation < {SPREAD_FLOOR}) or their AUC's 95% interval contains 0.5. A good macro AUC "
            "can hide such a market. Model selection never ships a model whose valid predictions are degenerate.")
    return [("h", "## Degenerate markets"), ("p", note), ("table", (["run", "market", "split", "reasons"], rows))]


def rollback_sections(infos: Mapping[str, Mapping[str, Any]]) -> list[Section]:
    """"Training rollbacks": each time a run's divergence guard (``relevance.training.divergence``) sent it
    back to its best weights; nothing when no run rolled back."""
    rows = [[label, str(r["step"]), str(r["to_step"]), ", ".join(r["markets"]),
             "their own adapters" if r.get("scope") == "markets" else "whole model", f"{r['lr_scale']:g}×"]
            for label, info in infos.items() for r in info.get("rollbacks") or []]
    if not rows:
        return []
    note = ("These runs collapsed during training: markets whose valid scores had spread scored every row alike. "
            "Each went back to its best evaluation's weights with fresh AdamW moments and trained on: the whole "
            "model at a lower learning rate, or, where the collapsed markets have adapters of their own and the "
            "others did not collapse, only those adapters. The AUCs above are of the weights it shipped.")
    return [("h", "## Training rollbacks"), ("p", note),
            ("table", (["run", "collapsed at step", "back to step", "markets", "went back", "learning rate"], rows))]


def _efficiency_rows(infos: Mapping[str, Mapping[str, Any]]) -> Table:
    def num(v: Any, f: str) -> str:
        return f.format(v) if isinstance(v, (int, float)) else "n/a"
    rows = [[label, str(i.get("method", "n/a")), num(i.get("trainable_params"), "{:,}"),
             num(i.get("train_time_s"), "{:.1f}"), num(i.get("examples_per_s"), "{:.1f}")]
            for label, i in infos.items()]
    return ["run", "method", "trainable params", "train time (s)", "examples/s"], rows


def _plot(metrics_by_method: Mapping[str, Mapping[str, Any]], markets: Sequence[str], path: Path) -> bytes:
    """Grouped bars per market (and macro) and method, with interval whiskers; returns PNG bytes.

    The Agg canvas is bound to this figure only: no pyplot, no global backend switch, so calling
    this from a server thread or a notebook changes nothing else.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*markets, "macro"]
    labels = list(metrics_by_method)
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(labels)) / 2 + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(labels))
    lows: list[float] = []
    missing: list[float] = []
    labelled: set[str] = set()
    for j, label in enumerate(labels):
        met = metrics_by_method[label]
        for i, g in enumerate(groups):
            e = met["macro"] if g == "macro" else met["markets"].get(g)
            x = i - 0.4 + width * (j + 0.5)
            if e is None or e.get("auc") is None:
                missing.append(x)
                continue
            err = [[e["auc"] - e["ci_low"]], [e["ci_high"] - e["auc"]]]
            ax.bar(x, e["auc"], width, yerr=err, capsize=3, color=f"C{j}",
                   label=None if label in labelled else label)
            labelled.add(label)
            lows.append(e["ci_low"])
    ax.set_xticks(range(len(groups)), groups)
    bottom = max(0.0, min(lows, default=0.5) - 0.05)
    ax.set_ylim(bottom, 1.02)
    for x in missing:  # placed after the limits are known, so the label sits inside the axes
        ax.text(x, bottom + 0.01, "n/a", ha="center", va="bottom", rotation=90, fontsize=8)
    ax.set_ylabel("ROC-AUC (95% bootstrap interval)")
    ax.set_title("Test ROC-AUC by market and method")
    if labelled:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(4, len(labelled)),
                  fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _run_labels(infos: Sequence[tuple[Path, dict[str, Any], str]]) -> list[str]:
    """The method name, or ``method (run_name)`` when two runs share a method."""
    counts = Counter(method for _, _, method in infos)
    return [method if counts[method] == 1 else f"{method} ({info.get('run_name') or d.name})"
            for d, info, method in infos]


def build_report(run_dirs: Sequence[Path | str], out_dir: Path | str, baseline_method: str = "lora",
                 n_boot: int = 1000, seed: int = 0,
                 choices: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``auc_by_market.png`` for ``run_dirs`` into ``out_dir``.

    ``choices`` (the per-market decisions of :mod:`relevance.serving.market_models`, plain dicts) adds
    the "Model per market" section: what each market ships, its valid and test AUC, and why.

    A run without ``metrics.json`` is evaluated first (:func:`relevance.evaluation.metrics.evaluate_run`).
    Deltas vs ``baseline_method`` use the runs' test predictions; when no run has that method, or
    a run's predictions are missing or cover other examples, its deltas are omitted with a note.
    Returns the paths written, the per-run metrics and deltas, which markets are significant (per
    interval, and after Holm), and the notes.
    """
    if not run_dirs:
        raise ValueError("no run directories given to build a report from")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"run directory {d} does not exist")
        info = read_run_info(d)
        loaded.append((d, info, str(info.get("method") or d.name)))
    labels = _run_labels(loaded)
    metrics, infos, dirs, notes = {}, {}, {}, []
    for label, (d, info, _) in zip(labels, loaded):
        path = metrics_path(d)
        metrics[label] = (json.loads(path.read_text()) if path.exists()
                          else evaluate_run(d, n_boot=n_boot, seed=seed))
        infos[label], dirs[label] = info, d
    markets = sorted({m for met in metrics.values() for m in met["markets"]})
    base = next((lbl for lbl, (_, _, method) in zip(labels, loaded) if method == baseline_method), None)
    deltas: dict[str, Any] = {}
    if base is None:
        notes.append(f"No run has the baseline method `{baseline_method}`: deltas are omitted "
                     f"(methods present: {', '.join(sorted({m for _, _, m in loaded}))}).")
    else:
        base_preds = _read_preds(dirs[base])
        for label in labels:
            if label == base:
                continue
            preds = _read_preds(dirs[label])
            if base_preds is None or preds is None:
                notes.append(f"Delta for `{label}` omitted: test predictions missing.")
                continue
            try:
                deltas[label] = paired_comparison(base_preds, preds, n_boot=n_boot, seed=seed)
            except ValueError as exc:
                notes.append(f"Delta for `{label}` omitted: {exc}.")
    boots = sorted({int(m.get("n_boot", 0)) for m in metrics.values()})
    kinds = sorted({str(m.get("cluster", "row")) for m in metrics.values()})  # "row" for older metrics.json
    clusters = " / ".join(_CLUSTER_TEXT.get(k, k) for k in kinds)
    sections: list[Section] = [
        ("h", "# Per-market AUC report"),
        ("p", "Runs: " + "; ".join(f"`{lbl}` ({dirs[lbl]})" for lbl in labels) + ". Split: test. "
              f"Intervals: 95% bootstrap over {clusters}, stratified by class composition "
              f"({', '.join(map(str, boots))} resamples)."),
        ("h", "## ROC-AUC by market"), ("table", _auc_rows(metrics, markets, "auc")),
        ("img", "auc_by_market.png"),
        *degenerate_sections(metrics, dirs, infos),
        *rollback_sections(infos),
    ]
    if base is not None and deltas:
        sections += [("h", f"## Δ ROC-AUC vs `{base}` (paired bootstrap, {n_boot} resamples)"),
                     ("p", "Same examples and the same resampled query clusters for both runs. A ✱ marks a "
                           "difference whose 95% interval excludes 0; Holm: still significant after Holm's "
                           "step-down correction across the markets of that comparison."),
                     ("table", _delta_rows(deltas, markets, base)),
                     *(("p", _multiplicity_note(lbl, r)) for lbl, r in deltas.items())]
    if choices:
        sections += model_per_market_sections(choices)
    sections += [("h", "## PR-AUC (average precision) by market"),
                 ("table", _auc_rows(metrics, markets, "pr_auc")),
                 ("h", "## Cost"), ("table", _efficiency_rows(infos))]
    if notes:
        sections += [("h", "## Notes"), *(("p", n) for n in notes)]
    md_path, html_path, png_path = out_dir / "report.md", out_dir / "report.html", out_dir / "auc_by_market.png"
    png = _plot(metrics, markets, png_path)
    md_path.write_text(render_md(sections), encoding="utf-8")
    html_path.write_text(render_html(sections, png), encoding="utf-8")
    significant = {lbl: [k for k, e in [*r["markets"].items(), ("macro", r["macro"])] if e["significant"]]
                   for lbl, r in deltas.items()}
    holm = {lbl: [k for k, e in r["markets"].items() if e["holm_significant"]] for lbl, r in deltas.items()}
    return {"report_md": str(md_path), "report_html": str(html_path), "png": str(png_path),
            "baseline": base, "methods": labels, "markets": markets, "metrics": metrics,
            "deltas": deltas, "significant": significant, "holm_significant": holm, "notes": notes}


def _read_preds(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "predictions" / "test.parquet"
    return pd.read_parquet(path) if path.exists() else None


def _auc_cell(entry: Mapping[str, Any] | None, split: str) -> str:
    cell = (entry or {}).get(split) or {}
    return fmt_interval(cell.get("auc"), cell.get("ci_low"), cell.get("ci_high"))


def model_per_market_sections(choices: Sequence[Mapping[str, Any]]) -> list[Section]:
    """What each market ships: the chosen method on valid, its valid and test AUC, and the reasons."""
    rows, ordered = [], sorted(choices, key=lambda d: str(d["market"]))
    for d in ordered:
        cand = (d.get("auc") or {}).get("candidate")
        chosen = f"{d.get('candidate_method')} (v{d['candidate_version']})" if d.get("candidate_version") else "—"
        champion = f"v{d['champion_after']}" if d.get("champion_after") else "**none: not served**"
        rows.append([str(d["market"]), chosen, str(d.get("decision")), champion, _auc_cell(cand, "valid"),
                     _auc_cell(cand, "test"), " ".join(str(r) for r in d.get("reasons", []))])
    dark = [str(d["market"]) for d in ordered if not d.get("champion_after")]
    note = ("Each market's model is chosen on the valid split: the method with the best valid AUC, unless its "
            "edge over the simpler choice (the current champion, else shared LoRA) is inside the paired 95% "
            "interval; a model at or below the sanity floor is never shipped. Valid and test AUC are measured "
            "by the registered (merged) models; test AUC is reported here and never used to choose.")
    out: list[Section] = [("h", "## Model per market"), ("p", note)]
    if dark:
        out.append(("p", f"⚠ No model serves: {', '.join(dark)}. Their rows are quarantined at scoring time."))
    header = ["market", "chosen", "decision", "champion", "valid AUC [95% CI]", "test AUC [95% CI]", "why"]
    return out + [("table", (header, rows))]
