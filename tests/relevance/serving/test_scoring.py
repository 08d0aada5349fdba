"""Batch scoring, local engine: output contract, quarantine, markets without a model (partial by default,
strict on request), corrupt input, SIGKILL + resume, the CLI's exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from data_contracts import scores
from relevance.serving import registry
from relevance.data.demo_data import generate_market, write_demo_data
from relevance.training.runs import write_synthetic_run
from relevance.serving.scoring import score_dataset
from relevance.serving.scoring_input import ScoringError
from relevance.serving.scoring_job import MarketsWithoutModel
from relevance.model.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def world(tmp_path_factory, fresh_store):
    """A champion for de and us (none for fr), and demo input of de, us, fr with bad rows of every rule."""

    root = tmp_path_factory.mktemp("scoring")
    uri = fresh_store(root / "mlflow.db")
    base = build_tiny_model(root / "tiny")
    test = pd.concat([pd.DataFrame(generate_market(m, 20, np.random.default_rng(i))) for i, m in enumerate(["de", "us"])])
    run = write_synthetic_run(root / "runs" / "mtl", base, "mtl-lora", ("de", "us"), test=test, seed=1)
    client = registry.client_for(uri)
    for r in registry.register(run, tracking_uri=uri):
        client.set_registered_model_alias(r["name"], "champion", r["version"])
    manifest = write_demo_data(root / "raw", markets="de,us,fr", rows_per_market=150, seed=3, corrupt_fraction=0.08)
    return {"root": root, "uri": uri, "raw": root / "raw", "run": run, "manifest": manifest}


def read_input(raw: Path) -> pd.DataFrame:
    """Every input row with the market of its partition directory."""
    frames = []
    for path in sorted(raw.glob("market=*/*.parquet")):
        df = pq.read_table(path).to_pandas()
        df["_partition"] = path.parent.name.split("=", 1)[1]
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def check_output(dst: Path, raw: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The contract holds and every input row is either scored once or quarantined once."""
    out = pd.read_parquet(dst)
    assert scores.check_scores(out) == []
    quarantine = pd.read_parquet(dst / "_quarantine", partitioning=None)
    assert set(quarantine["rule"]) <= set(scores.RULES)
    summary = json.loads((dst / "_scoring_summary.json").read_text())
    inputs = read_input(raw)
    for market, n in inputs.groupby("_partition").size().items():
        entry = summary["markets"][market]
        assert entry["rows_in"] == n == entry["scored"] + sum(entry["quarantined"].values())
        assert (out["market"].astype(str) == market).sum() == entry["scored"]
    assert len(out) + len(quarantine) == len(inputs)
    assert not set(out["example_id"]) & set(quarantine.loc[quarantine["rule"] != "duplicate_example_id", "example_id"])
    assert not list(dst.rglob(".*.tmp")) and not (dst / "_manifest.json").exists()
    return out, quarantine


