"""Tests for relevance.training.divergence: what counts as a collapse, what a rollback restores, and the
guard inside the training loop (a run whose scores collapse mid-way goes back and recovers; without the
guard it stays collapsed; a run that never collapses is untouched; a rollback survives a resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from relevance.training.checkpoint import Progress
from relevance.training.divergence import LR_FACTOR, collapsed_markets, guard, roll_back
from relevance.training.loop import Run, TrainConfig, run_training


def test_a_collapse_needs_a_spread_that_was_there_and_is_gone() -> None:
    best = {"de": 0.05, "fr": 0.012, "us": 0.004, "jp": 0.2}
    now = {"de": 0.0004, "fr": 0.009, "us": 0.0001, "jp": 0.019, "gb": 0.0}
    # de lost two orders of magnitude; fr hovers at the floor (0.012 -> 0.009, not a tenth); us never
    # spread its scores; jp fell tenfold but is still above the floor; gb had no best evaluation
    assert collapsed_markets(best, now) == ["de"]
    assert collapsed_markets(best, {"fr": 0.0011}) == ["fr"]
    assert collapsed_markets({}, now) == []


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_roll_back_restores_the_weights_clears_the_moments_and_scales_the_schedule() -> None:
    model, optimizer, scheduler = _model_and_optimizer(0)
    twin, twin_opt, twin_sched = _model_and_optimizer(0)  # the same schedule, never rolled back
    _steps(model, optimizer, scheduler, 3)
    _steps(twin, twin_opt, twin_sched, 3)
    best = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model, optimizer, scheduler, 2)
    _steps(twin, twin_opt, twin_sched, 2)
    assert any(not torch.equal(p, best[n]) for n, p in model.named_parameters())
    roll_back(model, optimizer, scheduler, best)
    assert all(torch.equal(p, best[n]) for n, p in model.named_parameters())
    assert len(optimizer.state) == 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR_FACTOR * twin_opt.param_groups[0]["lr"])
    _steps(model, optimizer, scheduler, 2)  # AdamW starts afresh and the schedule keeps its shape
    _steps(twin, twin_opt, twin_sched, 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR_FACTOR * twin_opt.param_groups[0]["lr"])
    assert all(int(s["step"]) == 2 for s in optimizer.state.values())


def test_guard_records_each_rollback_and_stops_at_the_limit(caplog) -> None:
    model, optimizer, scheduler = _model_and_optimizer(1)
    best = {n: p.detach().clone() for n, p in model.named_parameters()}
    prog = Progress(step=40, best_step=20, history=[{"step": 20, "score_std": {"de": 0.1, "us": 0.2}}])
    collapsed = {"de": 0.0001, "us": 0.15}
    with caplog.at_level("WARNING", logger="relevance.training.divergence"):
        assert guard(prog, {"de": 0.05, "us": 0.15}, 1, model, optimizer, scheduler, best) is False
        assert guard(prog, collapsed, 1, model, optimizer, scheduler, best) is True
        prog.step = 60
        assert guard(prog, collapsed, 1, model, optimizer, scheduler, best) is False  # limit spent
    assert prog.rollbacks == [{"step": 40, "to_step": 20, "markets": ["de"], "lr_scale": LR_FACTOR}]
    messages = [r.getMessage() for r in caplog.records]
    assert "back to step 20's weights" in messages[0] and "de 0.0001" in messages[0]
    assert "no rollback left (--max-rollbacks 1)" in messages[1]


# -- in the training loop --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """The de/fr/us demo data and tiny model of test_loop; at lr 1e-2 every market's valid scores spread
    (std ≥ 0.01) by step 16 and keep spreading to step 28."""
    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest
    from relevance.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("divergence")
    write_demo_data(root / "raw", "de,fr,us", rows_per_market=240, seed=2)
    ingest(str(root / "raw"), root / "ds", progress=False)
    build_tiny_model(root / "tiny", hidden=32, layers=1, heads=2, seed=0)
    return {"data": root / "ds", "model": root / "tiny"}


def _config(env, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(env["data"]), method="mtl-lora", base_model=str(env["model"]), out=str(out),
                max_steps=28, eval_every=4, batch_size=16, learning_rate=1e-2, keep_checkpoints=8,
                track=False, progress=False)
    return TrainConfig(**{**base, **kw})


def _train(config: TrainConfig, collapse_at: int | None = None, stop_at: int | None = None):
    """Train; after step ``collapse_at`` zero the classifier's weight (every score equal: the collapse a
    diverging run reaches, made on purpose), after step ``stop_at`` crash."""
    models: list[torch.nn.Module] = []

    class Watched(Run):
        def build_model(self):
            model, tok = super().build_model()
            models.append(model)
            return model, tok

    def on_step(step: int) -> None:
        if step == collapse_at:
            with torch.no_grad():
                models[0].classifier.weight.zero_()
        if step == stop_at:
            raise RuntimeError("crash")

    return run_training(lambda d: Watched(config, d), config.device, on_step)


def _history(out: Path) -> list[dict]:
    return json.loads((sorted((out / "checkpoints").iterdir())[-1] / "state.json").read_text())["progress"]["history"]


def test_a_collapsed_run_goes_back_to_its_best_weights_and_recovers(env, tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="relevance.training.divergence"):
        guarded = _train(_config(env, tmp_path / "guarded"), collapse_at=19)
    unguarded = _train(_config(env, tmp_path / "unguarded", max_rollbacks=0), collapse_at=19)
    assert unguarded.run_info["rollbacks"] == []
    assert guarded.run_info["rollbacks"] == [{"step": 20, "to_step": 16, "markets": ["de", "fr", "us"],
                                              "lr_scale": LR_FACTOR}]
    assert any("back to step 16's weights" in r.getMessage() for r in caplog.records)
    # at step 20 the guarded run holds step 16's weights again, and AdamW starts afresh
    at_20 = tmp_path / "guarded" / "checkpoints" / "step-00000020"
    weights, best = load_file(str(at_20 / "trainable.safetensors")), load_file(str(at_20 / "best.safetensors"))
    assert all(torch.equal(weights[k], best[k]) for k in best)
    assert torch.load(at_20 / "optimizer.pt", weights_only=True)["optimizer"]["state"] == {}
    # without the guard the scores stay collapsed to the end and step 16 ships; with it the run learns on
    floor = 0.01
    assert all(max(e["score_std"].values()) < floor for e in _history(tmp_path / "unguarded") if e["step"] >= 20)
    assert unguarded.run_info["best_step"] == 16
    late = [e for e in _history(tmp_path / "guarded") if e["step"] > 20]
    assert all(min(e["score_std"].values()) >= floor for e in late)
    assert guarded.run_info["best_step"] > 20


def test_a_run_that_never_collapses_is_untouched(env, tmp_path: Path) -> None:
    a = _train(_config(env, tmp_path / "a", max_steps=20))
    b = _train(_config(env, tmp_path / "b", max_steps=20, max_rollbacks=0))
    assert a.run_info["rollbacks"] == [] and a.run_info["best_step"] == b.run_info["best_step"]
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert all(torch.equal(p, pb[n]) for n, p in pa.items() if p.requires_grad)


@pytest.mark.slow
def test_a_rollback_survives_a_crash_and_resume(env, tmp_path: Path) -> None:
    reference = _train(_config(env, tmp_path / "reference"), collapse_at=19)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="crash"):
        _train(_config(env, out), collapse_at=19, stop_at=22)
    resumed = _train(_config(env, out, resume=True))  # from step 20's checkpoint, written after the rollback
    assert resumed.run_info["rollbacks"] == reference.run_info["rollbacks"]
    ref = dict(reference.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref[name], atol=1e-6, rtol=0)
