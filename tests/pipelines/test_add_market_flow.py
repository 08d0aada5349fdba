"""The ``add-market`` flow on Prefect's ephemeral API: a trained de/us MTL-LoRA run grows by fr; only fr
is ingested, trained, registered and gated; de and us stay as they were."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def grown(tmp_path_factory, tiny_model):
    from pipelines.add_market import AddMarketParams, add_market_flow
    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest
    from relevance.training.loop import TrainConfig, train

    work = tmp_path_factory.mktemp("grow")
    write_demo_data(work / "raw-old", markets="us,de", rows_per_market=200, seed=0)
    ingest(str(work / "raw-old"), str(work / "ds-old"), (0.8, 0.1, 0.1), 0, progress=False)
    old = train(TrainConfig(data=str(work / "ds-old"), method="mtl-lora", base_model=tiny_model, out=str(work / "old"),
                            max_steps=4, eval_every=4, batch_size=16, max_length=48, track=False, progress=False))
    write_demo_data(work / "raw-new", markets="fr", rows_per_market=200, seed=1)
    params = AddMarketParams(raw=str(work / "raw-new"), workdir=str(work), from_run=str(old.run_dir), markets=["fr"],
                             max_steps=4, eval_every=4, n_boot=100, floor=0.0)  # a tiny model learns little: checks off
    state = add_market_flow(params, return_state=True)
    return work, old.run_dir, state


def test_flow_adds_registers_and_gates_only_the_new_market(grown, read_artifacts):
    work, old_run, state = grown
    assert state.is_completed(), state.message
    out = state.result()
    assert out["added_markets"] == ["fr"] and out["unserved"] == []
    assert [r["market"] for r in out["registered"]] == ["fr"]
    assert [(d["market"], d["decision"]) for d in out["decisions"]] == [("fr", "promoted")]
    info = json.loads((Path(out["run_dir"]) / "run_info.json").read_text())
    assert info["from_run"] == str(old_run) and info["task_map"] == {"de": 0, "us": 1, "fr": 2}
    assert out["ingest"]["markets"].keys() == {"fr"}  # only the new market's data was ingested
    assert {m["method"] for m in out["metrics"]} == {"mtl-lora"}
    client = MlflowClient(out["tracking_uri"], registry_uri=out["tracking_uri"])
    assert [m.name for m in client.search_registered_models()] == ["ads-relevance-fr"]
    assert client.get_model_version_by_alias("ads-relevance-fr", "champion")
    found = {a.key: a for a in read_artifacts(["add-market-decisions"])}
    assert "| fr | **promoted**" in found["add-market-decisions"].data


def test_flow_refuses_a_bad_market_code_before_any_path(tmp_path):
    from pipelines.add_market import AddMarketParams, add_market_flow

    params = AddMarketParams(raw=str(tmp_path), workdir=str(tmp_path), from_run=str(tmp_path), markets=["../x"])
    state = add_market_flow(params, return_state=True)
    assert state.is_failed() and not (tmp_path / "add-market").exists()
