"""fp32/bf16 parity: the comparison maths, the bf16 copy of a served model, and what auto then chooses."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from relevance.data.demo_data import generate_market
from relevance.model.tiny import build_tiny_model
from relevance.serving import parity
from relevance.serving.pyfunc_model import RelevanceModel, bf16_copy


def test_compare_passes_equal_rankings_and_names_what_fails() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) + 0.3 * y
    same = parity.compare(y, s, s + 1e-7)
    assert same["ok"] and same["auc_delta"] == 0.0 and same["corr"] == pytest.approx(1.0)
    noisy = parity.compare(y, s, s + rng.normal(0, 0.3, 200))
    assert not noisy["ok"] and abs(noisy["auc_delta"]) > parity.MAX_AUC_DELTA
    assert "> 0.00100" in noisy["reason"] and noisy["auc_tolerance"] == parity.MAX_AUC_DELTA
    bent = parity.compare(y, s, s ** 6)  # the same ranking, other scores: a threshold would move
    assert bent["auc_delta"] == 0.0 and not bent["ok"] and "correlation" in bent["reason"]
    one_label = parity.compare(np.ones(50), s[:50], s[:50])
    assert not one_label["ok"] and "one label" in one_label["reason"]
    few = parity.compare(y[:5], s[:5], s[:5])
    assert not few["ok"] and "fewer than" in few["reason"]
    tags = parity.parity_tags(noisy)
    assert tags["bf16_ok"] == "false" and float(tags["bf16_parity_auc_delta"]) == noisy["auc_delta"]


def test_the_auc_bar_is_one_swapped_pair_where_auc_is_coarser_than_0_001() -> None:
    """20 positives × 40 negatives (a 60-row valid split): AUC moves in steps of 1/800 = 0.00125."""
    rng = np.random.default_rng(1)
    y = np.array([1] * 20 + [0] * 40)
    fp32 = 0.5 * y + rng.random(60)  # a good, imperfect ranking
    order = np.argsort(fp32)
    # adjacent positive-above-negative pairs in fp32's order: swapping one pair's scores moves AUC by one step
    flips = [(order[i], order[i + 1]) for i in range(59) if y[order[i]] == 0 and y[order[i + 1]] == 1]
    assert len(flips) >= 2

    def swapped(pairs):
        s = fp32.copy()
        for a, b in pairs:
            s[a], s[b] = s[b], s[a]
        return s

    one = parity.compare(y, fp32, swapped(flips[:1]))
    assert one["auc_tolerance"] == pytest.approx(1 / 800)
    assert abs(one["auc_delta"]) == pytest.approx(1 / 800) and one["corr"] >= parity.MIN_CORR and one["ok"]
    two = parity.compare(y, fp32, swapped(flips[:2]))
    assert abs(two["auc_delta"]) == pytest.approx(2 / 800) and not two["ok"] and "> 0.00125" in two["reason"]
    big = np.repeat(y, 10)  # 200 × 400 pairs: the 0.001 bar itself is finer than one pair, so it holds
    assert parity.auc_tolerance(big) == parity.MAX_AUC_DELTA


def test_parity_rows_keep_whole_queries(tmp_path) -> None:
    from tests.relevance.serving.test_registry import make_frame, write_curated

    ds = write_curated(tmp_path / "ds", make_frame(60))
    rows = parity.parity_rows(ds, "de", max_rows=25)
    full = parity.parity_rows(ds, "de")
    assert 0 < len(rows) <= 25 and len(full) == 60
    kept = set(rows["query_id"])
    assert len(full[full["query_id"].isin(kept)]) == len(rows), "a query is kept whole or not at all"
    assert parity.parity_rows(tmp_path / "missing", "de") is None and parity.parity_rows(None, "de") is None


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> RelevanceModel:
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", initializer_range=0.2)
    model = RelevanceModel()
    model.load_context(SimpleNamespace(model_config={"market": "de", "max_length": 64}, artifacts={"model": str(path)}))
    return model


def test_bf16_copy_casts_the_weights_and_keeps_the_head_and_the_fp32_model(served) -> None:
    rows = pd.DataFrame(generate_market("de", 120, np.random.default_rng(3)))
    fp32 = served.score_frame(rows, precision="fp32")
    bf16 = served.score_frame(rows, precision="bf16")
    copy = served.model_for("bf16")
    assert copy is served.model_for("bf16"), "the bf16 copy is made once"
    assert copy.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    assert copy.classifier.weight.dtype == torch.float32, "the head stays fp32"
    assert served.model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.float32
    assert 0 < np.max(np.abs(fp32 - bf16)) < 0.02, "really bf16, and close"
    assert np.corrcoef(fp32, bf16)[0, 1] > 0.999
    np.testing.assert_array_equal(served.score_frame(rows, precision="fp32"), fp32)
    measured = parity.measure(served, rows.assign(query_id=rows["query"]))
    assert measured["n"] == 120 and measured["corr"] > 0.999 and measured["auc_fp32"] is not None


def test_bf16_copy_equals_copying_then_casting_and_shares_no_storage(served) -> None:
    """The memo-based copy gives the bits of the plain form (deepcopy the fp32 model, cast, head back to fp32)."""
    quick = bf16_copy(served.model)
    plain = copy.deepcopy(served.model).to(torch.bfloat16)
    plain.classifier.float()
    want, got = plain.state_dict(), quick.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    originals = {p.data_ptr() for p in served.model.parameters()}
    assert not originals & {p.data_ptr() for p in quick.parameters()}, "the copy owns its weights"
    assert all(p.dtype == torch.float32 for p in served.model.parameters()), "the fp32 model is untouched"


@pytest.mark.parametrize("native, recorded, expected", [
    ("1", {"ok": True}, "bf16"), ("1", {"ok": False}, "fp32"), ("1", None, "fp32"), ("0", {"ok": True}, "fp32")])
def test_auto_needs_native_bf16_and_parity(served, monkeypatch, native, recorded, expected) -> None:
    monkeypatch.setenv("ADS_RELEVANCE_NATIVE_BF16", native)
    monkeypatch.setitem(served.config, "bf16_parity", recorded)
    assert served.resolve_precision("auto") == expected
    assert served.resolve_precision("fp32") == "fp32" and served.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="precision='half' is invalid"):
        served.resolve_precision("half")


@pytest.mark.parametrize(("native", "level"), [("1", "WARNING"), ("0", "INFO")])
def test_a_failed_parity_warns_only_where_auto_would_use_bf16(monkeypatch, caplog, native, level) -> None:
    monkeypatch.setenv("ADS_RELEVANCE_NATIVE_BF16", native)
    caplog.set_level("INFO", logger=parity.__name__)
    parity.report_failed("de", "/runs/x", {"ok": False, "reason": "|AUC delta| 0.0030 > 0.001"})
    (record,) = [r for r in caplog.records if r.name == parity.__name__]
    assert record.levelname == level
    assert "de" in record.getMessage() and "0.0030" in record.getMessage()


class _Kernels:
    """A served model whose bf16 scores swap ``swaps[kernel]`` adjacent positive-above-negative pairs."""

    def __init__(self, swaps: dict[bool, int]) -> None:
        self.swaps, self.cpu_attention, self.calls = swaps, True, []
        self.model = SimpleNamespace(device=torch.device("cpu"))
        rng = np.random.default_rng(4)
        self.labels = np.array([1] * 20 + [0] * 40)
        self.fp32 = 0.5 * self.labels + rng.random(60)

    def set_cpu_attention(self, enabled: bool) -> None:
        self.cpu_attention = enabled

    def score_frame(self, rows, batch_size: int, precision: str) -> np.ndarray:
        self.calls.append((precision, self.cpu_attention))
        if precision == "fp32":
            return self.fp32
        s, order = self.fp32.copy(), np.argsort(self.fp32)
        flips = [(order[i], order[i + 1]) for i in range(59) if self.labels[order[i]] == 0 and self.labels[order[i + 1]] == 1]
        for a, b in flips[: self.swaps[self.cpu_attention]]:
            s[a], s[b] = s[b], s[a]
        return s


@pytest.mark.parametrize("cpu_swaps, sdpa_swaps, ok, cpu_attention", [
    (1, 0, True, True),  # the engine's kernel holds: kept, sdpa never measured
    (2, 1, True, False),  # it fails and sdpa holds: sdpa recorded
    (2, 2, False, True)])  # neither: fp32 under auto whatever the kernel
def test_parity_falls_back_to_sdpa_where_the_cpu_attention_fails(cpu_swaps, sdpa_swaps, ok, cpu_attention) -> None:
    model = _Kernels({True: cpu_swaps, False: sdpa_swaps})
    rows = pd.DataFrame({"label": model.labels})
    result = parity.measure(model, rows)
    assert result["ok"] is ok and result["cpu_attention"] is cpu_attention and model.cpu_attention is cpu_attention
    assert ("bf16", False) in model.calls if cpu_swaps > 1 else ("bf16", False) not in model.calls
    if not cpu_attention:
        assert "> 0.00125" in result["cpu_attention_reason"] and result["auc_delta"] == pytest.approx(-1 / 800)
    assert parity.parity_tags(result)["bf16_parity_cpu_attention"] == str(cpu_attention).lower()


def test_the_recorded_kernel_is_the_one_the_bf16_copy_runs(tmp_path) -> None:
    from relevance.serving.pyfunc_model import CPU_ATTENTION

    path = build_tiny_model(tmp_path / "m", initializer_range=0.2)
    model = RelevanceModel()
    model.load_context(SimpleNamespace(artifacts={"model": str(path)}, model_config={
        "market": "de", "max_length": 64, "bf16_parity": {"ok": True, "cpu_attention": False}}))
    assert model.model_for("bf16").config._attn_implementation == "sdpa"
    model.set_cpu_attention(True)
    assert model.model_for("bf16").config._attn_implementation == CPU_ATTENTION, "a new copy with the other kernel"
    unrecorded = RelevanceModel()  # a parity record without the field, or none: the engine's kernel
    unrecorded.load_context(SimpleNamespace(artifacts={"model": str(path)}, model_config={"market": "de"}))
    assert unrecorded.cpu_attention is True
