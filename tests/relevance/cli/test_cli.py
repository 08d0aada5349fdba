"""The console script as a user runs it: real process, exit codes, printed output."""

import json
import os
import subprocess
import sys
from pathlib import Path


EXE = Path(sys.executable).with_name("ads-relevance")


def run(*args, cwd=None):
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, cwd=cwd, env=os.environ | {"HF_HUB_OFFLINE": "1"})


def test_help_lists_the_jobs():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("demo-data", "ingest", "demo"):
        assert cmd in out.stdout


def test_demo_data_then_ingest_reconciles(tmp_path):
    out = run("demo-data", "--out", str(tmp_path / "raw"), "--corrupt-fraction", "0.05", "--rows-per-market", "400")
    assert out.returncode == 0, out.stderr
    out = run("ingest", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "ds"), "--quiet")
    assert out.returncode == 0, out.stderr
    assert "reconciles" in out.stdout and " NO" not in out.stdout
    summary = json.loads((tmp_path / "ds" / "ingest_summary.json").read_text())
    assert set(summary["markets"]) == {"us", "gb", "de", "fr", "jp"}


def test_ingest_errors_exit_nonzero_with_the_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    out = run("ingest", "--raw", str(tmp_path / "empty"), "--out", str(tmp_path / "ds"))
    assert out.returncode != 0 and "holds no data files" in out.stderr
    bad = tmp_path / "raw" / "market=us"
    bad.mkdir(parents=True)
    (bad / "notes.csv").write_text("a,b\n1,2\n")
    out = run("ingest", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "ds"))
    assert out.returncode != 0 and "notes.csv" in out.stderr
    assert not (tmp_path / "ds").exists()
    out = run("ingest", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "ds"), "--split", "0.5,0.5")
    assert out.returncode != 0 and "split fractions" in out.stderr


def test_demo_data_bad_market_exits_nonzero(tmp_path):
    out = run("demo-data", "--out", str(tmp_path / "raw"), "--markets", "us,US ")
    assert out.returncode != 0 and "invalid market code" in out.stderr


def test_tracking_uri_help_describes_the_real_default(tmp_path):
    """Every command's --tracking-uri help names the default that settings.tracking_uri really uses."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ADS_RELEVANCE_HOME")}
    for cmd in ("train", "register", "promote", "score"):
        out = subprocess.run([str(EXE), cmd, "--help"], capture_output=True, text=True, env=env | {"COLUMNS": "400"})
        text = " ".join(out.stdout.split())
        assert "sqlite:///$ADS_RELEVANCE_HOME/mlflow.db" in text and "./mlruns-local" in text, (cmd, text)
        assert "out's parent" not in text
    got = subprocess.run([sys.executable, "-c", "from relevance import settings; print(settings.tracking_uri())"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.strip()
    assert got == f"sqlite:///{tmp_path / 'mlruns-local' / 'mlflow.db'}"
