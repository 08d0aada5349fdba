"""The served model's batching: token-budget batches and tokenization one chunk ahead change no score."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from relevance.data.demo_data import generate_market
from relevance.model.tiny import build_tiny_model
from relevance.serving import pyfunc_model
from relevance.serving.pyfunc_model import RelevanceModel, token_batches


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_batches_cover_every_row_once_within_the_budget(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 130, 500).tolist()
    batches = token_batches(lengths, max_rows=40, max_tokens=1024)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))
    assert [lengths[i] for i in flat] == sorted(lengths), "length-sorted, so padding is small"
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 40 and (len(b) * longest <= 1024 or len(b) == 1)
    # a closed batch was full: one more row would have broken a limit
    for b, nxt in zip(batches, batches[1:]):
        grown = len(b) + 1
        assert grown > 40 or grown * lengths[nxt[0]] > 1024
    assert token_batches([], 8, 64) == [] and [len(b) for b in token_batches([500], 8, 64)] == [1]


def test_chunked_scoring_equals_scoring_row_by_row(tmp_path, monkeypatch) -> None:
    path = build_tiny_model(tmp_path / "m", initializer_range=0.2)
    model = RelevanceModel()
    model.load_context(SimpleNamespace(model_config={"market": "de", "max_length": 48}, artifacts={"model": str(path)}))
    df = pd.DataFrame(generate_market("de", 90, np.random.default_rng(5)))
    df.loc[3, "ad_description"] = "long " * 200  # truncated pairs beside short ones
    one_by_one = np.array([model.score_frame(df.iloc[[i]], precision="fp32")[0] for i in range(len(df))])
    monkeypatch.setattr(pyfunc_model, "CHUNK_ROWS", 16)  # 6 chunks, the producer thread runs ahead
    chunked = model.score_frame(df, batch_size=4, precision="fp32")
    np.testing.assert_allclose(chunked, one_by_one, atol=1e-6)


def test_concurrent_requests_keep_their_truncation(tmp_path, monkeypatch) -> None:
    """``mlflow models serve`` scores concurrent requests in threads on one model: one request's query
    clipping (a tokenizer call without truncation) must not slip between another's truncation setting
    and its encoding. The window is widened (a sleep after transformers sets truncation) so that, without
    the lock in ``encode``, the threads interleave on every try."""
    import threading
    import time

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m"))
    setting = tokenizer.set_truncation_and_padding

    def slow_setting(*args, **kwargs):
        setting(*args, **kwargs)
        time.sleep(0.005)

    monkeypatch.setattr(tokenizer, "set_truncation_and_padding", slow_setting)
    long_ad, errors, lengths = " ".join(["shoes"] * 300), [], []

    def request(queries: list[str], ads: list[str]) -> None:
        try:
            for _ in range(15):
                lengths.extend(len(ids) for ids in pyfunc_model.encode(tokenizer, queries, ads, 32)["input_ids"])
        except Exception as exc:  # noqa: BLE001 - a failed request is what the test looks for
            errors.append(repr(exc))

    threads = [threading.Thread(target=request, args=(["shoes"] * 4, [long_ad] * 4)),  # truncated ads
               threading.Thread(target=request, args=(["running shoes for men, waterproof " * 4] * 4, ["x"] * 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(lengths) == 2 * 15 * 4
    assert max(lengths) <= 32


def _save_pyfunc(src, out) -> str:
    """``src`` packaged as the pyfunc (as ``packaging.package_model`` does, without a training run)."""
    import mlflow

    from relevance.serving.packaging import PYFUNC_FILE

    mlflow.pyfunc.save_model(str(out), python_model=str(PYFUNC_FILE), artifacts={"model": str(src)},
                             model_config={"market": "de", "max_length": 48}, pip_requirements=["mlflow"])
    return str(out)


def test_models_with_identical_tokenizer_files_share_one_tokenizer(tmp_path) -> None:
    """MLflow runs the pyfunc file as a fresh module for every model it loads; two markets' models with
    byte-identical tokenizer files still load the tokenizer once and share its lock, a model whose
    tokenizer files differ gets its own, and sharing changes no score."""
    import json
    import shutil

    import mlflow
    from transformers import AutoTokenizer

    a = build_tiny_model(tmp_path / "a", seed=1, initializer_range=0.2)
    b = build_tiny_model(tmp_path / "b", seed=2, initializer_range=0.2)  # other weights, same tokenizer files
    c = Path(shutil.copytree(a, tmp_path / "c"))
    config = json.loads((c / "tokenizer_config.json").read_text())
    (c / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    models = [mlflow.pyfunc.load_model(_save_pyfunc(src, tmp_path / f"pyfunc-{src.name}")).unwrap_python_model()
              for src in (a, b, c)]
    assert type(models[0]).__module__ != type(models[1]).__module__, "each model runs its own module copy"
    assert models[0].tokenizer is models[1].tokenizer and models[0]._shared.lock is models[1]._shared.lock
    assert models[2].tokenizer is not models[0].tokenizer and models[2]._shared.lock is not models[0]._shared.lock

    df = pd.DataFrame(generate_market("de", 40, np.random.default_rng(3)))
    shared = models[1].score_frame(df, precision="fp32")
    models[1].tokenizer = AutoTokenizer.from_pretrained(b)  # as it was loaded before tokenizers were shared
    np.testing.assert_array_equal(models[1].score_frame(df, precision="fp32"), shared)
    assert not np.allclose(models[0].score_frame(df, precision="fp32"), shared), "the weights are each model's"


def test_a_shared_tokenizer_is_freed_with_its_last_model(tmp_path) -> None:
    import gc

    from relevance.serving.pyfunc_model import shared_tokenizer, tokenizer_key

    path = build_tiny_model(tmp_path / "m")
    def load() -> RelevanceModel:
        model = RelevanceModel()
        model.load_context(SimpleNamespace(model_config={"market": "de"}, artifacts={"model": str(path)}))
        return model

    models = [load(), load()]
    entries = sys.modules[pyfunc_model._SHARED_TOKENIZERS].entries
    assert models[0].tokenizer is models[1].tokenizer is shared_tokenizer(path).tokenizer
    key = tokenizer_key(path)
    del models[0]
    gc.collect()
    assert key in entries, "still used by the second model"
    del models
    gc.collect()
    assert key not in entries
