"""A real `prefect server` + process worker on the deployments of prefect.yaml, driven from the CLI.

Starts everything on 127.0.0.1 (free port, private PREFECT_HOME), runs
`prefect deployment run 'relevance-pipeline/weekly' --watch` on a tiny in-code model, and checks the
flow run COMPLETED, its artifacts, and the registered model versions. Stops every process it started.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, log):
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(url, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "prefect server exited early"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout}s")


def artifact_keys(api, keys):
    body = json.dumps({"artifacts": {"key": {"any_": keys}}}).encode()
    req = urllib.request.Request(api + "/artifacts/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return {a["key"] for a in json.loads(r.read())}


def prefect(env, *args, timeout=300):
    out = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    return out


def test_deployment_run_on_a_real_server_and_worker(tmp_path):
    from relevance.data.demo_data import write_demo_data
    from relevance.model.tiny import build_tiny_model

    raw = tmp_path / "raw"
    write_demo_data(raw, markets="us,de", rows_per_market=200, seed=0)
    model = build_tiny_model(tmp_path / "tiny")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1", "HF_HUB_OFFLINE": "1",
        "ADS_RELEVANCE_REPO": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    procs = []
    with open(tmp_path / "server.log", "w") as slog, open(tmp_path / "worker.log", "w") as wlog:
        try:
            server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, slog)
            procs.append(server)
            wait_healthy(api, server)
            assert prefect(env, "work-pool", "create", "ads-relevance", "--type", "process").returncode == 0
            dep = prefect(env, "deploy", "--all")
            assert dep.returncode == 0, dep.stdout + dep.stderr
            procs.append(start([str(BIN / "prefect"), "worker", "start", "--pool", "ads-relevance"], env, wlog))

            workdir = tmp_path / "work"
            params = {"raw": str(raw), "workdir": str(workdir), "base_model": str(model), "methods": ["mtl-lora", "lora"],
                      "max_steps": 6, "eval_every": 3, "batch_size": 16, "max_length": 48, "n_boot": 100,
                      "floor": 0.0}  # six steps of a tiny model learn little: this test is about server and worker
            run = prefect(env, "deployment", "run", "relevance-pipeline/weekly", "--param", f"params={json.dumps(params)}",
                          "--watch", "--watch-timeout", "600", timeout=660)
            log = run.stdout + run.stderr
            assert run.returncode == 0 and "COMPLETED" in log.upper(), log + Path(tmp_path / "worker.log").read_text()[-4000:]

            inspect = prefect(env, "deployment", "inspect", "relevance-pipeline/weekly")
            assert "'active': False" in inspect.stdout or '"active": false' in inspect.stdout  # created paused

            score = prefect(env, "deployment", "run", "score/daily", "--param", f"input={raw}",
                            "--param", f"output={workdir / 'scores'}", "--param",
                            f"tracking_uri=sqlite:///{workdir / 'mlflow.db'}", "--watch", "--watch-timeout", "300",
                            timeout=360)
            assert score.returncode == 0 and "COMPLETED" in (score.stdout + score.stderr).upper(), score.stdout + score.stderr
            summary = json.loads((workdir / "scores" / "_scoring_summary.json").read_text())
            assert summary["status"] == "complete" and summary["unscored_markets"] == {}  # every market scored
            for market in ("de", "us"):
                assert summary["markets"][market]["scored"] > 0
                assert list((workdir / "scores").glob(f"market={market}/part-*.parquet"))
            keys = artifact_keys(api, ["per-market-auc", "gate-decisions", "ingest-summary", "unscored-markets"])
            assert keys == {"per-market-auc", "gate-decisions", "ingest-summary", "unscored-markets"}

            # Launch fr on the weekly run's MTL-LoRA without retraining it: the add-market deployment.
            [grown_from] = sorted(workdir.glob("runs/*/mtl-lora"))
            write_demo_data(tmp_path / "raw-fr", markets="fr", rows_per_market=200, seed=1)
            launch = {"raw": str(tmp_path / "raw-fr"), "workdir": str(workdir), "from_run": str(grown_from),
                      "markets": ["fr"], "max_steps": 4, "eval_every": 4, "n_boot": 100, "floor": 0.0}
            add = prefect(env, "deployment", "run", "add-market/launch", "--param", f"params={json.dumps(launch)}",
                          "--watch", "--watch-timeout", "300", timeout=360)
            assert add.returncode == 0 and "COMPLETED" in (add.stdout + add.stderr).upper(), add.stdout + add.stderr
            assert "add-market-decisions" in artifact_keys(api, ["add-market-decisions"])
        finally:
            for p in reversed(procs):
                stop(p)
    assert all(p.poll() is not None for p in procs)

    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    names = sorted(m.name for m in client.search_registered_models())
    assert names == ["ads-relevance-de", "ads-relevance-fr", "ads-relevance-us"]
    assert {v.tags["added_from"] for v in client.search_model_versions("name='ads-relevance-fr'")} == {str(grown_from)}
    assert all(client.get_model_version_by_alias(n, "champion") for n in names)  # every market has a model
    assert (workdir / "report" / "report.html").exists()
