"""Every market gets the model its evidence supports: select_models on a real SQLite MLflow store.

Labels are planted from the models themselves (a run's own scores, thresholded at the median, make it
the perfect ranker), so which method each market should ship is known before the test runs."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from relevance.serving import registry
from relevance.serving.market_models import select_models
from relevance.serving.promotion import gate_lock
from relevance.training.runs import write_synthetic_run

from test_registry import make_frame, write_curated  # noqa: E402  (same folder)

pytestmark = pytest.mark.slow


def run_scores(run: Path, frame: pd.DataFrame, base: Path) -> np.ndarray:
    from relevance.model.adapters import load_adapter
    from relevance.model.cross_encoder import load_cross_encoder, score

    model, tokenizer = load_cross_encoder(base, "cpu")
    load_adapter(model, run / "adapter")
    return score(model, tokenizer, frame.reset_index(drop=True), max_length=64, precision="fp32")


def planted(frame: pd.DataFrame, owner: dict[str, Path], base: Path) -> pd.DataFrame:
    """Each market's labels are its owner run's scores above their median."""
    parts = []
    for market, rows in frame.groupby("market"):
        rows = rows.reset_index(drop=True)
        s = run_scores(owner[market], rows, base)
        parts.append(rows.assign(label=(s > np.median(s)).astype(int)))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, fresh_store):
    from relevance.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("select")
    base = build_tiny_model(root / "tiny")
    frame = make_frame(n=120, seed=3)
    runs = {m: write_synthetic_run(root / "runs" / m, base, m, ("de", "us"), test=frame, seed=s)
            for m, s in (("lora", 2), ("mtl-lora", 1), ("per-market-lora", 3))}
    data = write_curated(root / "ds", planted(frame, {"de": runs["lora"], "us": runs["mtl-lora"]}, base))
    return {"root": root, "base": base, "frame": frame, "runs": runs, "data": data, "store": fresh_store}


def champion(client, market: str, prefix: str):
    mv = client.get_model_version_by_alias(f"{prefix}-{market}", "champion")
    return int(mv.version), mv.tags["method"]


def test_each_market_ships_its_best_method_and_scoring_uses_each(world, tmp_path):
    from relevance.model.precision import native_bf16
    from relevance.serving.scoring import score_dataset

    uri, prefix = world["store"](tmp_path / "mlflow.db"), "pick"
    runs = [world["runs"]["mtl-lora"], world["runs"]["lora"]]
    out = select_models(runs, world["data"], tracking_uri=uri, prefix=prefix, report_dir=tmp_path / "gate")
    by = {d["market"]: d for d in out["decisions"]}
    assert {r["method"] for r in out["registered"]} == {"lora", "mtl-lora"} and len(out["registered"]) == 4
    assert by["de"]["decision"] == "promoted" and by["de"]["candidate_method"] == "lora"
    assert "has the best valid AUC" in by["de"]["reasons"][0]
    assert by["us"]["decision"] == "promoted" and by["us"]["candidate_method"] == "mtl-lora"
    us_reason = by["us"]["reasons"][0]  # shared LoRA may be below the floor on us; else it must be beaten clearly
    assert "no healthy shared-LoRA" in us_reason or ("excludes 0" in us_reason and by["us"]["edge"]["ci_low"] > 0)
    assert by["us"]["auc"]["candidate"]["valid"]["auc"] == pytest.approx(1.0)
    assert by["us"]["auc"]["candidate"]["test"]["auc"] is not None  # reported beside the choice
    client = registry.client_for(uri)
    assert champion(client, "de", prefix)[1] == "lora" and champion(client, "us", prefix)[1] == "mtl-lora"

    raw = tmp_path / "raw"
    for market, rows in world["frame"].groupby("market"):
        (raw / f"market={market}").mkdir(parents=True)
        rows.drop(columns=["market", "label"]).to_parquet(raw / f"market={market}" / "part.parquet", index=False)
    summary = score_dataset(str(raw), tmp_path / "scores", tracking_uri=uri, prefix=prefix, precision="fp32")
    assert summary["totals"]["scored"] == len(world["frame"]) and summary["precision"] == {"de": "fp32", "us": "fp32"}
    t = summary["timings_s"]  # where the time went: the stages add up to the whole
    assert set(t) == {"registry_and_models", "scoring", "read_check_write", "total"}
    assert t["registry_and_models"] > 0 and t["scoring"] > 0 and t["read_check_write"] >= 0
    assert t["registry_and_models"] + t["scoring"] + t["read_check_write"] == pytest.approx(t["total"], abs=0.01)
    auto = score_dataset(str(raw), tmp_path / "auto", tracking_uri=uri, prefix=prefix)  # precision auto
    for market, method in (("de", "lora"), ("us", "mtl-lora")):
        got = pd.read_parquet(tmp_path / "scores" / f"market={market}")
        assert set(got["model_version"]) == {champion(client, market, prefix)[0]}
        rows = world["frame"][world["frame"]["market"] == market].reset_index(drop=True)
        expected = pd.Series(run_scores(world["runs"][method], rows, world["base"]), index=rows["example_id"])
        np.testing.assert_allclose(got.set_index("example_id")["score"].loc[rows["example_id"]], expected, atol=1e-5)
        # auto: bf16 only where this CPU has it natively and the version's measured parity held
        tags = client.get_model_version_by_alias(f"{prefix}-{market}", "champion").tags
        bf16 = native_bf16("cpu") and tags["bf16_ok"] == "true"
        assert auto["precision"][market] == ("bf16" if bf16 else "fp32")
        got_auto = pd.read_parquet(tmp_path / "auto" / f"market={market}").set_index("example_id")["score"]
        if not bf16:
            np.testing.assert_allclose(got_auto.loc[rows["example_id"]], expected, atol=1e-5)
        else:
            assert np.corrcoef(got_auto.loc[rows["example_id"]], expected)[0, 1] >= 0.999


def test_a_worse_candidate_leaves_the_champion_serving(world, tmp_path):
    uri, prefix = world["store"](tmp_path / "mlflow.db"), "keep"
    select_models([world["runs"]["mtl-lora"], world["runs"]["lora"]], world["data"], tracking_uri=uri, prefix=prefix,
                  report_dir=tmp_path / "gate")
    client = registry.client_for(uri)
    before = champion(client, "us", prefix)
    later = select_models([world["runs"]["per-market-lora"], world["runs"]["lora"]], world["data"], tracking_uri=uri,
                          prefix=prefix, report_dir=tmp_path / "gate")
    us = next(d for d in later["decisions"] if d["market"] == "us")
    assert us["decision"] == "unchanged" and us["served"] and us["champion_after"] == before[0], us["reasons"]
    assert "champion" in us["reasons"][0]
    assert champion(client, "us", prefix) == before
    from relevance.serving.scoring import score_dataset

    raw = tmp_path / "raw" / "market=us"
    raw.mkdir(parents=True)
    rows = world["frame"][world["frame"]["market"] == "us"]
    rows.drop(columns=["market", "label"]).to_parquet(raw / "part.parquet", index=False)
    summary = score_dataset(str(tmp_path / "raw"), tmp_path / "scores", tracking_uri=uri, prefix=prefix)
    assert summary["status"] == "complete" and summary["models"]["us"]["version"] == before[0]  # the champion scores


def test_a_market_whose_candidates_all_fail_the_floor_is_refused_alone(world, tmp_path):
    frame = world["frame"].copy()
    rng = np.random.default_rng(0)
    us = frame["market"] == "us"
    frame.loc[us, "label"] = 0
    frame.loc[us & (rng.random(len(frame)) < 0.5), "label"] = 1  # noise: no model ranks it
    good = planted(frame[~us], {"de": world["runs"]["lora"]}, world["base"])
    data = write_curated(tmp_path / "ds", pd.concat([good, frame[us]], ignore_index=True))
    uri, prefix = world["store"](tmp_path / "mlflow.db"), "floor"
    out = select_models([world["runs"]["mtl-lora"], world["runs"]["lora"]], data, tracking_uri=uri, prefix=prefix,
                        report_dir=tmp_path / "gate", floor=0.75)
    by = {d["market"]: d for d in out["decisions"]}
    assert by["us"]["decision"] == "refused" and not by["us"]["served"] and "sanity floor" in by["us"]["reasons"][0]
    assert by["de"]["decision"] == "promoted" and by["de"]["served"]
    assert registry.version_by_alias(registry.client_for(uri), f"{prefix}-us", "champion") is None


def test_a_busy_gate_is_that_markets_error_only(world, tmp_path, monkeypatch):
    import relevance.serving.promotion as promotion

    monkeypatch.setattr(promotion, "LOCK_WAIT_S", 0.5)
    uri, prefix = world["store"](tmp_path / "mlflow.db"), "busy"
    client = registry.client_for(uri)
    registry._ensure_registered(client, f"{prefix}-us")
    held, release = threading.Event(), threading.Event()

    def other_gate():
        with gate_lock(registry.client_for(uri), f"{prefix}-us"):
            held.set()
            release.wait(60)

    t = threading.Thread(target=other_gate)
    t.start()
    try:
        assert held.wait(30)
        out = select_models([world["runs"]["mtl-lora"], world["runs"]["lora"]], world["data"], tracking_uri=uri,
                            prefix=prefix, report_dir=tmp_path / "gate")
    finally:
        release.set()
        t.join()
    by = {d["market"]: d for d in out["decisions"]}
    assert by["us"]["decision"] == "error" and "another gate" in by["us"]["reasons"][0]
    assert by["de"]["decision"] == "promoted"
    assert registry.version_by_alias(client, f"{prefix}-us", "champion") is None
    with gate_lock(client, f"{prefix}-us", wait_s=0):  # released by its holder: free again
        pass


def test_a_stale_lock_is_broken(world, tmp_path):
    uri = world["store"](tmp_path / "mlflow.db")
    client = registry.client_for(uri)
    client.create_registered_model("gate-lock.stale-us", tags={"owner": "a dead process"})
    with gate_lock(client, "stale-us", wait_s=0, stale_s=0):
        assert client.get_registered_model("gate-lock.stale-us").tags.get("owner") != "a dead process"
    assert not [m for m in client.search_registered_models() if m.name.startswith("gate-lock.")]


def test_a_store_failing_mid_gate_leaves_the_champion_in_place(world, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, prefix = world["store"](tmp_path / "mlflow.db"), "down"
    first = select_models([world["runs"]["lora"]], world["data"], tracking_uri=uri, prefix=prefix,
                          report_dir=tmp_path / "gate")
    assert [d["served"] for d in first["decisions"]] == [True, False]  # us: shared LoRA is below the floor
    client = registry.client_for(uri)
    before = champion(client, "de", prefix)
    real = MlflowClient.set_registered_model_alias

    def down(self, name, alias, version):
        if alias == "champion":
            raise MlflowException("connection refused: the tracking server went away")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", down)
    out = select_models([world["runs"]["mtl-lora"], world["runs"]["lora"]], world["data"], tracking_uri=uri,
                        prefix=prefix, report_dir=tmp_path / "gate")
    us = next(d for d in out["decisions"] if d["market"] == "us")  # would have promoted mtl-lora
    assert us["decision"] == "error" and "connection refused" in us["reasons"][0]
    assert champion(client, "de", prefix) == before
    assert registry.version_by_alias(client, f"{prefix}-us", "champion") is None
    assert not [m for m in client.search_registered_models() if m.name.startswith("gate-lock.")]


def test_bad_input_is_refused_before_anything_is_written(world, tmp_path):
    uri = world["store"](tmp_path / "mlflow.db")
    with pytest.raises(ValueError, match="several runs of one method"):
        select_models([world["runs"]["lora"], world["runs"]["lora"]], world["data"], tracking_uri=uri)
    with pytest.raises(ValueError, match="no training runs"):
        select_models([], world["data"], tracking_uri=uri)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        select_models([tmp_path / "nope"], world["data"], tracking_uri=uri)
    other = write_synthetic_run(tmp_path / "other" / "lora", world["base"], "lora", ("de", "us"), test=world["frame"],
                                data_fingerprint="f" * 64)
    with pytest.raises(ValueError, match="trained on other data"):
        select_models([other], world["data"], tracking_uri=uri)
    assert registry.client_for(uri).search_registered_models() == []
