"""Tests for relevance.evaluation.report: the three files, a self-contained HTML, the significance
marker exactly where a method is better by construction, Holm's column and the chance-alone count."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from relevance.evaluation.metrics import auc_table
from relevance.evaluation.report import DEGENERATE, SIGNIFICANT, UNDEFINED, build_report, format_auc_table
from relevance.evaluation.report_render import render_html

N_BOOT = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _base_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frames = []
    for market, n in {"us": 400, "de": 300, "jp": 200}.items():
        y = rng.integers(0, 2, n)
        frames.append(pd.DataFrame({"example_id": [f"{market}-{i}" for i in range(n)],
                                    "market": market, "label": y,
                                    "query_id": [f"{market}-q{i // 3}" for i in range(n)],  # 3 rows a query
                                    "score": rng.normal(size=n) + 0.6 * y}))
    frames.append(pd.DataFrame({"example_id": ["fr-0", "fr-1"], "market": "fr", "label": [0, 0],
                                "query_id": ["fr-q0", None], "score": [0.1, 0.4]}))
    return pd.concat(frames, ignore_index=True)


def make_run(root: Path, name: str, method: str, preds: pd.DataFrame, params: int) -> Path:
    run = root / name
    (run / "predictions").mkdir(parents=True)
    preds.sample(frac=1.0, random_state=1).to_parquet(run / "predictions" / "test.parquet")
    (run / "run_info.json").write_text(json.dumps({
        "method": method, "run_name": name, "base_model": "tiny-bert", "trainable_params": params,
        "train_time_s": 12.5, "examples_per_s": 321.0, "mlflow_run_id": None}))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    base = _base_frame()
    better = base.copy()  # clearly better on `de` only, identical elsewhere
    on_de = better.market == "de"
    better.loc[on_de, "score"] += 1.5 * better.loc[on_de, "label"]
    same = base.copy()  # per-market LoRA: indistinguishable from the baseline
    same["score"] += np.random.default_rng(5).normal(scale=0.02, size=len(same))
    return [make_run(root, "r-lora", "lora", base, 1_234),
            make_run(root, "r-mtl", "mtl-lora", better, 5_678),
            make_run(root, "r-pm", "per-market-lora", same, 9_999)]


@pytest.fixture(scope="module")
def report(runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_report(runs, tmp_path_factory.mktemp("report"), n_boot=N_BOOT, seed=0)


def _section_rows(md: str, heading_start: str) -> list[list[str]]:
    """Table rows (cells) of the first table after a heading starting with ``heading_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_start))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_files_written_and_png_valid(report: dict) -> None:
    for key in ("report_md", "report_html", "png"):
        assert Path(report[key]).is_file() and Path(report[key]).stat().st_size > 0
    assert Path(report["png"]).read_bytes().startswith(PNG_MAGIC)
    assert Path(report["png"]).name == "auc_by_market.png"


