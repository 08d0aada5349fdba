"""The ``score`` flow on Prefect's ephemeral API: a market without a champion leaves the run Failed with
the summary as its result and an ``unscored-markets`` artifact; a complete run is a clean Completed."""

import asyncio

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def read_run(flow_run_id):
    """The flow run's state and its ``unscored-markets`` artifacts, as the API (the UI) sees them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["unscored-markets"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return run.state, found

    return asyncio.run(read())


@pytest.fixture(scope="module")
def store(tmp_path_factory, fresh_store, tiny_model):
    """A champion for de only: us and fr (in ``demo_raw``) have none."""
    from relevance.data.demo_data import generate_market
    from relevance.serving import registry
    from relevance.training.runs import write_synthetic_run

    root = tmp_path_factory.mktemp("score-flow")
    uri = fresh_store(root / "mlflow.db")
    test = pd.DataFrame(generate_market("de", 20, np.random.default_rng(0)))
    run = write_synthetic_run(root / "run", tiny_model, "mtl-lora", ("de",), test=test, seed=1)
    client = registry.client_for(uri)
    for r in registry.register(run, tracking_uri=uri):
        client.set_registered_model_alias(r["name"], "champion", r["version"])
    return uri


def test_partial_run_ends_failed_with_summary_and_artifact(tmp_path, demo_raw, store):
    from pipelines.score import score_flow

    out = tmp_path / "scores"
    state = score_flow(demo_raw, str(out), tracking_uri=store, return_state=True)
    assert state.is_failed() and state.message.startswith("Partial: 2 of 3 market(s) not scored")
    summary = state.result(raise_on_failure=False)
    assert summary["status"] == "partial" and set(summary["unscored_markets"]) == {"fr", "us"}
    for market, counts in summary["markets"].items():
        assert counts["rows_in"] == counts["scored"] + sum(counts["quarantined"].values()), market
    assert summary["markets"]["de"]["scored"] > 0
    assert set(pd.read_parquet(out)["market"].astype(str)) == {"de"}  # written despite the Failed state
    api_state, found = read_run(state.state_details.flow_run_id)
    assert api_state.is_failed() and api_state.name == "Failed" and api_state.message == state.message
    assert api_state.result(raise_on_failure=False) == summary  # persisted: readable through the API
    assert len(found) == 1
    text = found[0].data
    for market, rows in summary["unscored_markets"].items():
        assert f"| {market} | {rows:,} | `models:/ads-relevance-{market}@champion` |" in text


def test_complete_run_is_a_clean_completed(tmp_path, demo_raw, store):
    from pipelines.score import score_flow

    state = score_flow(demo_raw, str(tmp_path / "scores"), tracking_uri=store, markets=["de"], return_state=True)
    assert state.is_completed() and state.name == "Completed", state.message
    summary = state.result()
    assert summary["status"] == "complete" and summary["unscored_markets"] == {}
    _, found = read_run(state.state_details.flow_run_id)
    assert len(found) == 1 and "all 1 market(s) scored" in found[0].data


def test_strict_run_fails_before_writing_and_is_not_retried(tmp_path, demo_raw, store, monkeypatch):
    import relevance.serving.scoring as scoring
    from pipelines.score import score_flow

    real, calls = scoring.score_dataset, []
    monkeypatch.setattr(scoring, "score_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    state = score_flow(demo_raw, str(tmp_path / "scores"), tracking_uri=store, require_all=True, return_state=True)
    assert state.is_failed() and len(calls) == 1  # a missing model is permanent: no retry
    assert "['fr', 'us'] have no model" in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "scores").exists()
