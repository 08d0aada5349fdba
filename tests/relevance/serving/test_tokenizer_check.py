"""The registration check that lets a model's tokenizer load as a plain fast tokenizer, on tiny tokenizers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from relevance.model.tiny import build_tiny_model, build_tiny_tokenizer
from relevance.serving.pyfunc_model import RelevanceModel, encode, load_tokenizer
from relevance.serving.tokenizer_check import PROBES, check_generic_tokenizer, compare_tokenizers, tokenizer_tags

ROWS_QUERIES = ["red bike", "TENT for two", "  ", "phone case " * 30]
ROWS_ADS = ["Apex Bike – Red", "Nordic Tent", "x", "Vexa Phone Case"]


@pytest.fixture()
def saved(tmp_path):
    build_tiny_tokenizer(tmp_path / "tok")
    return tmp_path / "tok"


def test_a_saved_tokenizer_loads_generically_with_its_input_names_and_encodes_alike(saved):
    named = load_tokenizer(saved)
    encode(named, ROWS_QUERIES, ROWS_ADS, 16)  # a used tokenizer keeps its last truncation: not a difference
    check = check_generic_tokenizer(saved, named, None, None, False, 32)
    assert check["ok"] and check["reason"] is None and check["n"] == 2 * len(PROBES)
    assert check["arguments"] == {"model_input_names": list(named.model_input_names)}
    assert "token_type_ids" in check["arguments"]["model_input_names"]  # BERT's pairs need their segments
    generic = load_tokenizer(saved, check["arguments"])
    assert type(generic) is not type(named)
    assert type(generic).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert encode(generic, ROWS_QUERIES, ROWS_ADS, 16) == encode(named, ROWS_QUERIES, ROWS_ADS, 16)
    assert tokenizer_tags(check) == {"generic_tokenizer": "true"}


def test_without_the_class_input_names_the_plain_tokenizer_differs(saved):
    named, plain = load_tokenizer(saved), load_tokenizer(saved, {})
    assert "model_input_names differs" in compare_tokenizers(named, plain, ROWS_QUERIES, ROWS_ADS, 16)


def test_a_tokenizer_json_that_is_not_the_class_backend_is_refused(saved):
    spec = json.loads((saved / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False  # the class (do_lower_case) still lower-cases
    (saved / "tokenizer.json").write_text(json.dumps(spec))
    named = load_tokenizer(saved)
    check = check_generic_tokenizer(saved, named, None, None, False, 32)
    assert not check["ok"] and check["arguments"] is None
    assert "not the backend that" in check["reason"]
    assert "not the backend" in tokenizer_tags(check)["generic_tokenizer_reason"]


def test_a_class_with_its_own_encoding_method_is_refused(saved):
    named = load_tokenizer(saved)

    class Custom(type(named)):  # same files, same backend, but behaviour of its own
        def _encode_plus(self, *args, **kwargs):  # pragma: no cover - the check refuses before any call
            raise AssertionError

    generic = load_tokenizer(saved, {"model_input_names": list(named.model_input_names)})
    reason = compare_tokenizers(Custom.from_pretrained(saved), generic, ROWS_QUERIES, ROWS_ADS, 16)
    assert reason == "Custom overrides ['_encode_plus']"


def test_a_tokenizer_with_a_token_of_its_own_is_refused(saved):
    named = load_tokenizer(saved)
    generic = load_tokenizer(saved, {"model_input_names": list(named.model_input_names)})
    generic.add_tokens(["bike"])  # a new token the other does not have: the backends no longer serialise alike
    assert "not the backend" in compare_tokenizers(named, generic, ROWS_QUERIES, ROWS_ADS, 16)


def test_a_directory_without_tokenizer_json_keeps_auto_tokenizer(saved):
    (saved / "tokenizer.json").unlink()
    check = check_generic_tokenizer(saved, load_tokenizer(saved), None, None, False, 32)
    assert not check["ok"] and check["reason"] == "no tokenizer.json" and check["arguments"] is None


def test_the_pyfunc_loads_the_tokenizer_its_config_names(tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny")
    named = load_tokenizer(model_dir)
    arguments = check_generic_tokenizer(model_dir, named, None, None, False, 32)["arguments"]
    assert arguments is not None
    loaded = {}
    for key, config in (("auto", {}), ("generic", {"generic_tokenizer": arguments})):
        model = RelevanceModel()
        model.load_context(SimpleNamespace(model_config={"market": "de", "max_length": 32, **config},
                                           artifacts={"model": str(model_dir)}))
        loaded[key] = model
    assert type(loaded["auto"].tokenizer) is type(named)
    assert type(loaded["generic"].tokenizer) is not type(named)
    assert loaded["generic"]._shared is not loaded["auto"]._shared  # cached apart: one per loader
    rows = pd.DataFrame({"query": ROWS_QUERIES, "ad_title": ROWS_ADS})
    generic_scores = loaded["generic"].score_frame(rows, precision="fp32")
    assert (generic_scores == loaded["auto"].score_frame(rows, precision="fp32")).all()
