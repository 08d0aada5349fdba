"""The Spark engine (pyspark local[2], mlflow spark_udf): same contract, same scores and the same handling of
a market without a model (partial by default, strict on request) as the local engine."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pyspark")

from data_contracts import scores  # noqa: E402
from relevance.serving import registry  # noqa: E402
from relevance.data.demo_data import generate_market, write_demo_data  # noqa: E402
from relevance.training.runs import write_synthetic_run  # noqa: E402
from relevance.serving.scoring import score_dataset  # noqa: E402
from relevance.serving.scoring_job import MarketsWithoutModel  # noqa: E402
from relevance.model.tiny import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, fresh_store):

    root = tmp_path_factory.mktemp("spark")
    uri = fresh_store(root / "mlflow.db")
    base = build_tiny_model(root / "tiny")
    test = pd.DataFrame(generate_market("de", 20, np.random.default_rng(0)))
    run = write_synthetic_run(root / "runs" / "token", base, "lora-market-token", ("de",), test=test, seed=7)
    client = registry.client_for(uri)
    for r in registry.register(run, tracking_uri=uri):
        client.set_registered_model_alias(r["name"], "champion", r["version"])
    write_demo_data(root / "raw", markets="de,fr", rows_per_market=200, seed=5, corrupt_fraction=0.05)
    return {"root": root, "uri": uri, "raw": root / "raw"}


def test_spark_engine_matches_the_local_engine(world, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = {"tracking_uri": world["uri"], "batch_size": 16}
    local = score_dataset(str(world["raw"]), tmp_path / "local", engine="local", **common)
    spark = score_dataset(str(world["raw"]), tmp_path / "spark", engine="spark", spark_master="local[2]", **common)
    assert spark["markets"] == local["markets"] and spark["engine"] == "spark"
    # fr has no champion: its rows are quarantined, de is written, the job says partial
    no_model = spark["markets"]["fr"]["quarantined"][scores.MARKET_NO_MODEL]
    assert spark["status"] == local["status"] == "partial" and no_model > 100
    assert spark["unscored_markets"] == local["unscored_markets"] == {"fr": no_model}
    for m, v in spark["markets"].items():
        assert v["rows_in"] == v["scored"] + sum(v["quarantined"].values()), m
    a, b = pd.read_parquet(tmp_path / "local"), pd.read_parquet(tmp_path / "spark")
    assert scores.check_scores(b) == []
    assert list(b.dtypes.astype(str)) == list(a.dtypes.astype(str))
    merged = a.merge(b, on="example_id", suffixes=("_local", "_spark"))
    assert len(merged) == len(a) == len(b) == local["markets"]["de"]["scored"] > 0
    np.testing.assert_allclose(merged["score_spark"], merged["score_local"], atol=1e-5)
    assert (merged["model_version_spark"] == merged["model_version_local"]).all()
    qa = pd.read_parquet(tmp_path / "local" / "_quarantine", partitioning=None)
    qb = pd.read_parquet(tmp_path / "spark" / "_quarantine", partitioning=None)
    assert sorted(qa["example_id"]) == sorted(qb["example_id"])
    fr = qb[qb["rule"] == scores.MARKET_NO_MODEL]
    assert len(fr) == no_model and fr["detail"].str.contains("models:/ads-relevance-fr@champion", regex=False).all()
    assert json.loads((tmp_path / "spark" / "_scoring_summary.json").read_text())["engine"] == "spark"
    assert not (tmp_path / "spark" / "_valid").exists()


def test_spark_strict_mode_fails_before_spark_starts_or_anything_is_written(world, tmp_path):
    with pytest.raises(MarketsWithoutModel, match=r"\['fr'\] have no model .*Nothing was written"):
        score_dataset(str(world["raw"]), tmp_path / "out", engine="spark", tracking_uri=world["uri"], require_all=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.scoring").exists()
