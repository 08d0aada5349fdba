"""Tests for relevance.training.add_market and `ads-relevance add-market`: a new market trains alone, the
others stay bit-identical (exported merged weights), register takes only the new one, bad input writes
nothing, and an interrupted add-market resumes to the same adapter."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from relevance.cli.app import app
from relevance.training.add_market import add_markets
from relevance.training.loop import TrainConfig, train

OLD, NEW = ("fr", "us"), "de"  # de sorts first: the grown map {fr: 0, us: 1, de: 2} is not the sorted one
TRAIN_OPTS = ["--max-steps", "6", "--eval-every", "3", "--batch-size", "16", "--lr", "3e-3", "--no-track",
              "--no-progress"]
ADD_OPTS = ["--steps", "60", "--eval-every", "20", "--batch-size", "32", "--lr", "3e-2", "--no-track",
            "--no-progress"]


def _plant(data: Path, market: str) -> None:
    """Make ``market``'s label a signal the tiny model can learn: positives' titles start with
    'kora kora kora', negatives' with 'vexa vexa vexa' (words of the tiny vocabulary)."""
    for part in (data / "curated" / f"market={market}").glob("split=*/*.parquet"):
        df = pq.read_table(part).to_pandas()
        prefix = df["label"].map({1: "kora kora kora ", 0: "vexa vexa vexa "})
        df["ad_title"] = prefix + df["ad_title"]
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), part)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """fr/us/de data (de planted), a tiny model, RUN = mtl-lora on fr,us trained through the CLI."""
    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest
    from relevance.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("grow")
    write_demo_data(root / "raw", "fr,us,de", rows_per_market=600, seed=2)
    ingest(str(root / "raw"), root / "ds", progress=False)
    _plant(root / "ds", NEW)
    build_tiny_model(root / "tiny", hidden=32, layers=1, heads=2, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done = CliRunner().invoke(app, ["train", "--data", str(root / "ds"), "--method", "mtl-lora", "--base-model",
                                        str(root / "tiny"), "--out", str(root / "run"), "--markets", ",".join(OLD),
                                        *TRAIN_OPTS])
    finally:
        torch.set_num_threads(before)
    assert done.exit_code == 0, done.output
    return {"root": root, "data": root / "ds", "model": root / "tiny", "run": root / "run"}


def _add(world, out: Path, *extra: str, market: str = NEW, source: Path | None = None):
    args = ["add-market", "--from", str(source or world["run"]), "--data", str(world["data"]), "--market", market,
            "--out", str(out), *ADD_OPTS, *extra]
    return CliRunner().invoke(app, args)


def _merged_sha(run: Path, market: str, work: Path) -> str:
    """sha256 of ``market``'s exported merged safetensors, loaded the way the registry loads a run."""
    from relevance.model.adapters import export_merged, load_adapter
    from relevance.model.cross_encoder import load_cross_encoder

    info = json.loads((run / "run_info.json").read_text())
    model, tok = load_cross_encoder(info["base_model"], "cpu")
    load_adapter(model, run / "adapter")
    out = export_merged(model, market, work / f"{run.name}-{market}", tok)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def _auc_untrained(world, frame: pd.DataFrame, grown: bool) -> float:
    """AUC of the untouched base model (``grown=False``) or of RUN with the market added but untrained."""
    from relevance.model.adapters import add_market, load_adapter
    from relevance.model.cross_encoder import load_cross_encoder, score

    torch.manual_seed(0)
    model, tok = load_cross_encoder(world["model"], "cpu")
    if grown:
        load_adapter(model, world["run"] / "adapter")
        add_market(model, NEW)
    return roc_auc_score(frame["label"], score(model, tok, frame))


def test_add_market_cli_end_to_end(world, tmp_path: Path) -> None:
    from relevance.data.curated import read_split

    new = tmp_path / "grown"
    done = _add(world, new, "--head")
    assert done.exit_code == 0, done.output
    info = json.loads((new / "run_info.json").read_text())
    assert info["method"] == "mtl-lora" and info["markets"] == ["fr", "us", "de"]
    assert info["task_map"] == {"fr": 0, "us": 1, "de": 2} and info["added_markets"] == ["de"]
    assert info["from_run"] == str(world["run"].absolute()) and info["base_model"] == str(world["model"].absolute())
    assert info["data_fingerprint"] == json.loads((world["run"] / "run_info.json").read_text())["data_fingerprint"]
    saved = json.loads((new / "train_config.json").read_text())
    assert saved["markets"] == ["de"] and saved["add_market"]["from_run"] == str(world["run"].absolute())
    for split in ("valid", "test"):  # every market predicted, as `train` writes them
        preds = pd.read_parquet(new / "predictions" / f"{split}.parquet")
        assert set(preds["market"]) == {"fr", "us", "de"}
        assert preds["example_id"].tolist() == read_split(world["data"], split)["example_id"].tolist()

    # Old markets: every RUN tensor unchanged, and the exported merged models are byte-identical.
    old_t, new_t = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (world["run"], new))
    moved = {k: k.replace("classifier.", "classifier.shared.", 1) for k in old_t}  # --head wraps the head
    assert set(moved.values()) < set(new_t) and all(torch.equal(old_t[k], new_t[moved[k]]) for k in old_t)
    added = sorted(set(new_t) - set(moved.values()))
    assert any(".lam.2" in k for k in added) and any("classifier.copies.de" in k for k in added)
    lam = [new_t[k] for k in added if k.endswith(".lam.2")]
    assert any(not torch.equal(t, torch.eye(t.shape[0])) for t in lam), "de's Λ did not train"
    for market in OLD:
        assert _merged_sha(world["run"], market, tmp_path) == _merged_sha(new, market, tmp_path)

    # de learned its planted signal: better than the base model and than its untrained (neutral) start.
    test = read_split(world["data"], "test", [NEW])
    preds = pd.read_parquet(new / "predictions" / "test.parquet").query("market == @NEW")
    trained = roc_auc_score(preds["label"], preds["score"])
    base, neutral = _auc_untrained(world, test, grown=False), _auc_untrained(world, test, grown=True)
    print({"trained": round(trained, 3), "base": round(base, 3), "neutral": round(neutral, 3)})
    assert trained >= 0.8 and trained > base + 0.05 and trained > neutral + 0.05

    # evaluate accepts the run; register takes only the added market by default.
    runner = CliRunner()
    assert runner.invoke(app, ["evaluate", "--run", str(new), "--n-boot", "50"]).exit_code == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = runner.invoke(app, ["register", "--run", str(new), "--tracking-uri", uri])
    assert reg.exit_code == 0, reg.output
    from relevance.serving.registry import client_for

    names = {m.name for m in client_for(uri).search_registered_models()}
    assert "ads-relevance-de" in names and not {"ads-relevance-fr", "ads-relevance-us"} & names

    # select (the pipeline's step) also registers and gates only de; no shared LoRA exists for an added market.
    uri = f"sqlite:///{tmp_path / 'select.db'}"
    sel = runner.invoke(app, ["select", "--data", str(world["data"]), "--run", str(new), "--tracking-uri", uri, "--json"])
    assert sel.exit_code == 0, sel.output
    [decision] = json.loads(sel.stdout[sel.stdout.index("{"):])["decisions"]
    assert decision["market"] == "de" and decision["decision"] == "promoted", decision["reasons"]
    assert any("added to run" in r for r in decision["reasons"])
    versions = client_for(uri).search_model_versions()
    assert {v.name for v in versions} == {"ads-relevance-de"}
    assert {v.tags["added_from"] for v in versions} == {str(world["run"].absolute())}