def test_html_is_self_contained(report: dict) -> None:
    text = Path(report["report_html"]).read_text(encoding="utf-8")
    b64 = base64.b64encode(Path(report["png"]).read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{b64}"' in text
    assert "http" not in text.lower()
    assert "<style>" in text and "<link" not in text and "<script" not in text
    assert re.findall(r'src="([^"]*)"', text) == [f"data:image/png;base64,{b64}"]
    assert text.count(SIGNIFICANT) == 2


def test_metrics_json_computed_when_missing(runs: list[Path], report: dict) -> None:
    for run in runs:
        saved = json.loads((run / "metrics.json").read_text())
        assert saved["split"] == "test" and saved["n_boot"] == N_BOOT
    assert report["methods"] == ["lora", "mtl-lora", "per-market-lora"]
    assert report["baseline"] == "lora" and report["markets"] == ["de", "fr", "jp", "us"]


def test_significant_marker_only_where_expected(report: dict) -> None:
    assert report["significant"] == {"mtl-lora": ["de", "macro"], "per-market-lora": []}
    assert report["holm_significant"] == {"mtl-lora": ["de"], "per-market-lora": []}
    md = Path(report["report_md"]).read_text(encoding="utf-8")
    rows = _section_rows(md, "## Δ ROC-AUC vs")
    header, body = rows[0], rows[1:]
    assert header == ["market", "mtl-lora − lora", "Holm (mtl-lora)", "per-market-lora − lora",
                      "Holm (per-market-lora)"]
    marked = {(r[0], header[j]) for r in body for j, c in enumerate(r) if SIGNIFICANT in c}
    assert marked == {("de", "mtl-lora − lora"), ("**macro**", "mtl-lora − lora")}
    assert md.count(SIGNIFICANT) == 2  # nowhere else in the document
    de = next(r for r in body if r[0] == "de")
    assert de[1].startswith("+0.") and float(de[1].split()[0]) > 0.1 and de[2] == "yes"
    us = next(r for r in body if r[0] == "us")
    assert us[1:3] == ["+0.000 [+0.000, +0.000]", "no"]  # identical scores: exactly zero
    fr = next(r for r in body if r[0] == "fr")
    assert fr[1:] == [UNDEFINED, "—", UNDEFINED, "—"]
    macro = next(r for r in body if r[0] == "**macro**")
    assert macro[2] == macro[4] == "—"  # Holm corrects across markets; macro is not one of them


def test_chance_alone_sentence_in_md_and_html(report: dict) -> None:
    md = Path(report["report_md"]).read_text(encoding="utf-8")
    page = Path(report["report_html"]).read_text(encoding="utf-8")
    mtl = ("Per market at 95%: 1 of 3 markets' intervals exclude 0; by chance alone one would expect about "
           "0.15 (0.05 × 3); after Holm's correction 1 remain significant.")
    pm = mtl.replace("1 of 3", "0 of 3").replace("correction 1", "correction 0")
    delta_section = md.split("## Δ ROC-AUC", 1)[1].split("\n## ", 1)[0]
    assert f"`mtl-lora`: {mtl}" in delta_section and f"`per-market-lora`: {pm}" in delta_section
    assert f"<p>mtl-lora: {mtl.replace(chr(39), '&#x27;')}</p>" in page
    assert report["deltas"]["mtl-lora"]["cluster"] == "query_id"
    assert "95% bootstrap over query_id clusters, stratified by class composition" in md
    for res in report["deltas"].values():
        assert res["expected_false_positives"] == pytest.approx(0.15) and res["n_compared"] == 3


def test_html_renders_the_markdown_sections() -> None:
    table = (["m", "d"], [["**macro**", f"+1 {SIGNIFICANT}"]])
    sections = [("h", "## A `b`"), ("p", "x < y, `z`"), ("table", table)]
    page = render_html(sections, b"")
    assert "<h2>A b</h2>" in page and "<p>x &lt; y, z</p>" in page
    assert f'<td><b>macro</b></td><td>+1 <span class="sig">{SIGNIFICANT}</span></td>' in page


def test_auc_table_and_cost_sections(report: dict) -> None:
    md = Path(report["report_md"]).read_text(encoding="utf-8")
    rows = _section_rows(md, "## ROC-AUC by market")
    assert rows[0] == ["market", "n (pos)", "lora", "mtl-lora", "per-market-lora"]
    fr = next(r for r in rows if r[0] == "fr")
    assert fr[1] == "2 (0)" and fr[2:] == [UNDEFINED] * 3
    de = next(r for r in rows if r[0] == "de")
    assert float(de[3].split()[0]) > float(de[2].split()[0]) + 0.1
    assert [r[0] for r in rows[-2:]] == ["**macro**", "**micro**"]
    assert "nan" not in md.lower()
    cost = _section_rows(md, "## Cost")
    assert cost[1] == ["lora", "lora", "1,234", "12.5", "321.0"]
    assert "auc_by_market.png" in md


def test_format_auc_table_matches_metrics() -> None:
    t = auc_table(_base_frame(), n_boot=100)
    text = format_auc_table({"lora": t})
    lines = text.splitlines()
    assert lines[0] == "| market | n (pos) | lora |" and lines[1] == "|---|---|---|"
    us = t["markets"]["us"]
    assert f"| us | 400 ({us['n_pos']}) | {us['auc']:.3f} [{us['ci_low']:.3f}, {us['ci_high']:.3f}] |" in lines
    assert f"| fr | 2 (0) | {UNDEFINED} |" in lines
    assert "| **macro** |" in text and "| **micro** |" in text
    with pytest.raises(ValueError, match="'f1'"):
        format_auc_table({"lora": t}, metric="f1")


def test_no_baseline_omits_deltas_with_note(runs: list[Path], tmp_path: Path) -> None:
    res = build_report(runs[1:], tmp_path / "out", n_boot=N_BOOT)
    assert res["baseline"] is None and res["deltas"] == {}
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "No run has the baseline method `lora`" in md
    assert "Δ ROC-AUC" not in md and SIGNIFICANT not in md
    assert (tmp_path / "out" / "auc_by_market.png").read_bytes().startswith(PNG_MAGIC)


def test_mismatched_examples_note_and_missing_run(runs: list[Path], tmp_path: Path) -> None:
    other = make_run(tmp_path, "r-short", "lora-market-token",
                     pd.read_parquet(runs[0] / "predictions" / "test.parquet").iloc[10:], 42)
    res = build_report([runs[0], other], tmp_path / "out", n_boot=N_BOOT)
    assert "lora-market-token" not in res["deltas"]
    assert any("example sets differ: 10" in n for n in res["notes"])
    with pytest.raises(FileNotFoundError, match="nope"):
        build_report([tmp_path / "nope"], tmp_path / "out2")
    with pytest.raises(ValueError, match="no run directories"):
        build_report([], tmp_path / "out3")


def test_a_degenerate_market_is_marked_and_listed(runs: list[Path], report: dict, tmp_path: Path) -> None:
    md = Path(report["report_md"]).read_text(encoding="utf-8")
    assert DEGENERATE not in md and "## Degenerate markets" not in md  # healthy runs: no alarm
    flat = _base_frame()
    on_de = flat.market == "de"
    flat.loc[on_de, "score"] = 0.719  # the multilingual-e5 failure: one market scored as a constant
    run = make_run(tmp_path, "r-flat", "mtl-lora", flat, 5_678)
    info = json.loads((run / "run_info.json").read_text())  # training's valid flags, no metrics_valid.json
    (run / "run_info.json").write_text(json.dumps({**info, "degenerate": {"valid": {"jp": ["AUC 0.5 ..."]},
                                                                          "test": {}}}))
    res = build_report([runs[0], run], tmp_path / "out", n_boot=N_BOOT)
    md = Path(res["report_md"]).read_text(encoding="utf-8")
    auc_rows = _section_rows(md, "## ROC-AUC by market")
    de = next(r for r in auc_rows if r[0] == "de")
    assert de[2].endswith("]") and de[3] == f"0.500 [0.500, 0.500] {DEGENERATE}"
    assert sum(DEGENERATE in c for r in auc_rows for c in r) == 1
    listed = _section_rows(md, "## Degenerate markets")
    assert listed[0] == ["run", "market", "split", "reasons"]
    assert listed[1] == ["mtl-lora", "jp", "valid", "AUC 0.5 ..."]
    assert listed[2][:3] == ["mtl-lora", "de", "test"] and "near-constant scores" in listed[2][3]
    assert "within noise of 0.5" in listed[2][3] and len(listed) == 3
    page = Path(res["report_html"]).read_text(encoding="utf-8")
    assert "<h2>Degenerate markets</h2>" in page and f'<span class="warn">{DEGENERATE}</span>' in page
    assert page.count(DEGENERATE) == md.count(DEGENERATE)


def test_training_rollbacks_are_listed(runs: list[Path], report: dict, tmp_path: Path) -> None:
    assert "## Training rollbacks" not in Path(report["report_md"]).read_text(encoding="utf-8")
    run = make_run(tmp_path, "r-back", "mtl-lora", _base_frame(), 5_678)
    info = json.loads((run / "run_info.json").read_text())
    rollbacks = [{"step": 100, "to_step": 50, "markets": ["de", "jp"], "lr_scale": 0.5},
                 {"step": 150, "to_step": 100, "markets": ["jp"], "lr_scale": 0.5, "scope": "markets"}]
    (run / "run_info.json").write_text(json.dumps({**info, "rollbacks": rollbacks}))
    res = build_report([runs[0], run], tmp_path / "out", n_boot=N_BOOT)
    listed = _section_rows(Path(res["report_md"]).read_text(encoding="utf-8"), "## Training rollbacks")
    assert listed == [["run", "collapsed at step", "back to step", "markets", "went back", "learning rate"],
                      ["mtl-lora", "100", "50", "de, jp", "whole model", "0.5×"],
                      ["mtl-lora", "150", "100", "jp", "their own adapters", "0.5×"]]
    assert "<h2>Training rollbacks</h2>" in Path(res["report_html"]).read_text(encoding="utf-8")
