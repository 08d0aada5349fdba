"""Precision resolution: auto follows the hardware (CPU flags, CUDA), fp32/bf16 force it."""

from __future__ import annotations

import pytest
import torch

from relevance.model import precision as P
from relevance.serving import pyfunc_model


def test_check_precision_names_the_bad_value() -> None:
    assert [P.check_precision(p) for p in P.PRECISIONS] == list(P.PRECISIONS)
    with pytest.raises(ValueError, match=r"precision='fp16' is invalid.*auto"):
        P.check_precision("fp16")


@pytest.mark.parametrize("flag, expected", [("1", "bf16"), ("0", "fp32")])
def test_auto_follows_the_hardware_and_forced_values_do_not(monkeypatch, flag: str, expected: str) -> None:
    monkeypatch.setenv(P.OVERRIDE_ENV, flag)
    assert P.resolve_precision("auto", "cpu") == expected
    assert P.resolve_precision("fp32", "cpu") == "fp32" and P.resolve_precision("bf16", "cpu") == "bf16"
    with P.autocast("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")
    with P.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_cpu_detection_reads_the_kernel_vendor_and_flags(monkeypatch) -> None:
    monkeypatch.delenv(P.OVERRIDE_ENV, raising=False)
    vendor, flags = P._cpu_info()
    text = open("/proc/cpuinfo").read() if P.platform.system() == "Linux" else ""
    assert (vendor in text) and all(f in text for f in flags)
    assert P.native_bf16("cpu") == P.cpu_computes_bf16(vendor, flags)
    cases = {  # (vendor, flags): native?
        ("GenuineIntel", ("avx2", "avx512f")): False,  # no bf16 extension: emulated, fp32 is faster
        ("AuthenticAMD", ("avx2", "avx512f")): False,
        ("GenuineIntel", ("avx512f", "avx512_bf16")): False,  # measured slower than fp32 (module doc)
        ("AuthenticAMD", ("avx512f", "avx512_bf16")): True,  # Zen 4: 2.4x fp32's GEMM rate
        ("GenuineIntel", ("avx512f", "avx512_bf16", "amx_bf16")): True,
        ("", ("amx_bf16",)): True,
    }
    for (vendor, names), expected in cases.items():
        monkeypatch.setattr(P, "_cpu_info", lambda v=vendor, n=names: (v, frozenset(n)))
        assert P.native_bf16("cpu") is expected, (vendor, names)
    monkeypatch.setenv(P.OVERRIDE_ENV, "yes")
    with pytest.raises(ValueError, match="ADS_RELEVANCE_NATIVE_BF16='yes'"):
        P.native_bf16("cpu")


def test_the_self_contained_pyfunc_detects_the_same(monkeypatch) -> None:
    """pyfunc_model.py repeats the detection (it may import nothing of this project)."""
    monkeypatch.delenv(P.OVERRIDE_ENV, raising=False)
    assert pyfunc_model.native_bf16(torch.device("cpu")) == P.native_bf16("cpu")
    for flag in ("0", "1"):
        monkeypatch.setenv(P.OVERRIDE_ENV, flag)
        assert pyfunc_model.native_bf16(torch.device("cpu")) == P.native_bf16("cpu")
    assert pyfunc_model.PRECISIONS == P.PRECISIONS


def test_fp32_head_runs_the_head_outside_autocast_and_restores_it(tmp_path) -> None:
    from relevance.model.tiny import build_tiny_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(build_tiny_model(tmp_path / "m")).eval()
    ids = torch.randint(5, 50, (3, 9))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
        with P.fp32_head(model):
            logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    assert "forward" not in vars(model.classifier), "the class's forward is back"
    assert P.classification_head(torch.nn.Linear(2, 2)) is None
    with P.fp32_head(torch.nn.Linear(2, 2)):
        pass