@pytest.fixture(scope="module")
def bad_sources(world) -> dict[str, Path]:
    """A shared-LoRA run, a separate run, a merged model directory, RUN with a vanished base model, another base model."""
    from relevance.model.adapters import export_merged, load_adapter
    from relevance.model.cross_encoder import load_cross_encoder
    from relevance.model.tiny import build_tiny_model

    root = world["root"] / "bad"
    train(TrainConfig(data=str(world["data"]), method="lora", base_model=str(world["model"]), out=str(root / "lora"),
                      markets=OLD, max_steps=2, eval_every=2, batch_size=16, track=False, progress=False))
    train(TrainConfig(data=str(world["data"]), method="separate", base_model=str(world["model"]),
                      out=str(root / "separate"), markets=OLD, max_steps=2, eval_every=2, batch_size=16, track=False,
                      progress=False))
    model, tok = load_cross_encoder(world["model"], "cpu")
    load_adapter(model, world["run"] / "adapter")
    export_merged(model, "fr", root / "merged-fr", tok)
    shutil.copytree(world["run"], root / "moved", ignore=shutil.ignore_patterns("checkpoints"))
    info = json.loads((root / "moved" / "run_info.json").read_text())
    (root / "moved" / "run_info.json").write_text(json.dumps({**info, "base_model": str(root / "gone")}))
    build_tiny_model(root / "other", hidden=32, layers=1, heads=2, seed=1)
    return {"lora": root / "lora", "merged": root / "merged-fr", "moved": root / "moved", "other": root / "other",
            "separate": root / "separate"}


