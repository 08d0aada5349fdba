"""Every flow on Prefect's ephemeral API with a tiny in-code model: states, artifacts, registry."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model, demo_raw):
    from pipelines.relevance_pipeline import PipelineParams, relevance_pipeline

    work = tmp_path_factory.mktemp("work")
    params = PipelineParams(raw=demo_raw, workdir=str(work), base_model=tiny_model, methods=["mtl-lora", "lora"],
                            max_steps=8, eval_every=4, batch_size=16, max_length=48, n_boot=100,
                            score_input=demo_raw, floor=0.0, head_start=32)  # 8 steps of a tiny model learn noise: checks off
    state = relevance_pipeline(params, return_state=True)
    return work, state


def test_pipeline_completes_with_artifacts_and_registry(pipeline_run, read_artifacts):
    """The planted outcome: every market that has training data ends with a champion chosen among both
    methods on valid, and every valid input row of every market is scored by its market's champion."""
    import pandas as pd

    work, state = pipeline_run
    assert state.is_completed(), state.message
    out = state.result()
    assert set(out["runs"]) == {"mtl-lora", "lora"} and out["unserved"] == []
    for run_dir in out["runs"].values():  # the pipeline's head_start reaches every method's training
        assert json.loads((Path(run_dir) / "run_info.json").read_text())["head_start"]["rows"] == 32
    assert (work / "report" / "report.html").exists() and (work / "dataset" / "ingest_summary.json").exists()
    assert "## Model per market" in (work / "report" / "report.md").read_text()
    keys = ["per-market-auc", "gate-decisions", "ingest-summary", "unscored-markets"]
    found = {a.key: a for a in read_artifacts(keys)}
    assert set(found) == set(keys)
    assert "# Model per market" in found["gate-decisions"].data and "report.html" in found["gate-decisions"].data
    assert "Scoring complete: all 3 market(s) scored" in found["unscored-markets"].data
    client = MlflowClient(out["tracking_uri"], registry_uri=out["tracking_uri"])
    names = {m.name for m in client.search_registered_models()}
    assert names == {"ads-relevance-de", "ads-relevance-fr", "ads-relevance-us"}
    assert sorted((r["market"], r["method"]) for r in out["registered"]) == sorted(
        (m, method) for m in ("de", "fr", "us") for method in ("lora", "mtl-lora"))
    decisions = {d["market"]: d for d in out["decisions"]}
    assert set(decisions) == {"de", "fr", "us"}
    champions = {}
    for market, d in decisions.items():
        assert d["decision"] == "promoted" and d["served"], d["reasons"]
        assert d["candidate_method"] in ("lora", "mtl-lora") and "valid split" in d["evidence"]
        assert "sanity checks off" in " ".join(d["reasons"])  # and the detector still says what it saw:
        assert d["auc"]["candidate"]["valid"]["degenerate"] == bool(d["auc"]["candidate"]["valid"]["degenerate_reasons"])
        mv = client.get_model_version_by_alias(f"ads-relevance-{market}", "champion")
        assert int(mv.version) == d["champion_after"] == d["candidate_version"]
        assert mv.tags["method"] == d["candidate_method"]
        champions[market] = int(mv.version)
    scores = out["scores"]
    assert scores["status"] == "complete" and scores["unscored_markets"] == {}
    for market, counts in scores["markets"].items():
        assert counts["rows_in"] == counts["scored"] + sum(counts["quarantined"].values())
        assert counts["scored"] > 0 and "market_no_model" not in counts["quarantined"]
        got = pd.read_parquet(work / "scores" / f"market={market}")
        assert set(got["model_version"]) == {champions[market]}


def test_ingest_flow_is_cached_on_unchanged_input(tmp_path, demo_raw, monkeypatch):
    import relevance.data.ingest as ingest_mod
    from pipelines.ingest import ingest_flow

    real, calls = ingest_mod.ingest, []
    monkeypatch.setattr(ingest_mod, "ingest", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = str(tmp_path / "ds")
    first = ingest_flow(demo_raw, out, return_state=True)
    second = ingest_flow(demo_raw, out, return_state=True)
    assert first.is_completed() and second.is_completed()
    assert second.result() == first.result() and len(calls) == 1  # the second run was served from the cache
    import shutil

    shutil.rmtree(out)  # output gone: the cache must not pretend it is there
    assert ingest_flow(demo_raw, out, return_state=True).is_completed() and len(calls) == 2


def test_transient_storage_fault_succeeds_on_retry(tmp_path, demo_raw, monkeypatch):
    import relevance.data.ingest as ingest_mod
    from pipelines import _policy
    from pipelines.ingest import ingest_flow

    monkeypatch.setattr(_policy, "RETRY_DELAYS", [0, 0])
    real, calls = ingest_mod.ingest, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("transient storage fault: connection reset")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_mod, "ingest", flaky)
    state = ingest_flow(demo_raw, str(tmp_path / "ds"), return_state=True)
    assert state.is_completed() and len(calls) == 2


def test_corrupt_input_fails_the_flow_naming_the_file(tmp_path, demo_raw):
    import shutil

    from pipelines.ingest import ingest_flow

    raw = tmp_path / "raw"
    shutil.copytree(demo_raw, raw)
    (raw / "market=us" / "broken.parquet").write_bytes(b"not parquet at all")
    state = ingest_flow(str(raw), str(tmp_path / "ds"), return_state=True)
    assert state.is_failed()
    assert "broken.parquet" in state.message or "broken.parquet" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "ds").exists()


def test_training_fans_out_over_dask(tmp_path, tiny_model, demo_raw):
    """task_runner="dask": the methods train concurrently in Dask worker processes, same outputs."""
    pytest.importorskip("prefect_dask")
    from pipelines.ingest import ingest_flow
    from pipelines.relevance_pipeline import PipelineParams, _train_all
    from relevance.pipeline_plan import training_plan

    dataset = tmp_path / "ds"
    ingest_flow(demo_raw, str(dataset))
    params = PipelineParams(raw=demo_raw, workdir=str(tmp_path), base_model=tiny_model, task_runner="dask",
                            dask_workers=2)
    plan = training_plan(dataset, tiny_model, tmp_path / "runs", ["mtl-lora", "lora"], max_steps=4, eval_every=2,
                         batch_size=16, max_length=48, track=False)
    infos = _train_all(params, [c.to_dict() for c in plan])
    assert sorted(i["method"] for i in infos) == ["lora", "mtl-lora"]
    for info in infos:
        assert (tmp_path / "runs" / info["method"] / "predictions" / "test.parquet").exists()
