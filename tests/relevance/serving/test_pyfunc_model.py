"""The served model's batching: token-budget batches and tokenization one chunk ahead change no score."""

from __future__ import annotations

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
