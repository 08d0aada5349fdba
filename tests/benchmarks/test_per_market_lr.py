"""benchmarks/per_market_lr.py on its quick setting: per-market LoRA rows at their own LoRA+ ratios against one
shared LoRA, and the runs whose test markets are degenerate named under the table."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import per_market_lr  # noqa: E402


def _run(tmp_path: Path, *args: str) -> tuple[dict, dict, str]:
    """per_market_lr's quick setting with ``args``: (results json, each run's run_info by run name, the table)."""
    out = tmp_path / "out"
    assert per_market_lr.main(["--quick", *args, "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    infos = {d.name: json.loads((d / "run_info.json").read_text()) for d in (tmp_path / "work" / "runs").iterdir()}
    return json.loads(out.with_suffix(".json").read_text()), infos, out.with_suffix(".md").read_text()


def test_per_market_rows_train_at_their_own_ratio_and_shared_lora_keeps_the_default(tmp_path: Path) -> None:
    result, infos, table = _run(tmp_path, "--scales", "1", "--pml-b-lr-ratios", "2,4")
    assert list(result["results"]) == ["1, B 2×", "1, B 4×"] and result["pml_b_lr_ratios"] == [2.0, 4.0]
    # the quick data has 5 markets: the library's default for shared LoRA is 12 / 5 = 2.4
    assert {name: info["b_lr_ratio"] for name, info in infos.items()} == {
        "lora-seed0": 2.4, "per-market-lora-x1-b2-seed0": 2.0, "per-market-lora-x1-b4-seed0": 4.0}
    assert "| 1×, B 2× |" in table and "per-market LoRA where its row says `B X×`" in table
    # six steps of a tiny model learn next to nothing, so some test markets are degenerate: named under the table
    expected = {name: sorted(info["degenerate"]["test"]) for name, info in infos.items() if info["degenerate"]["test"]}
    assert expected and result["degenerate_test"] == expected
    assert all(f"`{run}` {', '.join(markets)}" in table for run, markets in expected.items())


def test_mtl_lora_rows_at_other_pulls_train_beside_the_default(tmp_path: Path) -> None:
    result, infos, table = _run(tmp_path, "--scales", "", "--mtl-lora", "--mtl-task-decays", "10")
    assert list(result["results"]) == ["mtl-lora", "mtl-lora-td10"] and result["mtl_task_decays"] == [10.0]
    pulls = {name: info["task_decay"] for name, info in infos.items()}
    assert pulls == {"lora-seed0": 0.0, "mtl-lora-seed0": 0.0, "mtl-lora-td10-seed0": 10.0}
    assert "| MTL-LoRA, `--task-decay 10` |" in table


def test_per_market_rows_at_other_pulls_and_forms_train_beside_each_other(tmp_path: Path) -> None:
    result, infos, table = _run(tmp_path, "--scales", "1", "--pml-task-decays", "0,50", "--pml-adapters", "independent")
    assert list(result["results"]) == ["1, pull 0, independent", "1, pull 50, independent"]
    assert result["pml_task_decays"] == [0.0, 50.0] and result["pml_adapters"] == ["independent"]
    assert {name: (info["task_decay"], info["task_decay_only"], info["shared_adapter"])
            for name, info in infos.items()} == {
        "lora-seed0": (0.0, None, False), "per-market-lora-x1-pull0-independent-seed0": (0.0, None, False),
        "per-market-lora-x1-pull50-independent-seed0": (50.0, "adapter", False)}
    assert "| 1×, pull 50, independent |" in table
    result, infos, _ = _run(tmp_path, "--scales", "1", "--pml-adapters", "shared")  # the library's pull, reused lora
    assert list(result["results"]) == ["1, shared"]
    assert infos["per-market-lora-x1-shared-seed0"]["shared_adapter"] is True
    with pytest.raises(SystemExit):  # argparse's error: names the option and the allowed forms
        per_market_lr.parse_args(["--quick", "--pml-adapters", "both"])