def test_strict_mode_fails_before_writing_naming_the_markets(world, tmp_path):
    with pytest.raises(MarketsWithoutModel, match=r"\['fr'\] have no model .*markets with one: \['de', 'us'\].*"
                                                  r"Nothing was written.*--require-all-markets"):
        score_dataset(str(world["raw"]), tmp_path / "out", tracking_uri=world["uri"], require_all=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.scoring").exists()
    with pytest.raises(MarketsWithoutModel):  # the deprecated spelling of the strict mode
        score_dataset(str(world["raw"]), tmp_path / "out", tracking_uri=world["uri"], skip_unknown=False)
    with pytest.raises(ValueError, match="skip_unknown=True contradicts require_all=True"):
        score_dataset(str(world["raw"]), tmp_path / "out", tracking_uri=world["uri"], skip_unknown=True,
                      require_all=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.scoring").exists()


def test_market_without_model_is_quarantined_and_the_job_is_partial(world, tmp_path):
    """By default a market with no champion (fr) stops nothing: de and us are scored, fr is reported."""
    dst = tmp_path / "out"
    summary = score_dataset(str(world["raw"]), dst, tracking_uri=world["uri"], window=64)
    out, quarantine = check_output(dst, world["raw"])
    no_model = summary["markets"]["fr"]["quarantined"][scores.MARKET_NO_MODEL]
    assert summary["markets"]["fr"]["scored"] == 0 and no_model > 100
    assert summary["status"] == "partial" and summary["unscored_markets"] == {"fr": no_model}
    assert json.loads((dst / "_scoring_summary.json").read_text())["unscored_markets"] == {"fr": no_model}
    for m in ("de", "us"):
        assert summary["markets"][m]["scored"] > 0 and scores.MARKET_NO_MODEL not in summary["markets"][m]["quarantined"]
    fr = quarantine[quarantine["rule"] == scores.MARKET_NO_MODEL]
    assert len(fr) == no_model and set(fr["market"]) == {"fr"}
    assert fr["detail"].str.contains("models:/ads-relevance-fr@champion", regex=False).all()
    assert set(out["market"].astype(str)) == {"de", "us"}
    assert set(out["model_name"]) == {"ads-relevance-de", "ads-relevance-us"} and set(out["model_version"]) == {1}
    # every planted bad row (except label faults: the scoring contract has no label) is quarantined by its rule
    got = dict(zip(quarantine["example_id"], quarantine["rule"]))
    rules = world["manifest"]["rules"]
    for market, entry in world["manifest"]["markets"].items():
        for kind, ids in entry["planted"].items():
            if "label" in kind:  # label faults are fine for scoring: scored (or fr: no model)
                assert set(ids) <= (set(out["example_id"]) if market != "fr" else set(got)), kind
            elif rules[kind] != "duplicate_example_id":
                assert all(got.get(i) in (rules[kind], scores.MARKET_NO_MODEL) for i in ids), kind
    # the scores are the registered model's, whatever the window and batch composition
    client = registry.client_for(world["uri"])
    model, _, _ = registry.load_by_alias(client, "de", "champion", tmp_path / "model")
    de = read_input(world["raw"]).set_index("example_id").loc[out.loc[out["market"] == "de", "example_id"]]
    np.testing.assert_allclose(out.loc[out["market"] == "de", "score"].to_numpy(),
                               model.score_frame(de.reset_index()), atol=1e-6)


def test_markets_selection_leaves_other_rows_out(world, tmp_path):
    summary = score_dataset(str(world["raw"]), tmp_path / "out", tracking_uri=world["uri"], markets=["us"])
    assert list(summary["markets"]) == ["us"] and summary["totals"]["outside_selection"] > 0
    assert summary["status"] == "complete" and summary["unscored_markets"] == {}
    assert set(pd.read_parquet(tmp_path / "out")["market"].astype(str)) == {"us"}


def test_corrupt_input_file_is_named_and_output_untouched(world, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(world["raw"], raw)
    dst = tmp_path / "out"
    score_dataset(str(raw), dst, tracking_uri=world["uri"])
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    (raw / "market=us" / "part-9.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ScoringError, match=r"market=us/part-9\.parquet.*nothing was written"):
        score_dataset(str(raw), dst, tracking_uri=world["uri"])
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    assert not (tmp_path / ".out.scoring").exists()


KILLER = """
import os, signal, sys
from relevance.serving.scoring import score_dataset
seen = 0
def kill_after(n_rows):
    global seen
    seen += 1
    if seen == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
score_dataset(sys.argv[1], sys.argv[2], tracking_uri=sys.argv[4], window=40, on_window=kill_after)
"""


def test_sigkill_then_resume_yields_every_row_exactly_once(world, tmp_path):
    dst = tmp_path / "out"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = textwrap.dedent(KILLER)
    proc = subprocess.run([sys.executable, "-c", script, str(world["raw"]), str(dst), "6", world["uri"]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    staging = tmp_path / ".out.scoring"
    manifest = json.loads((staging / "_manifest.json").read_text())
    assert 1 <= len(manifest["done"]) < len(manifest["files"]), "killed in the middle of the job"
    assert list(staging.rglob(".part-*.tmp")), "killed in the middle of a file"
    assert not dst.exists()
    with pytest.raises(ScoringError, match="the job changed .*alias"):
        score_dataset(str(world["raw"]), dst, tracking_uri=world["uri"], resume=True, alias="x")
    summary = score_dataset(str(world["raw"]), dst, tracking_uri=world["uri"], resume=True, window=40)
    assert summary["resumed"] == 1
    out, _ = check_output(dst, world["raw"])
    whole = tmp_path / "whole"
    score_dataset(str(world["raw"]), whole, tracking_uri=world["uri"], window=40)
    ref = pd.read_parquet(whole)
    merged = out.merge(ref, on="example_id", suffixes=("", "_ref"))
    assert len(merged) == len(out) == len(ref)
    np.testing.assert_allclose(merged["score"], merged["score_ref"], atol=1e-6)
    assert json.loads((dst / "_scoring_summary.json").read_text())["markets"] == \
        json.loads((whole / "_scoring_summary.json").read_text())["markets"]


def test_cli_score(world, tmp_path):
    from relevance.cli.serving import score_command

    app = typer.Typer()
    app.command("score")(score_command)
    app.command("noop")(lambda: None)  # two commands, so `score` stays a subcommand
    runner = CliRunner()
    args = ["score", "--input", str(world["raw"]), "--output", str(tmp_path / "out"), "--tracking-uri", world["uri"], "--quiet"]
    out = runner.invoke(app, [*args, "--require-all-markets"])
    assert out.exit_code == 2 and "['fr'] have no model" in out.stderr and not (tmp_path / "out").exists()
    out = runner.invoke(app, [*args, "--markets", "de,fr", "--batch-size", "16"])
    assert out.exit_code == 3, out.output  # partial: de written, fr named
    assert "ads-relevance-de v1" in out.stdout and "TOTAL" in out.stdout
    assert "time: " in out.stdout and "registry and models" in out.stdout  # where the time went
    assert "NOT SCORED: no ads-relevance-fr@champion" in out.stdout
    assert "PARTIAL: 1 of 2 market(s) not scored" in out.stderr and "fr (" in out.stderr
    assert set(pd.read_parquet(tmp_path / "out")["market"].astype(str)) == {"de"}
    out = runner.invoke(app, [*args, "--markets", "de", "--skip-unknown"])
    assert out.exit_code == 0, out.output  # complete; the deprecated flag is accepted
    assert "--skip-unknown is deprecated" in out.stderr and "PARTIAL" not in out.output
    assert "Exit status" in runner.invoke(app, ["score", "--help"]).output
    out = runner.invoke(app, [*args, "--markets", "DE"])
    assert out.exit_code == 2 and "invalid market code 'DE'" in out.output
    out = runner.invoke(app, [*args, "--engine", "spark", "--resume"])
    assert out.exit_code == 2 and "--resume is offered by the local engine only" in out.output
