"""Registry and promotion gate on a real SQLite MLflow store, with tiny models and synthetic runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from relevance.serving import parity, registry
from relevance.serving.packaging import local_artifact_dir
from relevance.data.demo_data import generate_market
from relevance.serving.promotion import gate_checks, promote, promote_all
from relevance.training.runs import find_baseline_run, read_training_run, write_synthetic_run
from relevance.model.tiny import build_tiny_model

MARKETS = ("de", "us")


def make_frame(n: int = 80, markets=MARKETS, seed: int = 0) -> pd.DataFrame:
    frames = [pd.DataFrame(generate_market(m, n, np.random.default_rng([seed, i]))) for i, m in enumerate(markets)]
    df = pd.concat(frames, ignore_index=True)
    df.loc[df.index[::7], "ad_description"] = None  # null descriptions are part of the contract
    return df


def write_curated(ds: Path, df: pd.DataFrame, splits=("valid", "test")) -> Path:
    """A curated dataset (ingest layout) holding ``df`` as each of ``splits`` (valid decides, test is reported)."""
    for m, group in df.groupby("market"):
        for split in splits:
            folder = ds / "curated" / f"market={m}" / f"split={split}"
            folder.mkdir(parents=True, exist_ok=True)
            out = group.drop(columns="market").assign(label=group["label"].astype("int8"), query_id=group["query"])
            out.to_parquet(folder / "part-00000.parquet", index=False)
    (ds / "ingest_summary.json").write_text(json.dumps({"rows": len(df), "labels": df["label"].tolist()}))
    return ds


@pytest.fixture(scope="module")
def world(tmp_path_factory, fresh_store):
    root = tmp_path_factory.mktemp("registry")
    base = build_tiny_model(root / "tiny")
    test = make_frame()
    runs = root / "runs"
    paths = {
        "mtl": write_synthetic_run(runs / "mtl", base, "mtl-lora", MARKETS, test=test, seed=1),
        "lora": write_synthetic_run(runs / "lora", base, "lora", MARKETS, test=test, seed=2),
        "worse": write_synthetic_run(runs / "worse", base, "per-market-lora", MARKETS, test=test, seed=3),
        "token": write_synthetic_run(runs / "token", base, "lora-market-token", MARKETS, test=test, seed=4),
    }
    uri = fresh_store(root / "mlflow.db")
    return {"root": root, "base": base, "test": test, "runs": paths, "uri": uri}


def test_tracking_uri_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ADS_RELEVANCE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert registry.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlruns-local' / 'mlflow.db'}"
    monkeypatch.setenv("ADS_RELEVANCE_HOME", str(tmp_path / "home"))
    assert registry.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert registry.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert registry.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert not (tmp_path / "home").exists(), "resolving must not create anything"


def test_model_names_are_validated():
    assert registry.model_name("pt-br") == "ads-relevance-pt-br"
    with pytest.raises(ValueError, match="invalid market code '../x'"):
        registry.model_name("../x")
    with pytest.raises(ValueError, match="prefix"):
        registry.model_name("de", prefix="a/b")


def test_baseline_discovery(world, tmp_path):
    mtl = read_training_run(world["runs"]["mtl"])
    assert find_baseline_run(mtl).path == world["runs"]["lora"].absolute()
    lora = read_training_run(world["runs"]["lora"])
    assert find_baseline_run(lora) is lora
    with pytest.raises(ValueError, match="must be a shared-LoRA run"):
        find_baseline_run(mtl, world["runs"]["worse"])
    small = make_frame(n=10)
    lonely = write_synthetic_run(tmp_path / "alone" / "mtl", world["base"], "mtl-lora", MARKETS, test=small)
    assert find_baseline_run(read_training_run(lonely)) is None
    write_synthetic_run(tmp_path / "alone" / "lora-a", world["base"], "lora", MARKETS, test=small)
    write_synthetic_run(tmp_path / "alone" / "lora-b", world["base"], "lora", MARKETS, test=small, seed=5)
    with pytest.raises(ValueError, match="pass --baseline-run"):
        find_baseline_run(read_training_run(lonely))
    with pytest.raises(FileNotFoundError, match="run_info.json is missing"):
        read_training_run(tmp_path)
    (tmp_path / "alone" / "lora-b" / "metrics.json").unlink()
    (tmp_path / "alone" / "lora-b" / "predictions" / "test.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="neither metrics.json nor predictions"):
        read_training_run(tmp_path / "alone" / "lora-b")


def test_register_tags_alias_and_idempotence(world):
    first = registry.register(world["runs"]["mtl"], tracking_uri=world["uri"])
    assert [(r["market"], r["created"]) for r in first] == [("de", True), ("us", True)]
    client = registry.client_for(world["uri"])
    mv = client.get_model_version_by_alias("ads-relevance-de", "candidate")
    tags = mv.tags
    metrics = json.loads((world["runs"]["mtl"] / "metrics.json").read_text())
    assert tags["method"] == "mtl-lora" and tags["market"] == "de" and tags["market_token"] == "false"
    assert float(tags["test_auc"]) == pytest.approx(metrics["markets"]["de"]["auc"])
    assert float(tags["test_auc_ci_low"]) <= float(tags["test_auc"]) <= float(tags["test_auc_ci_high"])
    lora_metrics = json.loads((world["runs"]["lora"] / "metrics.json").read_text())
    assert float(tags["baseline_auc"]) == pytest.approx(lora_metrics["markets"]["de"]["auc"])
    assert tags["baseline_model_uri"].endswith("baseline-de")
    for key in ("training_run_id", "data_fingerprint", "base_model", "adapter_sha256"):
        assert key in tags
    again = registry.register(world["runs"]["mtl"], tracking_uri=world["uri"])
    assert [(r["version"], r["created"]) for r in again] == [(r["version"], False) for r in first]
    assert len(registry.all_versions(client, "ads-relevance-de")) == 1


def test_registering_again_with_a_baseline_completes_the_version(world, tmp_path):
    uri, prefix = world["uri"], "fill-test"
    alone = write_synthetic_run(tmp_path / "alone" / "mtl", world["base"], "mtl-lora", MARKETS, test=world["test"])
    first = registry.register(alone, markets=["de"], tracking_uri=uri, prefix=prefix)[0]
    assert first["baseline_auc"] is None
    data = write_curated(tmp_path / "ds", world["test"])
    refused = promote("de", data, tracking_uri=uri, prefix=prefix, report_dir=tmp_path / "r")
    assert refused["decision"] == "refused" and "--baseline-run" in refused["reasons"][-1]
    again = registry.register(alone, markets=["de"], tracking_uri=uri, prefix=prefix, baseline_run=world["runs"]["lora"])[0]
    assert (again["version"], again["created"]) == (first["version"], False)
    tags = registry.client_for(uri).get_model_version(f"{prefix}-de", str(first["version"])).tags
    assert tags["baseline_model_uri"].endswith("baseline-de") and tags["baseline_auc"] != "none"
    decision = promote("de", data, tracking_uri=uri, prefix=prefix, report_dir=tmp_path / "r")
    assert "baseline" in decision["auc"] and decision["checks"][2]["name"] == "baseline"


@pytest.mark.parametrize("run", ["mtl", "token"])
def test_merged_pyfunc_scores_equal_the_adapted_model(world, run, tmp_path):
    import mlflow

    from relevance.model.adapters import load_adapter
    from relevance.model.cross_encoder import load_cross_encoder, score

    registry.register(world["runs"][run], markets=["de"], tracking_uri=world["uri"])
    client = registry.client_for(world["uri"])
    model, mv, local = registry.load_by_alias(client, "de", "candidate", tmp_path)
    rows = world["test"][world["test"]["market"] == "de"].reset_index(drop=True)
    adapted, tokenizer = load_cross_encoder(world["base"], "cpu")
    load_adapter(adapted, world["runs"][run] / "adapter")
    expected = score(adapted, tokenizer, rows, max_length=64, market_token=run == "token", precision="fp32")
    assert mv.tags["bf16_ok"] == "false" and "no valid rows" in mv.tags["bf16_parity_reason"]
    np.testing.assert_allclose(model.score_frame(rows), expected, atol=1e-5)  # auto: fp32 without parity
    # the schema-enforced pyfunc path gives the same numbers, with or without market / description
    pyfunc = mlflow.pyfunc.load_model(str(local))
    got = pyfunc.predict(rows[["query", "ad_title", "ad_description", "market"]], params={"batch_size": 7})
    np.testing.assert_allclose(np.asarray(got).reshape(-1), expected, atol=1e-5)
    meta = pyfunc.metadata
    assert meta.signature is not None and meta.saved_input_example_info is not None
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") and "+" not in r for r in requirements)
    assert any(r.startswith("transformers==") for r in requirements)
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.bin")), "safetensors and code only"
    with pytest.raises(ValueError, match="scores market 'de' only"):
        model.score_frame(world["test"])


def test_a_model_in_a_local_store_is_staged_with_its_weights_linked(world, tmp_path):
    """Scoring stages each market's model before loading it; from a local store (the SQLite default) the
    weights are linked, not copied, everything else is copied, and removing the stage leaves the store whole."""
    import shutil

    (r,) = registry.register(world["runs"]["lora"], markets=["de"], tracking_uri=world["uri"])
    client = registry.client_for(world["uri"])
    uri = client.get_model_version_download_uri(r["name"], r["version"])
    store = local_artifact_dir(uri)
    assert store is not None and store.is_dir()
    staged = registry.download_model(client, uri, tmp_path / "stage")
    files = sorted(p.relative_to(staged) for p in staged.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    weights = [staged / f for f in files if f.suffix == ".safetensors"]
    assert weights and all(w.is_symlink() and w.resolve().is_relative_to(store.resolve()) for w in weights)
    assert not any((staged / f).is_symlink() for f in files if f.suffix != ".safetensors")
    rows = world["test"][world["test"]["market"] == "de"]
    assert registry.load_local(staged).score_frame(rows).shape == (len(rows),)
    shutil.rmtree(staged)
    assert all((store / f).is_file() for f in files)


def test_only_an_existing_local_directory_counts_as_a_local_artifact_store(tmp_path):
    assert local_artifact_dir(tmp_path.as_uri()) == tmp_path and local_artifact_dir(str(tmp_path)) == tmp_path
    for uri in ((tmp_path / "missing").as_uri(), "mlflow-artifacts:/1/abc/artifacts", "s3://bucket/1/artifacts",
                "http://127.0.0.1:5000/artifacts", "file://otherhost/x", "relative/dir"):
        assert local_artifact_dir(uri) is None, uri


def test_register_measures_bf16_parity_on_the_valid_rows(world, tmp_path):
    data = write_curated(tmp_path / "ds", world["test"])
    run = write_synthetic_run(tmp_path / "runs" / "mtl", world["base"], "mtl-lora", MARKETS, test=world["test"],
                              seed=5, data=data)
    registry.register(run, markets=["us"], tracking_uri=world["uri"], prefix="parity")
    client = registry.client_for(world["uri"])
    model, mv, _ = registry.load_by_alias(client, "us", "candidate", tmp_path / "dl", prefix="parity")
    recorded = model.config["bf16_parity"]
    assert recorded["n"] == int(mv.tags["bf16_parity_n"]) == int((world["test"]["market"] == "us").sum())
    assert mv.tags["bf16_ok"] == str(recorded["ok"]).lower()
    assert abs(recorded["auc_delta"]) == pytest.approx(abs(recorded["auc_bf16"] - recorded["auc_fp32"]), abs=2e-6)
    assert recorded["auc_tolerance"] == pytest.approx(parity.auc_tolerance(world["test"].query("market == 'us'")["label"].to_numpy()))
    assert recorded["ok"] == (abs(recorded["auc_delta"]) <= recorded["auc_tolerance"] + 1e-6 and recorded["corr"] >= 0.999)
    assert recorded["corr"] > 0.99
    # the tokenizer check ran on the same rows: the version loads its tokenizer as the plain fast one
    assert mv.tags["generic_tokenizer"] == "true", mv.tags.get("generic_tokenizer_reason")
    assert model.config["generic_tokenizer"] == {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    assert type(model.tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")


def test_pyfunc_encoding_matches_cross_encoder(world):
    from transformers import AutoTokenizer

    from relevance.model import cross_encoder
    from relevance.serving import pyfunc_model

    tok = AutoTokenizer.from_pretrained(world["base"])
    df = pd.DataFrame({"query": ["red bike " * 40, "tent", "  ", "phone case"],
                       "ad_title": ["Apex Bike – Red", "Nordic Tent", "x", "Vexa Phone Case"],
                       "ad_description": ["cheap " * 300, None, "   ", float("nan")], "market": ["de"] * 4})
    for token in (False, True):
        q1, a1 = cross_encoder.pair_texts(df, market_token=token)
        q2, a2 = pyfunc_model.pair_texts(df, "de", token)
        assert (q1, a1) == (q2, a2)
        assert cross_encoder.encode_pairs(tok, q1, a1, 32) == pyfunc_model.encode(tok, q2, a2, 32)
    assert pyfunc_model.MARKET_TOKEN_FORMAT == cross_encoder.MARKET_TOKEN_FORMAT


def test_gate_rules_as_data():
    ok = gate_checks(0.80, 0.802, 0.799, has_champion=True, has_baseline=True, tolerance=0.002)
    assert [c.name for c in ok] == ["sanity", "champion", "baseline"] and all(c.passed for c in ok)
    worse = gate_checks(0.79, 0.80, 0.70, True, True, 0.002)
    assert [c.passed for c in worse] == [True, False, True] and "< champion 0.8000" in worse[1].detail
    below_baseline = gate_checks(0.80, None, 0.81, has_champion=False, has_baseline=True, tolerance=0.002)
    assert [c.passed for c in below_baseline] == [True, True, False]
    assert not gate_checks(0.9, None, None, False, False, 0.002)[2].passed
    assert [c.passed for c in gate_checks(None, 0.5, 0.5, True, True, 0.002)] == [False, False, False]
    assert not gate_checks(0.55, None, 0.5, False, True, 0.002)[0].passed  # the sanity floor is strict
    assert gate_checks(0.55, None, 0.5, False, True, 0.002, floor=0.5)[0].passed
    added = gate_checks(0.9, None, None, False, False, 0.002, added_from="runs/old")  # launched with add-market
    assert [c.passed for c in added] == [True, True, True] and "runs/old" in added[2].detail
    assert not gate_checks(0.5, None, None, False, False, 0.002, added_from="runs/old")[0].passed  # floor still applies
    assert not gate_checks(0.9, 0.95, None, True, False, 0.002, added_from="runs/old")[1].passed  # and the champion


def _labels_from(run: Path, frame: pd.DataFrame, base: Path) -> pd.DataFrame:
    """Labels that make ``run`` the perfect ranker on ``frame`` (so the gate's outcome is known)."""
    from relevance.model.adapters import load_adapter
    from relevance.model.cross_encoder import load_cross_encoder, score

    model, tokenizer = load_cross_encoder(base, "cpu")
    load_adapter(model, run / "adapter")
    s = score(model, tokenizer, frame, max_length=64)
    out = frame.copy()
    out["label"] = (s > np.median(s)).astype(int)
    return out


def test_promotion_gate_promotes_refuses_and_records_force(world, tmp_path):
    uri, base = world["uri"], world["base"]
    rows = world["test"][world["test"]["market"] == "us"].reset_index(drop=True)
    data = write_curated(tmp_path / "ds", _labels_from(world["runs"]["mtl"], rows, base))
    reports = tmp_path / "decisions"
    client = registry.client_for(uri)
    name = "ads-relevance-us"

    mtl = registry.register(world["runs"]["mtl"], markets=["us"], tracking_uri=uri)[0]
    first = promote("us", data, tracking_uri=uri, report_dir=reports)
    assert first["decision"] == "promoted" and first["auc"]["candidate"]["valid"]["auc"] == pytest.approx(1.0)
    assert "no champion yet" in first["reasons"][1] and first["champion_version"] is None
    assert first["served"] and first["champion_after"] == mtl["version"] and "valid split" in first["evidence"]
    assert int(client.get_model_version_by_alias(name, "champion").version) == mtl["version"]
    assert json.loads(Path(first["report"]).read_text())["decision"] == "promoted"

    worse = registry.register(world["runs"]["worse"], markets=["us"], tracking_uri=uri)[0]
    refused = promote("us", data, tracking_uri=uri, report_dir=reports)
    assert refused["decision"] == "refused" and refused["auc"]["candidate"]["valid"]["auc"] < 1.0 - 0.002
    assert refused["served"] and refused["champion_after"] == mtl["version"]
    assert int(client.get_model_version_by_alias(name, "champion").version) == mtl["version"], "champion stays"
    tags = client.get_model_version(name, str(worse["version"])).tags
    assert tags["gate.decision"] == "refused" and "< champion" in tags["gate.reasons"]

    with pytest.raises(ValueError, match="--force needs --reason"):
        promote("us", data, tracking_uri=uri, force=True)
    forced = promote("us", data, tracking_uri=uri, report_dir=reports, force=True, reason="incident 42 rollback test")
    assert forced["decision"] == "forced" and forced["reasons"][-1] == "forced: incident 42 rollback test"
    assert int(client.get_model_version_by_alias(name, "champion").version) == worse["version"]
    tags = client.get_model_version(name, str(worse["version"])).tags
    assert tags["gate.forced"] == "true" and tags["gate.force_reason"] == "incident 42 rollback test"
    assert client.get_model_version(name, str(mtl["version"])).tags["gate.superseded_by"] == str(worse["version"])

    registry.register(world["runs"]["mtl"], markets=["us"], tracking_uri=uri)  # candidate back to the better run
    better = promote_all(data, tracking_uri=uri, report_dir=reports)
    us = next(d for d in better if d["market"] == "us")
    assert us["decision"] == "promoted" and us["champion_version"] == worse["version"]
    assert int(client.get_model_version_by_alias(name, "champion").version) == mtl["version"]
    assert promote("us", data, tracking_uri=uri, report_dir=reports)["decision"] == "unchanged"
    assert len(list(reports.glob("ads-relevance-us-v*.json"))) >= 5


def test_cli_register_and_promote(world, tmp_path):
    from relevance.cli.registry import promote_command, register_command

    app = typer.Typer()
    app.command("register")(register_command)
    app.command("promote")(promote_command)
    runner = CliRunner()
    uri, prefix = world["uri"], ["--prefix", "cli-test", "--tracking-uri", world["uri"]]
    out = runner.invoke(app, ["register", "--run", str(world["runs"]["lora"]), "--markets", "de", *prefix, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["name"] == "cli-test-de"
    rows = world["test"][world["test"]["market"] == "de"].reset_index(drop=True)
    data = write_curated(tmp_path / "ds", _labels_from(world["runs"]["lora"], rows, world["base"]))
    out = runner.invoke(app, ["promote", "--market", "de", "--data", str(data), *prefix, "--report-dir", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert "cli-test-de: PROMOTED candidate v1 (lora), champion v1" in out.stdout  # a lora run is its own baseline
    out = runner.invoke(app, ["promote", "--data", str(data), "--tracking-uri", uri])
    assert out.exit_code == 2 and "exactly one of --market M or --all" in out.output
    noise = write_curated(tmp_path / "noise", world["test"])  # random labels: no model is fit to serve
    runner.invoke(app, ["register", "--run", str(world["runs"]["mtl"]), "--markets", "us", *prefix])
    out = runner.invoke(app, ["promote", "--market", "us", "--data", str(noise), *prefix, "--report-dir", str(tmp_path / "r")])
    assert out.exit_code == 3 and "REFUSED" in out.stdout and "no model serves market(s) ['us']" in out.output
    out = runner.invoke(app, ["register", "--run", str(tmp_path / "nope"), "--tracking-uri", uri])
    assert out.exit_code == 2 and "does not exist" in out.output
    assert "--baseline-run" in runner.invoke(app, ["register", "--help"]).stdout
