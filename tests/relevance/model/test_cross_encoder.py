"""Tests for relevance.model.cross_encoder and relevance.model.tiny: loading, pair encoding, scoring."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from relevance.model.cross_encoder import (
    MARKET_TOKEN_FORMAT,
    ad_text,
    encode_frame,
    encode_pairs,
    load_cross_encoder,
    predict,
    predictions_frame,
    score,
    with_market_token,
)
from relevance.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden=32, layers=2, heads=2, seed=0)


@pytest.fixture(scope="module")
def loaded(tiny: Path):
    return load_cross_encoder(tiny)


def _frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    from relevance.data.demo_data import generate_market

    rng = np.random.default_rng(seed)
    cols = {**generate_market("de", n // 2, rng)}
    fr = generate_market("fr", n - n // 2, rng)
    df = pd.concat([pd.DataFrame(cols), pd.DataFrame(fr)], ignore_index=True)
    df.loc[::7, "ad_description"] = None
    return df


def test_tiny_model_loads_with_auto_classes_and_covers_demo_text(tiny: Path, loaded) -> None:
    from transformers import AutoConfig

    model, tok = loaded
    assert (tiny / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tiny).num_labels == 1
    assert tok.is_fast and model.config.num_labels == 1
    df = _frame(60)
    enc = encode_frame(tok, df, max_length=128)
    assert all(tok.unk_token_id not in ids for ids in enc["input_ids"]), "demo text must tokenize without [UNK]"


def test_tiny_model_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(str(build_tiny_model(tmp_path / "a", seed=3) / "model.safetensors"))
    b = load_file(str(build_tiny_model(tmp_path / "b", seed=3) / "model.safetensors"))
    c = load_file(str(build_tiny_model(tmp_path / "c", seed=4) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="hidden=30 is not divisible by heads=4"):
        build_tiny_model(tmp_path / "d", hidden=30, heads=4)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        build_tiny_model(tmp_path / "e", model_type="gpt2")


def test_missing_base_model_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist.*config.json"):
        load_cross_encoder(missing)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_cross_encoder(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_cross_encoder(tmp_path / "empty")
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # never reach for the network from a test
        with pytest.raises(FileNotFoundError, match="not a model name available offline"):
            load_cross_encoder("no-such-org/no-such-model")


def test_pair_encoding_truncates_only_the_ad(loaded) -> None:
    _, tok = loaded
    query = "apex black running shoes under €73"
    ad = "Apex Running Shoes – Black, Compact " + "compact black running shoes by apex. " * 20
    [ids] = encode_pairs(tok, [query], [ad], max_length=32)["input_ids"]
    full_query = tok(query, add_special_tokens=False)["input_ids"]
    assert len(ids) == 32
    assert ids[1: 1 + len(full_query)] == full_query, "the query must be kept whole"
    sep = tok.sep_token_id
    assert ids[1 + len(full_query)] == sep and ids[-1] == sep
    short = encode_pairs(tok, [query], ["Apex Shoes"], max_length=32)["input_ids"][0]
    assert len(short) < 32, "no padding in an unpadded encoding"


def test_overlong_query_is_clipped_to_half_and_the_ad_survives(loaded) -> None:
    _, tok = loaded
    query = "red bike " * 200
    [ids] = encode_pairs(tok, [query], ["Apex Bike – Red"], max_length=32)["input_ids"]
    ad_ids = tok("Apex Bike – Red", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 32
    assert ids[-1 - len(ad_ids): -1] == ad_ids


def test_market_token_form(loaded) -> None:
    _, tok = loaded
    assert MARKET_TOKEN_FORMAT == "[{market}] {query}"
    assert with_market_token("apex red bike", "de") == "[de] apex red bike"
    df = pd.DataFrame({"query": ["red bike"], "ad_title": ["Bike"], "ad_description": [None], "market": ["pt-br"]})
    ids = encode_frame(tok, df, market_token=True)["input_ids"][0]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["[CLS]", "[", "p"] and "]" in tokens[:8]
    assert ad_text("Bike", None) == "Bike" and ad_text("Bike", float("nan")) == "Bike"
    assert ad_text("Bike", "  Red. ") == "Bike Red."


def test_score_returns_probabilities_in_input_order(loaded) -> None:
    model, tok = loaded
    df = _frame(50)
    model.train()
    p = score(model, tok, df, batch_size=8, precision="fp32")
    assert model.training, "score restores the training mode it found"
    assert p.shape == (50,) and np.all((p > 0) & (p < 1))
    perm = np.random.default_rng(1).permutation(50)
    shuffled = score(model, tok, df.iloc[perm].reset_index(drop=True), batch_size=8, precision="fp32")
    np.testing.assert_allclose(shuffled, p[perm], atol=1e-6)
    one_by_one = np.array([score(model, tok, df.iloc[[i]], precision="fp32")[0] for i in range(0, 50, 10)])
    np.testing.assert_allclose(one_by_one, p[::10], atol=1e-5)  # padding does not change a score
    assert score(model, tok, df.iloc[:0]).shape == (0,)
    with pytest.raises(ValueError, match="precision='fp16' is invalid"):
        score(model, tok, df, precision="fp16")


@pytest.mark.parametrize("native", ["0", "1"])
def test_score_auto_is_bf16_only_on_native_hardware(loaded, monkeypatch, native: str) -> None:
    model, tok = loaded
    df = _frame(40)
    monkeypatch.setenv("ADS_RELEVANCE_NATIVE_BF16", native)
    fp32, auto = score(model, tok, df, precision="fp32"), score(model, tok, df)
    bf16 = score(model, tok, df, precision="bf16")
    np.testing.assert_array_equal(auto, bf16 if native == "1" else fp32)
    assert 0 < np.abs(bf16 - fp32).max() < 0.01 and np.corrcoef(bf16, fp32)[0, 1] > 0.99
    assert len(np.unique(bf16)) == len(df), "an fp32 head: no bf16 logit ties"


def test_predictions_frame_keeps_query_id_when_the_input_has_it(loaded) -> None:
    """The evaluation resamples query_id clusters, so the predictions must carry them."""
    df = pd.DataFrame({"example_id": ["a", "b", "c"], "market": "de", "label": [1, 0, 1],
                       "query_id": ["q1", "q1", None], "query": "x", "ad_title": "y", "ad_description": None})
    out = predictions_frame(df, np.array([0.9, 0.1, 0.5]))
    assert list(out.columns) == ["example_id", "market", "label", "score", "query_id"]
    assert out["query_id"].iloc[:2].tolist() == ["q1", "q1"]
    assert out["query_id"].isna().tolist() == [False, False, True]
    assert out["label"].dtype == "int64"
    bare = predictions_frame(df.drop(columns="query_id"), np.array([0.9, 0.1, 0.5]))
    assert list(bare.columns) == ["example_id", "market", "label", "score"]
    model, tok = loaded
    assert predict(model, tok, df)["query_id"].iloc[:2].tolist() == ["q1", "q1"]


def test_score_routes_task_ids_for_a_task_conditioned_model(tiny: Path) -> None:
    from relevance.model.adapters import AdapterConfig, inject

    model, tok = load_cross_encoder(tiny)
    inject(model, AdapterConfig("mtl-lora", markets=("de", "fr"), r=4, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".lam." in name or "mix_logits" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    df = _frame(30)
    mixed = score(model, tok, df, batch_size=7, precision="fp32")
    for market in ("de", "fr"):
        rows = df["market"] == market
        np.testing.assert_allclose(score(model, tok, df[rows], precision="fp32"), mixed[rows.to_numpy()], atol=1e-6)
    as_fr = score(model, tok, df.assign(market="fr"), precision="fp32")
    assert np.abs(as_fr - mixed)[df["market"].to_numpy() == "de"].max() > 1e-4, "market must change the score"
    swapped = score(model, tok, df, task_map={"de": 1, "fr": 0}, precision="fp32")
    np.testing.assert_allclose(swapped[df["market"].to_numpy() == "de"], as_fr[df["market"].to_numpy() == "de"], atol=1e-6)
    with pytest.raises(KeyError, match="unknown market 'jp'"):
        score(model, tok, df.assign(market="jp"))
    with pytest.raises(ValueError, match="'market' column"):
        score(model, tok, df.drop(columns="market"))


def test_a_base_without_pooler_weights_is_reported(tmp_path: Path, tiny: Path, caplog) -> None:
    """multilingual-e5 ships no pooler: loading must say so, or a reload silently changes the model."""
    import logging

    from safetensors.torch import load_file, save_file

    from relevance.model.cross_encoder import load_cross_encoder

    bare = tmp_path / "no-pooler"
    bare.mkdir()
    for f in tiny.iterdir():
        if f.name != "model.safetensors":
            (bare / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(tiny / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".pooler." not in k}, str(bare / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="relevance.model.cross_encoder"):
        load_cross_encoder(tiny)
    ours = lambda: [r for r in caplog.records if r.name == "relevance.model.cross_encoder"]  # noqa: E731
    assert not ours()  # the tiny model has a pooler: only the new head is missing, no warning
    with caplog.at_level(logging.WARNING, logger="relevance.model.cross_encoder"):
        load_cross_encoder(bare)
    assert "no weights for bert.pooler.dense" in caplog.text and "--modules-to-save classifier,pooler" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="relevance.model.cross_encoder"):
        load_cross_encoder(bare, saved_modules=("classifier", "pooler"))
    assert not ours()  # trained and saved with the adapter: nothing to warn about
