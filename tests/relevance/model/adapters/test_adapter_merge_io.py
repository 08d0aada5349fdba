"""Merge / unmerge, merged copies, export to a plain transformers directory, save / load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_helpers import ARCHS, SHARED_PML, VOCAB, adapter_config, inputs_for, logits, randomize, tiny_bert
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast

from relevance.model.adapters import (
    AdapterConfig,
    AdapterLayer,
    adapter_layers,
    base_config_fingerprint,
    export_merged,
    get_adapter_config,
    inject,
    load_adapter,
    merge,
    merged_copy,
    read_adapter_config,
    save_adapter,
    unmerge,
    use_tasks,
)

MARKETS = ("us", "de", "fr")  # de 0, fr 1, us 2
METHODS = ["mtl-lora", "lora", "per-market-lora", SHARED_PML, "multilora", "moelora"]


def adapted(arch: str = "bert", method: str = "mtl-lora", seed: int = 0) -> nn.Module:
    model = inject(ARCHS[arch](seed), adapter_config(method, MARKETS))
    randomize(model, seed + 10)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)  # trained-looking head, so a lost head would show
    return model


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.base.weight.detach().clone() for n, m in adapter_layers(model).items()}


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_restores_and_merged_forward_matches(method: str) -> None:
    model = adapted(method=method)
    inputs = inputs_for(model)
    fr = torch.full((6,), 1)
    want = logits(model, inputs, fr)
    before = base_weights(model)
    merge(model, "fr")
    assert any(not torch.equal(before[n], m.base.weight) for n, m in adapter_layers(model).items())
    torch.testing.assert_close(logits(model, inputs, fr), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, inputs, None), want, atol=1e-5, rtol=1e-5)
    unmerge(model)
    for n, m in adapter_layers(model).items():
        torch.testing.assert_close(m.base.weight, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs, fr), want, atol=1e-5, rtol=1e-5)


def test_merge_errors() -> None:
    model = adapted()
    with pytest.raises(ValueError, match="unknown market 'jp'.*\\['de', 'fr', 'us'\\]"):
        merge(model, "jp")
    with pytest.raises(ValueError, match="one update per market"):
        merge(model, None)
    merge(model, "de")
    with pytest.raises(ValueError, match="already merged"):
        merge(model, "us")
    with pytest.raises(ValueError, match="merged for task 0"), use_tasks(model, torch.tensor([0, 1])):
        model(**inputs_for(model, n=2))
    unmerge(model)
    unmerge(model)  # idempotent


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", METHODS)
def test_merged_copy_is_plain_and_matches(arch: str, method: str) -> None:
    model = adapted(arch, method, seed=1)
    inputs = inputs_for(model)
    for market, t in (("de", 0), ("us", 2)):
        want = logits(model, inputs, torch.full((6,), t))
        plain = merged_copy(model, market)
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert not hasattr(plain, "adapter_config")
        assert all(p.requires_grad for p in plain.parameters())
        assert set(plain.state_dict()) == set(ARCHS[arch]().state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain(**inputs).logits, want, atol=1e-5, rtol=1e-5)
    assert adapter_layers(model) and not any(m.is_merged for m in adapter_layers(model).values())


def tiny_tokenizer(tmp_path: Path) -> BertTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_merged_loads_without_project_code(arch: str, tmp_path: Path) -> None:
    model = adapted(arch, "mtl-lora", seed=2)
    inputs = inputs_for(model)
    want = logits(model, inputs, torch.full((6,), 1))
    tok = tiny_tokenizer(tmp_path) if arch == "bert" else None
    out = export_merged(model, "fr", tmp_path / "fr", tokenizer=tok)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(reloaded) is type(ARCHS[arch]())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, want, atol=1e-5, rtol=1e-5)
    if tok is not None:
        assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == tok("w1 w2")["input_ids"]


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method: str, tmp_path: Path) -> None:
    model = adapted(method=method, seed=3)
    inputs = inputs_for(model)
    ids = torch.tensor([0, 1, 2, 2, 1, 0])
    want = logits(model, inputs, ids)
    save_adapter(model, tmp_path, base_model_name="tiny-bert")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == adapter_config(method, MARKETS).method and meta["base_model_name"] == "tiny-bert"
    assert meta["config"]["shared_adapter"] is (method == SHARED_PML)
    assert meta["task_map"] == {"de": 0, "fr": 1, "us": 2}
    assert meta["target_modules"] == ["query", "key", "value", "attention.output.dense"]
    assert meta["config"]["r"] == 8 and meta["base_config_fingerprint"] == base_config_fingerprint(model)
    assert len(meta["adapted_layers"]) == 8
    fresh = tiny_bert(3)  # same base weights, new (random) head and no adapters
    loaded = load_adapter(fresh, tmp_path)
    assert loaded is fresh and get_adapter_config(loaded) == get_adapter_config(model)
    assert torch.equal(logits(loaded, inputs, ids), want)
    again = load_adapter(loaded, tmp_path)  # onto the same adapter: allowed
    assert torch.equal(logits(again, inputs, ids), want)


def test_fingerprint_ignores_bookkeeping_but_not_architecture() -> None:
    a, b = tiny_bert(0), tiny_bert(1)
    b.config._name_or_path = "somewhere/else"
    b.config.hidden_dropout_prob = 0.3
    assert base_config_fingerprint(a) == base_config_fingerprint(b)
    assert base_config_fingerprint(a) != base_config_fingerprint(tiny_bert(hidden=48))
    assert len(base_config_fingerprint(a.config)) == 64


def test_load_errors(tmp_path: Path) -> None:
    model = adapted(seed=4)
    save_adapter(model, tmp_path / "a", base_model_name="tiny-bert")
    with pytest.raises(ValueError, match="different base model: 'tiny-bert'"):
        load_adapter(tiny_bert(hidden=48), tmp_path / "a")
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(ARCHS["distilbert"](), tmp_path / "a")
    other = inject(tiny_bert(), AdapterConfig("lora"))
    with pytest.raises(ValueError, match="already has a different adapter"):
        load_adapter(other, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        load_adapter(tiny_bert(), tmp_path / "missing")
    with pytest.raises(ValueError, match="base_model_name"):
        save_adapter(model, tmp_path / "b", base_model_name="")
    meta_path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    meta["task_map"] = {"de": 1, "fr": 0, "us": 2}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="disagrees"):
        read_adapter_config(tmp_path / "a")
