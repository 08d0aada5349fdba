"""policy_tables: per-seed tables from work folders, and --previous keeps seeds whose folders are gone."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import policy_tables  # noqa: E402


def _work(root: Path, seed: int) -> Path:
    """A script's work folder: test predictions of both methods (MTL-LoRA separates de better)."""
    rng = np.random.default_rng(seed)
    n = 240
    frame = pd.DataFrame({"example_id": [f"e{i}" for i in range(n)], "market": np.repeat(["de", "es"], n // 2),
                          "label": rng.integers(0, 2, n), "query_id": [f"q{i // 3}" for i in range(n)]})
    for method, noise in (("mtl-lora", 0.3), ("lora", 1.5)):
        d = root / f"run-{method}" / "predictions"
        d.mkdir(parents=True)
        frame.assign(score=frame["label"] + rng.normal(0, noise, n)).to_parquet(d / "test.parquet", index=False)
    return root


def test_previous_keeps_earlier_seeds_after_their_work_folders_are_gone(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(policy_tables, "mixing_probe", lambda run: {})  # no saved adapter in these folders
    first, out = _work(tmp_path / "after-s0", 0), tmp_path / "res" / "policy_crossing"
    assert policy_tables.main(["--kind", "crossing", "--runs", f"after:0={first}", "--n-boot", "50",
                               "--note", "after = commit X", "--out", str(out)]) == 0
    shutil.rmtree(first)
    later = _work(tmp_path / "before-s1", 1)
    assert policy_tables.main(["--kind", "crossing", "--previous", str(out.with_suffix(".json")), "--runs",
                               f"before:1={later}", "--n-boot", "50", "--note", "after = commit X",
                               "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["runs"]) == ["before", "after"] and list(result["runs"]["after"]) == ["0"]
    assert result["runs"]["after"]["0"]["markets"]["de"]["diff"] > 0.1  # the seed-0 numbers survived
    assert result["notes"] == ["after = commit X"] and len(result["earlier_environments"]) == 1
    md = out.with_suffix(".md").read_text()
    assert md.index("## before") < md.index("## after")
    with pytest.raises(SystemExit, match="holds 'crossing' runs, not 'nested'"):
        policy_tables.main(["--kind", "nested", "--previous", str(out.with_suffix(".json")), "--out", str(out)])
    with pytest.raises(SystemExit, match="nothing to tabulate"):
        policy_tables.main(["--kind", "nested", "--out", str(out)])
