"""SIGTERM stops a command cleanly: atexit handlers run, and Prefect's ephemeral API server goes with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _start(code: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, **(env or {})})
    return proc


def _wait_for(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line[len(prefix):].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"the child never printed {prefix!r} (exit {proc.poll()})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")  # a zombie is gone too


def test_sigterm_runs_atexit_and_exits_143(tmp_path: Path) -> None:
    flag = tmp_path / "cleaned"
    proc = _start(f"""
        import atexit, time
        from relevance.cli.common import exit_on_sigterm
        exit_on_sigterm()
        atexit.register(lambda: open({str(flag)!r}, "w").write("yes"))
        print("ready", flush=True)
        time.sleep(60)
    """)
    _wait_for(proc, "ready", 60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert flag.read_text() == "yes"


@pytest.mark.slow
def test_sigterm_stops_prefects_ephemeral_api_server(tmp_path: Path) -> None:
    """The orphan seen when `pipeline --demo` was stopped: Prefect's local API (uvicorn) outlived it."""
    proc = _start("""
        from relevance.cli.common import exit_on_sigterm
        exit_on_sigterm()
        from prefect.server.api.server import SubprocessASGIServer
        server = SubprocessASGIServer()
        server.start(timeout=180)
        print("server", server.server_process.pid, flush=True)
        import time
        time.sleep(120)
    """, env={"PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
              "DO_NOT_TRACK": "1"})
    server_pid = int(_wait_for(proc, "server", 200))
    assert _alive(server_pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    deadline = time.monotonic() + 30
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(server_pid), "the ephemeral API server outlived the stopped command"
