"""A real `mlflow server` on 127.0.0.1: register, promote, load by alias and score through it.

The server runs in its own process group (``start_new_session``) with a SQLite store and an artifact
directory it serves itself (``--artifacts-destination``: clients never touch the files directly), and
is stopped with SIGTERM to the whole group (SIGKILL if it lingers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from relevance.serving import registry
from relevance.data.demo_data import generate_market, write_demo_data
from relevance.serving.promotion import promote
from relevance.training.runs import write_synthetic_run
from relevance.serving.scoring import score_dataset
from relevance.model.tiny import build_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, fresh_store):

    root = tmp_path_factory.mktemp("mlflow-server")
    fresh_store(root / "store.db")  # a migrated schema: the server starts without running migrations
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'store.db'}", "--artifacts-destination", str(root / "artifacts")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | {"MLFLOW_TRACKING_URI": ""})
    try:
        wait_healthy(url, proc, log)
        yield {"url": url, "root": root}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def test_register_promote_load_and_score_through_a_server(server, tmp_path, one_torch_thread):
    url = server["url"]
    base = build_tiny_model(tmp_path / "tiny")
    test = pd.DataFrame(generate_market("de", 40, np.random.default_rng(1)))
    run = write_synthetic_run(tmp_path / "runs" / "lora", base, "lora", ("de",), test=test, seed=11)

    registered = registry.register(run, tracking_uri=url)
    assert registered[0]["created"] and registered[0]["name"] == "ads-relevance-de"
    client = registry.client_for(url)
    mv = client.get_model_version_by_alias("ads-relevance-de", "candidate")
    assert mv.source.startswith("mlflow-artifacts:"), "artifacts go through the server"
    assert list((server["root"] / "artifacts").rglob("MLmodel")), "and land in its artifact directory"

    from relevance.model.adapters import load_adapter
    from relevance.model.cross_encoder import load_cross_encoder, score

    adapted, tokenizer = load_cross_encoder(base, "cpu")
    load_adapter(adapted, run / "adapter")
    s = score(adapted, tokenizer, test, max_length=64)
    planted = test.assign(label=(s > np.median(s)).astype(int))  # the run ranks its own data: the gate's outcome is known
    data = tmp_path / "ds"
    for split in ("valid", "test"):
        folder = data / "curated" / "market=de" / f"split={split}"
        folder.mkdir(parents=True)
        planted.drop(columns="market").assign(query_id=test["query"]).to_parquet(folder / "part-00000.parquet", index=False)
    decision = promote("de", data, tracking_uri=url, report_dir=tmp_path / "decisions")
    assert decision["decision"] == "promoted", decision["reasons"]
    assert int(client.get_model_version_by_alias("ads-relevance-de", "champion").version) == registered[0]["version"]

    model, champion, _ = registry.load_by_alias(client, "de", "champion", tmp_path / "model")
    assert int(champion.version) == registered[0]["version"]
    write_demo_data(tmp_path / "raw", markets="de", rows_per_market=60, seed=2)
    summary = score_dataset(str(tmp_path / "raw"), tmp_path / "scores", tracking_uri=url)
    out = pd.read_parquet(tmp_path / "scores")
    assert summary["markets"]["de"]["scored"] == len(out) == 60
    rows = pd.read_parquet(tmp_path / "raw" / "market=de").set_index("example_id").loc[out["example_id"]].reset_index()
    np.testing.assert_allclose(out["score"].to_numpy(), model.score_frame(rows), atol=1e-6)
    used = json.loads((tmp_path / "scores" / "_scoring_summary.json").read_text())["models"]["de"]
    assert used["uri"].startswith("mlflow-artifacts:") and used["version"] == registered[0]["version"]
