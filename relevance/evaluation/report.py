"""Per-market AUC report over several training runs: ``report.md``, ``report.html``, ``auc_by_market.png``.

The report answers one question per market: is a method better than shared LoRA, and how sure
are we? So next to each method's AUC and interval it shows the *paired* difference to the
baseline (same examples, same bootstrap resamples), marked only when that interval excludes 0.
The HTML embeds the chart as base64 and carries its own CSS, so it can be mailed or attached to
an MLflow run and still render with no network. Markdown and HTML are rendered from the same
section list, so they cannot disagree.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from relevance.evaluation.metrics import evaluate_run, metrics_path, paired_comparison, read_run_info

SIGNIFICANT = "✱ significant"
UNDEFINED = "n/a (one class)"
_METRIC_KEYS = {"auc": ("auc", "ci_low", "ci_high"), "pr_auc": ("pr_auc", "pr_ci_low", "pr_ci_high")}
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}.sig{color:#b00;font-weight:600}
img{max-width:100%}"""

Table = tuple[list[str], list[list[str]]]


def _fmt_interval(point: float | None, lo: float | None, hi: float | None, signed: bool = False) -> str:
    if point is None:
        return UNDEFINED
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(point)} [{f.format(lo)}, {f.format(hi)}]"


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
        cells = ["—" if e is None else _fmt_interval(*(e[k] for k in keys)) for e in entries]
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
                cells.append(_fmt_interval(*(e[k] for k in keys)))
        rows.append([f"**{agg}**", "", *cells])
    return header, rows


def _md(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_auc_table(metrics_by_method: Mapping[str, Mapping[str, Any]],
                     markets: Sequence[str] | None = None, metric: str = "auc") -> str:
    """Markdown table: markets (then macro, micro) × methods, each cell ``AUC [low, high]``.

    ``metrics_by_method`` maps a method label to an :func:`relevance.evaluation.metrics.auc_table` result (or
    a ``metrics.json``). Used in ``report.md`` and for printing at the command line. ``metric`` is
    ``"auc"`` (ROC) or ``"pr_auc"`` (average precision; macro is not computed for it).
    """
    if metric not in _METRIC_KEYS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(_METRIC_KEYS)}")
    return _md(_auc_rows(metrics_by_method, markets, metric))


def _delta_rows(deltas: Mapping[str, Mapping[str, Any]], markets: Sequence[str], baseline: str) -> Table:
    header = ["market", *(f"{label} − {baseline}" for label in deltas)]
    rows = []
    for market in [*markets, "macro"]:
        cells = []
        for res in deltas.values():
            e = res["macro"] if market == "macro" else res["markets"].get(market)
            if e is None:
                cells.append("—")
                continue
            cell = _fmt_interval(e["diff"], e["ci_low"], e["ci_high"], signed=True)
            cells.append(f"{cell} {SIGNIFICANT}" if e["significant"] else cell)
        rows.append(["**macro**" if market == "macro" else market, *cells])
    return header, rows


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


def _render_md(sections: list[tuple[str, Any]]) -> str:
    out = []
    for kind, payload in sections:
        if kind in ("h", "p"):
            out.append(f"{payload}\n")
        elif kind == "table":
            out.append(_md(payload) + "\n")
        elif kind == "img":
            out.append(f"![ROC-AUC by market]({payload})\n")
    return "\n".join(out)


def _render_html(sections: list[tuple[str, Any]], png: bytes) -> str:
    body = []
    for kind, payload in sections:
        if kind == "h":
            level = len(payload) - len(payload.lstrip("#"))
            text = html.escape(payload.lstrip("# ").replace("`", ""))
            body.append(f"<h{level}>{text}</h{level}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(payload).replace('`', '')}</p>")
        elif kind == "table":
            header, rows = payload
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            trs = "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            b64 = base64.b64encode(png).decode("ascii")
            body.append(f'<img alt="ROC-AUC by market" src="data:image/png;base64,{b64}">')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Per-market AUC report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_cell(text: str) -> str:
    bold = text.startswith("**") and text.endswith("**")
    inner = html.escape(text.strip("*") if bold else text)
    inner = inner.replace(SIGNIFICANT, f'<span class="sig">{SIGNIFICANT}</span>')
    return f"<td><b>{inner}</b></td>" if bold else f"<td>{inner}</td>"


def build_report(run_dirs: Sequence[Path | str], out_dir: Path | str, baseline_method: str = "lora",
                 n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``auc_by_market.png`` for ``run_dirs`` into ``out_dir``.

    A run without ``metrics.json`` is evaluated first (:func:`relevance.evaluation.metrics.evaluate_run`).
    Deltas vs ``baseline_method`` use the runs' test predictions; when no run has that method, or
    a run's predictions are missing or cover other examples, its deltas are omitted with a note.
    Returns the paths written, the per-run metrics and deltas, and the notes.
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
    sections: list[tuple[str, Any]] = [
        ("h", "# Per-market AUC report"),
        ("p", "Runs: " + "; ".join(f"`{lbl}` ({dirs[lbl]})" for lbl in labels) + ". Split: test. "
              f"Intervals: 95% stratified bootstrap ({', '.join(map(str, boots))} resamples)."),
        ("h", "## ROC-AUC by market"), ("table", _auc_rows(metrics, markets, "auc")),
        ("img", "auc_by_market.png"),
    ]
    if base is not None and deltas:
        sections += [("h", f"## Δ ROC-AUC vs `{base}` (paired bootstrap, {n_boot} resamples)"),
                     ("p", "Same examples and same resamples for both runs. A ✱ marks a difference "
                           "whose 95% interval excludes 0."),
                     ("table", _delta_rows(deltas, markets, base))]
    sections += [("h", "## PR-AUC (average precision) by market"),
                 ("table", _auc_rows(metrics, markets, "pr_auc")),
                 ("h", "## Cost"), ("table", _efficiency_rows(infos))]
    if notes:
        sections += [("h", "## Notes"), *(("p", n) for n in notes)]
    md_path, html_path, png_path = out_dir / "report.md", out_dir / "report.html", out_dir / "auc_by_market.png"
    png = _plot(metrics, markets, png_path)
    md_path.write_text(_render_md(sections), encoding="utf-8")
    html_path.write_text(_render_html(sections, png), encoding="utf-8")
    significant = {lbl: [k for k, e in [*r["markets"].items(), ("macro", r["macro"])] if e["significant"]]
                   for lbl, r in deltas.items()}
    return {"report_md": str(md_path), "report_html": str(html_path), "png": str(png_path),
            "baseline": base, "methods": labels, "markets": markets, "metrics": metrics,
            "deltas": deltas, "significant": significant, "notes": notes}


def _read_preds(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "predictions" / "test.parquet"
    return pd.read_parquet(path) if path.exists() else None
