"""The quality benchmark's pure pieces: the policy-twin option, the win/tie/loss count, the precision check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality  # noqa: E402
from quality_tables import win_tie_loss  # noqa: E402


def test_parse_twins_reads_code_language_policy_and_rejects_bad_parts() -> None:
    assert quality.parse_twins("de-top=de:topical, de-any=de:exact-any") == {
        "de-top": ("de", "topical"), "de-any": ("de", "exact-any")}
    assert quality.parse_twins("") == {}
    with pytest.raises(SystemExit, match="POLICY one of"):
        quality.parse_twins("de-x=de:broad")
    with pytest.raises(SystemExit, match="DE_X"):
        quality.parse_twins("DE_X=de:strict")


def test_mtl_knobs_reach_mtl_lora_only_and_name_their_own_run_dir(tmp_path) -> None:
    args = quality.parse_args(["--task-lr-scale", "9", "--mixing-init-scale", "0.5", "--workdir", str(tmp_path)])
    mtl = quality.train_config(args, tmp_path / "model", ["en", "jp"], "mtl-lora", 1)
    assert (mtl.task_lr_multiplier(2), mtl.mixing_init_scale) == (9.0, 0.5)
    assert Path(mtl.out).name == "mtl-lora-tlr9-mis0.5-seed1"
    lora = quality.train_config(args, tmp_path / "model", ["en", "jp"], "lora", 1)
    assert (lora.task_lr_scale, lora.mixing_init_scale, Path(lora.out).name) == (None, None, "lora-seed1")
    default = quality.train_config(quality.parse_args(["--workdir", str(tmp_path)]), tmp_path, ["en"], "mtl-lora", 0)
    assert Path(default.out).name == "mtl-lora-seed0" and default.task_lr_scale is None


def test_the_head_start_reaches_every_method_in_its_own_run_dir(tmp_path) -> None:
    args = quality.parse_args(["--head-start", "1024", "--workdir", str(tmp_path)])
    for method in ("mtl-lora", "lora", "separate"):
        config = quality.train_config(args, tmp_path, ["en", "jp"], method, 2)
        assert config.head_start == 1024 and Path(config.out).name == f"{method}-hs1024-seed2"
    default = quality.train_config(quality.parse_args(["--workdir", str(tmp_path)]), tmp_path, ["en"], "lora", 0)
    assert default.head_start is None and Path(default.out).name == "lora-seed0"


def test_an_mtl_lora_run_kept_from_another_default_task_lr_is_stale(tmp_path) -> None:
    args = quality.parse_args(["--workdir", str(tmp_path)])
    markets = ["en", "es", "de", "zh", "ar", "hi", "jp", "de-top", "de-any"]
    mtl = quality.train_config(args, tmp_path, markets, "mtl-lora", 0)
    run = Path(mtl.out)
    run.mkdir(parents=True)
    (run / "run_info.json").write_text('{"method": "mtl-lora"}')  # recorded before the multiplier was
    assert quality.stale_rates(run, mtl)
    (run / "run_info.json").write_text('{"task_lr_multiplier": 3.0}')  # the old default, 3x
    assert quality.stale_rates(run, mtl)
    nine = f'"b_lr_ratio": {12 / 9!r}'  # LoRA+'s default for 9 markets: 12 / 9
    (run / "run_info.json").write_text(f'{{"task_lr_multiplier": 9.0, {nine}}}')  # max(3, 9 markets)
    assert not quality.stale_rates(run, mtl)  # recorded before run_info held the pull: it trained without one
    pulled = f'"task_lr_multiplier": 9.0, {nine}, "task_decay": 10.0, "task_decay_only": "lam"'
    (run / "run_info.json").write_text(f'{{{pulled}}}')  # a default that pulled: not today's default
    assert quality.stale_rates(run, mtl)
    (run / "run_info.json").write_text(f'{{"task_lr_multiplier": 9.0, {nine}, "task_decay": 0.0}}')
    assert not quality.stale_rates(run, mtl)
    # an explicit --task-decay 10: before run_info held the pull, D alone pulled both halves; now the Λ_t alone
    pulled10 = quality.train_config(quality.parse_args(["--task-decay", "10", "--workdir", str(tmp_path)]), tmp_path,
                                    markets, "mtl-lora", 0)
    (run / "run_info.json").write_text(f'{{"task_lr_multiplier": 9.0, {nine}}}')
    assert quality.stale_rates(run, pulled10)
    (run / "run_info.json").write_text(f'{{"task_lr_multiplier": 9.0, {nine}, "task_decay": 10.0, '
                                       '"task_decay_only": "lam"}')
    assert not quality.stale_rates(run, pulled10)
    assert not quality.stale_rates(run, quality.train_config(args, tmp_path, markets, "lora", 0))
    (run / "run_info.json").write_text(f'{{"method": "mtl-lora", {nine}}}')  # an explicit multiple: train_config says it
    explicit = quality.train_config(quality.parse_args(["--task-lr-scale", "9"]), tmp_path, markets, "mtl-lora", 0)
    assert not quality.stale_rates(run, explicit)


def test_a_per_market_lora_run_kept_from_before_its_shared_adapter_is_stale(tmp_path) -> None:
    from relevance.training.config import DEFAULT_PML_SHARED_DECAY

    markets = ["en", "jp"]
    pml = quality.train_config(quality.parse_args(["--workdir", str(tmp_path)]), tmp_path, markets, "per-market-lora", 0)
    run = Path(pml.out)
    run.mkdir(parents=True)
    ratio = pml.b_lr_multiplier(len(markets))
    (run / "run_info.json").write_text(f'{{"b_lr_ratio": {ratio}}}')  # before: independent adapters, no pull
    assert quality.stale_rates(run, pml)
    (run / "run_info.json").write_text(f'{{"b_lr_ratio": {ratio}, "shared_adapter": true, "task_decay": 0.0}}')
    assert quality.stale_rates(run, pml)  # shared, but not pulled as the default pulls now
    today = f'"b_lr_ratio": {ratio}, "shared_adapter": true, "task_decay": {DEFAULT_PML_SHARED_DECAY}'
    (run / "run_info.json").write_text(f'{{{today}, "task_decay_only": "adapter"}}')
    assert not quality.stale_rates(run, pml)


def test_the_lora_plus_ratio_reaches_every_method_and_a_run_at_another_ratio_is_stale(tmp_path) -> None:
    args = quality.parse_args(["--b-lr-ratio", "4", "--workdir", str(tmp_path)])
    markets = ["en", "jp"]
    for method in ("mtl-lora", "lora", "per-market-lora"):
        config = quality.train_config(args, tmp_path, markets, method, 0)
        assert config.b_lr_multiplier(len(markets)) == 4.0 and Path(config.out).name == f"{method}-blr4-seed0"
    lora = quality.train_config(quality.parse_args(["--workdir", str(tmp_path)]), tmp_path, markets, "lora", 0)
    run = Path(lora.out)
    run.mkdir(parents=True)
    (run / "run_info.json").write_text('{"method": "lora"}')  # recorded before LoRA+: one rate, not today's 4x
    assert quality.stale_rates(run, lora)
    (run / "run_info.json").write_text('{"method": "lora", "b_lr_ratio": 4.0}')  # today's default for 2 markets
    assert not quality.stale_rates(run, lora)
    nine = quality.train_config(quality.parse_args(["--workdir", str(tmp_path)]), tmp_path, markets * 5, "lora", 0)
    assert quality.stale_rates(run, nine)  # 9+ markets: B at 12/9 (or 1x), so the 4x run is retrained


def test_win_tie_loss_counts_intervals_per_market_and_seed() -> None:
    def seeds(*cells):
        return {"per_seed": [{"diff": d, "significant": s} for d, s in cells]}

    table = {"a": seeds((0.1, True), (0.02, False)), "b": seeds((-0.05, True), (None, None)),
             "c": seeds((0.03, False), (0.2, True))}
    assert win_tie_loss(table, ["a", "b", "c"]) == (2, 2, 1)
    assert win_tie_loss(table, ["b"]) == (0, 0, 1)


def test_precision_check_pairs_bf16_with_fp32_on_the_same_examples(tmp_path) -> None:
    import numpy as np
    import pandas as pd

    from quality_tables import precision_check

    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame({"example_id": [f"e{i}" for i in range(n)], "market": np.repeat(["de", "es"], n // 2),
                          "label": rng.integers(0, 2, n), "query_id": [f"q{i // 4}" for i in range(n)]})
    signal = frame["label"] + rng.normal(0, 1.0, n)

    def run(name: str, scores, speed: float) -> dict:
        d = tmp_path / name / "predictions"
        d.mkdir(parents=True)
        frame.assign(score=scores).to_parquet(d / "test.parquet", index=False)
        return {"run_dir": str(d.parent), "info": {"examples_per_s": speed}}

    same = precision_check({"lora": run("b", signal, 12.0)}, {"lora": run("f", signal, 8.0)}, 0, n_boot=200)
    assert same["lora"]["macro"]["diff"] == 0.0 and same["lora"]["speedup"] == 1.5
    noisy = signal + np.where(frame["market"] == "es", rng.normal(0, 3.0, n), 0.0)  # bf16 ruined es only
    worse = precision_check({"lora": run("b2", noisy, 12.0)}, {"lora": run("f2", signal, 8.0)}, 0, n_boot=200)
    assert worse["lora"]["markets"]["de"] == 0.0 and worse["lora"]["markets"]["es"] < -0.05
    assert worse["lora"]["max_abs_market_diff"] == abs(worse["lora"]["markets"]["es"])
    assert precision_check({}, {}, 0, 10) == {}


def test_precision_checks_pair_each_seed_and_average_them(tmp_path) -> None:
    import numpy as np
    import pandas as pd

    from quality_tables import _precision_rows, precision_checks

    rng = np.random.default_rng(1)
    n = 400
    frame = pd.DataFrame({"example_id": [f"e{i}" for i in range(n)], "market": np.repeat(["de", "es"], n // 2),
                          "label": rng.integers(0, 2, n), "query_id": [f"q{i // 4}" for i in range(n)]})

    def run(name: str, scores, speed: float) -> dict:
        d = tmp_path / name / "predictions"
        d.mkdir(parents=True)
        frame.assign(score=scores).to_parquet(d / "test.parquet", index=False)
        return {"run_dir": str(d.parent), "info": {"examples_per_s": speed}}

    signal = frame["label"] + rng.normal(0, 1.0, n)
    worse = signal + rng.normal(0, 2.0, n)  # seed 1's bf16 run is worse than its fp32 run; seed 0's is the same
    bf16 = {0: {"lora": run("b0", signal, 12.0)}, 1: {"lora": run("b1", worse, 10.0)}}
    fp32 = {0: {"lora": run("f0", signal, 8.0)}, 1: {"lora": run("f1", signal, 8.0)}}
    checks = precision_checks(bf16, fp32, n_boot=100)["lora"]
    assert [c["seed"] for c in checks["per_seed"]] == [0, 1]
    d1 = checks["per_seed"][1]["macro"]["diff"]
    assert checks["per_seed"][0]["macro"]["diff"] == 0.0 and d1 < -0.02
    assert checks["mean_macro_diff"] == d1 / 2 and checks["mean_speedup"] == (1.5 + 1.25) / 2
    rows = _precision_rows("lora", checks)
    assert [r[1] for r in rows] == ["0", "1", "mean"] and rows[-1][-1] == "1.38x"
    one_seed_json = checks["per_seed"][0]  # a report written before several seeds: the check itself
    assert [r[1] for r in _precision_rows("lora", one_seed_json)] == ["0"]


def test_keep_runs_restores_a_finished_run_into_a_wiped_workdir_and_never_retrains(tmp_path, monkeypatch) -> None:
    import json

    import relevance.training.loop as loop

    from relevance.training.config import TrainConfig

    def Config(out: Path) -> TrainConfig:
        return TrainConfig(data="ds", method="lora", base_model="m", out=str(out))

    run_dir, keep = tmp_path / "work" / "runs" / "lora-seed0", tmp_path / "kept"
    saved = Config(run_dir).to_dict()
    del saved["shared_start"]  # made before that field existed: still the same run (its default)
    info = {"markets": ["de"], "b_lr_ratio": 4.0}  # LoRA+'s default for 1-3 markets
    for name, text in {"train_config.json": json.dumps(saved), "run_info.json": json.dumps(info),
                       "metrics.json": json.dumps({"markets": {"de": {"auc": 0.9}}}),
                       "predictions/test.parquet": "p", "adapter.safetensors": "weights"}.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    monkeypatch.setattr(loop, "train", lambda config: pytest.fail("a finished run was retrained"))

    first = quality.run_one(Config(run_dir), n_boot=10, keep=keep)
    assert sorted(str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file()) == sorted(
        f"lora-seed0/{f}" for f in quality.LIGHT_FILES)  # the weights stay behind
    import shutil

    shutil.rmtree(tmp_path / "work")  # a fresh machine: /tmp is gone
    again = quality.run_one(Config(run_dir), n_boot=10, keep=keep)
    assert again["metrics"] == first["metrics"] == {"markets": {"de": {"auc": 0.9}}}
    assert (run_dir / "predictions" / "test.parquet").read_text() == "p"
    assert not quality.copy_light(tmp_path / "nothing", keep / "x") and not (keep / "x").exists()


def test_report_renders_every_method_and_says_how_restored_runs_were_made(tmp_path) -> None:
    import numpy as np
    import pandas as pd

    from _env import environment
    from quality_tables import render_markdown, summarise

    rng = np.random.default_rng(1)
    n = 240
    frame = pd.DataFrame({"example_id": [f"e{i}" for i in range(n)], "market": np.repeat(["de", "de-any"], n // 2),
                          "label": rng.integers(0, 2, n), "query_id": [f"q{i // 3}" for i in range(n)]})

    def run(name: str, noise: float) -> dict:
        d = tmp_path / name / "predictions"
        d.mkdir(parents=True)
        frame.assign(score=frame["label"] + rng.normal(0, noise, n)).to_parquet(d / "test.parquet", index=False)
        per = {m: {"auc": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": n // 2, "n_pos": 60} for m in ("de", "de-any")}
        return {"run_dir": str(d.parent), "metrics": {"markets": per, "macro": per["de"]},
                "info": {"trainable_params": 10, "train_time_s": 5.0, "examples_per_s": 3.2, "models_to_serve": 2}}

    runs = {0: {"mtl-lora": run("m", 0.5), "lora": run("l", 2.0)}}
    data = {"built": {m: {"questions": 40, "articles": 4, "source": "xquad.de.json"} for m in ("de", "de-any")},
            "ingest": {"markets": {m: {"curated": {"train": 1, "valid": 1, "test": 1}} for m in ("de", "de-any")}}}
    settings = {"base_model": "/m/e5", "max_steps": 2, "batch_size": 4, "max_length": 32, "learning_rate": 1e-3,
                "precision": "fp32", "torch_threads": 1, "max_questions": 40, "split": "0.4,0.2,0.4",
                "twin_markets": {"de-any": ("de", "exact-any")}, "foreign": "en"}
    plain = render_markdown(summarise(runs, data, settings, environment(), n_boot=50))
    assert "| de-any | 0.800 | 0.800 |" in plain and "How the runs were made" not in plain
    told = render_markdown(summarise(runs, data, {**settings, "provenance": "two processes side by side"},
                                     environment(), n_boot=50))
    assert "How the runs were made: two processes side by side" in told