@pytest.mark.parametrize(("case", "match"), [
    ("exists", "markets ['fr'] already exist in run"),
    ("no_rows", "markets ['jp'] have no train rows"),
    ("other_base", "differs from the base model run"),
    ("missing_base", "recorded in"),
    ("merged", "is a merged/exported model directory"),
    ("lora", "method 'lora', which shares one adapter"),
    ("separate", "one model per market"),
])
def test_bad_input_exits_2_and_writes_nothing(world, bad_sources, tmp_path: Path, case: str, match: str) -> None:
    out = tmp_path / "out"
    source = {"merged": bad_sources["merged"], "lora": bad_sources["lora"], "separate": bad_sources["separate"],
              "missing_base": bad_sources["moved"]}.get(case, world["run"])
    market = {"exists": "fr", "no_rows": "jp"}.get(case, NEW)
    extra = ["--base-model", str(bad_sources["other"])] if case == "other_base" else []
    done = _add(world, out, *extra, market=market, source=source)
    assert done.exit_code == 2, done.output
    assert match in " ".join(done.output.split()), done.output
    assert not out.exists()


def test_interrupted_add_market_resumes_to_the_same_adapter(world, tmp_path: Path) -> None:
    kw = dict(max_steps=14, eval_every=5, checkpoint_every=5, batch_size=16, learning_rate=1e-2, seed=3,
              track=False, progress=False)
    reference = add_markets(world["run"], world["data"], [NEW], tmp_path / "ref", **kw)

    def crash(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        add_markets(world["run"], world["data"], [NEW], tmp_path / "cut", on_step=crash, **kw)
    assert not (tmp_path / "cut" / "run_info.json").exists()
    with pytest.raises(FileExistsError, match="pass --resume"):
        add_markets(world["run"], world["data"], [NEW], tmp_path / "cut", **kw)
    with pytest.raises(ValueError, match="other hyper-parameters"):
        add_markets(world["run"], world["data"], [NEW], tmp_path / "cut", head=True, **{**kw, "resume": True})
    resumed = add_markets(world["run"], world["data"], [NEW], tmp_path / "cut", **{**kw, "resume": True})
    a, b = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (tmp_path / "ref", tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert resumed.run_info["best_step"] == reference.run_info["best_step"]


@pytest.mark.parametrize(("method", "extra"), [("per-market-lora", {}), ("per-market-lora", {"shared_adapter": False}),
                                               ("moelora", {})], ids=["per-market-lora", "independent", "moelora"])
def test_other_task_conditioned_methods_grow_without_moving_old_markets(world, tmp_path: Path, method: str,
                                                                      extra: dict) -> None:
    run = tmp_path / "run"
    train(TrainConfig(data=str(world["data"]), method=method, base_model=str(world["model"]), out=str(run),
                      markets=OLD, max_steps=3, eval_every=3, batch_size=16, track=False, progress=False, **extra))
    result = add_markets(run, world["data"], [NEW], tmp_path / "grown", max_steps=3, eval_every=3, track=False,
                         progress=False)
    assert result.run_info["task_map"] == {"fr": 0, "us": 1, "de": 2}
    assert _merged_sha(run, "fr", tmp_path) == _merged_sha(tmp_path / "grown", "fr", tmp_path)


def test_added_per_market_lora_markets_start_neutral_not_shared() -> None:
    """A source run trained with a shared start: the add step must not route new markets to market 0's
    (frozen) adapter, so its config sets shared_start to 0."""
    from types import SimpleNamespace

    from relevance.training.add_market import make_config

    source = SimpleNamespace(train_config={"data": "ds", "method": "per-market-lora", "base_model": "m", "out": "run",
                                           "shared_start": 0.5, "max_steps": 20}, info={})
    config = make_config(source, "ds2", "new", ("hi",), "m", {})
    assert config.shared_start == 0.0 and config.shared_start_fraction == 0.0 and config.markets == ("hi",)
    # a run recorded before per-market LoRA had a shared adapter had none, whatever the default is now
    assert not config.uses_shared_adapter
    source.info = {"shared_adapter": True}
    assert make_config(source, "ds2", "new", ("hi",), "m", {}).uses_shared_adapter


@pytest.mark.parametrize("head", [False, True])
def test_a_head_started_run_grows_without_moving_old_markets(world, tmp_path: Path, head: bool) -> None:
    """RUN trained with --head-start: add-market inherits RUN's settings, yet must not refit the head the
    old markets score with (nor re-run the probe), so their merged models stay bit-identical."""
    run = tmp_path / "run"
    train(TrainConfig(data=str(world["data"]), method="mtl-lora", base_model=str(world["model"]), out=str(run),
                      markets=OLD, max_steps=3, eval_every=3, batch_size=16, head_start=64, track=False,
                      progress=False))
    assert json.loads((run / "run_info.json").read_text())["head_start"]["rows"] == 64
    grown = add_markets(run, world["data"], [NEW], tmp_path / "grown", head=head, max_steps=3, eval_every=3,
                        track=False, progress=False)
    assert grown.run_info["task_map"] == {"fr": 0, "us": 1, "de": 2}
    # with --head the added market's own head copy is probed; without, nothing is
    assert (grown.run_info["head_start"] or {}).get("heads", {}).keys() == ({NEW} if head else set())
    for market in OLD:
        assert _merged_sha(run, market, tmp_path) == _merged_sha(tmp_path / "grown", market, tmp_path)
