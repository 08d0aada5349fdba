"""bf16 scoring's CPU attention (``pyfunc_model.cpu_bf16_attention``) against sdpa and an fp32 reference."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from relevance.data.demo_data import generate_market
from relevance.model.tiny import build_tiny_model
from relevance.serving import pyfunc_model
from relevance.serving.pyfunc_model import CPU_ATTENTION, RelevanceModel, bf16_copy, cpu_bf16_attention

ENCODER = SimpleNamespace(is_causal=False)  # what the attention function reads of its module


@pytest.fixture(autouse=True)
def _kernel_covers_up_to_256_keys(monkeypatch):
    """The arithmetic is tested on every CPU: an AMX CPU would hand inputs over 32 keys to sdpa."""
    monkeypatch.setattr(pyfunc_model, "cpu_flags", lambda: ("AuthenticAMD", frozenset({"avx512_bf16"})))


def _inputs(seed: int, b: int = 6, h: int = 4, length: int = 37, d: int = 16, dtype=torch.bfloat16):
    """Random q, k, v (B, H, L, D) and a key-padding mask with a different length per example."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g).to(dtype) for _ in range(3))
    lengths = torch.randint(length // 3, length + 1, (b,), generator=g)
    lengths[0] = length
    keep = torch.arange(length)[None, :] < lengths[:, None]  # (B, L)
    return q, k, v, keep


def _reference(q, k, v, mask):
    """fp32 sdpa (math) on the same bf16 inputs, in transformers' (B, L, H, D) layout."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none", "shared"])
def test_it_matches_fp32_attention_as_closely_as_sdpa_bf16_does(seed: int, mask_kind: str) -> None:
    q, k, v, keep = _inputs(seed)
    b, _, length, _ = q.shape
    mask = {"bool": keep[:, None, None, :].expand(b, 1, length, length),
            "additive": torch.zeros(b, 1, 1, length).masked_fill(~keep[:, None, None, :], float("-inf")),
            "none": None,
            "shared": keep[:1, None, None, :]}[mask_kind]  # one mask broadcast over the batch
    ref = _reference(q, k, v, mask)
    got, _ = cpu_bf16_attention(ENCODER, q, k, v, mask)
    sdpa, _ = sdpa_attention_forward(ENCODER, q, k, v, mask)
    assert got.shape == sdpa.shape == (b, length, q.shape[1], q.shape[3]) and got.dtype == torch.bfloat16
    rows = keep if mask_kind in ("bool", "additive") else torch.ones_like(keep)  # padded queries are not used
    err = (got.float() - ref)[rows].abs().max().item()
    sdpa_err = (sdpa.float() - ref)[rows].abs().max().item()
    assert err < 0.05, f"max error {err} against fp32"
    assert err < 8 * sdpa_err + 1e-3, f"{err} vs sdpa's own bf16 error {sdpa_err}"
    assert torch.isfinite(got[rows]).all()


def test_chunks_of_any_size_give_the_same_result(monkeypatch) -> None:
    """Each chunk slices its own examples' mask: a wrong slice would attend to another example's padding."""
    q, k, v, keep = _inputs(3, b=7)
    mask = keep[:, None, None, :]
    outs = []
    for per_chunk in (1, 2, 3, 7):
        monkeypatch.setattr(pyfunc_model, "CPU_ATTENTION_SCORES", per_chunk * q.shape[1] * q.shape[2] ** 2)
        outs.append(cpu_bf16_attention(ENCODER, q, k, v, mask)[0])
    for out in outs[1:]:
        torch.testing.assert_close(out[keep], outs[0][keep], atol=1e-2, rtol=0)
    one_by_one = torch.cat([cpu_bf16_attention(ENCODER, q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1])[0]
                            for i in range(q.shape[0])])
    torch.testing.assert_close(outs[-1][keep], one_by_one[keep], atol=1e-2, rtol=0)


@pytest.mark.parametrize("case", ["fp32", "dropout", "long", "causal", "per_query_mask", "per_head_mask"])
def test_what_it_does_not_cover_is_sdpa_bit_for_bit(case: str) -> None:
    length = pyfunc_model.cpu_attention_max_keys() + 1 if case == "long" else 20
    q, k, v, keep = _inputs(4, b=2, h=2, length=length, d=8, dtype=torch.float32 if case == "fp32" else torch.bfloat16)
    mask = {"causal": None,
            "per_query_mask": torch.ones(length, length, dtype=torch.bool).tril().expand(2, 1, length, length),
            "per_head_mask": keep[:, None, None, :].expand(2, 2, length, length)}.get(case, keep[:, None, None, :])
    module = SimpleNamespace(is_causal=case == "causal")
    dropout = 0.3 if case == "dropout" else 0.0
    torch.manual_seed(0)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout)
    torch.manual_seed(0)
    got, _ = cpu_bf16_attention(module, q, k, v, mask, dropout=dropout)
    assert torch.equal(got, want)


@pytest.mark.parametrize("flags, max_keys", [({"avx512_bf16"}, 256), ({"avx512_bf16", "amx_tile", "amx_bf16"}, 32)])
def test_with_amx_sdpa_takes_over_beyond_32_keys(monkeypatch, flags, max_keys) -> None:
    """AMX runs sdpa's flash blocks on tiles, so there this kernel only keeps short inputs (its docstring)."""
    monkeypatch.setattr(pyfunc_model, "cpu_flags", lambda: ("GenuineIntel", frozenset(flags)))
    assert pyfunc_model.cpu_attention_max_keys() == max_keys
    for length in (max_keys, max_keys + 1):
        q, k, v, keep = _inputs(5, b=2, h=2, length=length, d=8)
        mask = keep[:, None, None, :]
        want, _ = sdpa_attention_forward(ENCODER, q, k, v, mask)
        got, _ = cpu_bf16_attention(ENCODER, q, k, v, mask)
        assert torch.equal(got, want) is (length > max_keys), length


def test_the_cpu_bf16_copy_uses_it_and_the_fp32_model_keeps_sdpa(tmp_path) -> None:
    from transformers import AttentionInterface

    path = build_tiny_model(tmp_path / "m", initializer_range=0.2)
    served = RelevanceModel()
    served.load_context(SimpleNamespace(model_config={"market": "de", "max_length": 64},
                                        artifacts={"model": str(path)}))
    assert served.model.config._attn_implementation == "sdpa"
    copy = served.model_for("bf16")
    assert copy.config._attn_implementation == CPU_ATTENTION
    assert AttentionInterface()[CPU_ATTENTION].__name__ == cpu_bf16_attention.__name__
    assert served.model.config._attn_implementation == "sdpa", "the fp32 model is untouched"
    rows = pd.DataFrame(generate_market("de", 80, np.random.default_rng(5)))
    fp32 = served.score_frame(rows, precision="fp32")
    ours = served.score_frame(rows, precision="bf16")
    copy.config._attn_implementation = "sdpa"  # the same bf16 weights through sdpa's kernel
    flash = served.score_frame(rows, precision="bf16")
    assert not np.array_equal(ours, flash), "the bf16 copy really ran the CPU attention"
    assert np.corrcoef(fp32, ours)[0, 1] > 0.999 and np.max(np.abs(fp32 - ours)) < 0.02
    assert np.max(np.abs(fp32 - ours)) < 3 * np.max(np.abs(fp32 - flash)) + 1e-3
    assert bf16_copy(served.model).config._attn_implementation == CPU_ATTENTION


_ALLOCATE = """
import ctypes, resource, sys, torch
from relevance.serving.pyfunc_model import retain_freed_memory
tuned = retain_freed_memory() if sys.argv[1] == "1" else False
if sys.argv[1] == "0":  # glibc's initial mmap threshold (128 KiB), held fixed: its adaptive raise is history-dependent
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def layer():  # a forward's pattern: activations of a few sizes, one freed before the next is made
    a, b = torch.ones(4096, 384), torch.ones(4096, 1536)
    c = torch.ones(4096, 1536)
    del b
    return a.sum() + c.sum() + torch.ones(4096, 384).sum()
for _ in range(20):  # the heap reaches its working size
    layer()
before = faults()
for _ in range(20):
    layer()
print(tuned, faults() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_retained_memory_stops_refaulting_the_same_activations() -> None:
    """In a fresh process (the setting is process-wide): glibc's initial thresholds re-fault freed blocks (as
    a transformer forward's mix of sizes made them do, ~30,000 faults per forward), the tuned ones do not."""
    def run(tuned: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _ALLOCATE, tuned], capture_output=True, text=True, check=True)
        flag, faults = out.stdout.split()
        return flag, int(faults)

    default, tuned = run("0"), run("1")
    assert default[0] == "False" and default[1] > 1000, f"glibc's default did not re-fault: {default}"
    assert tuned[0] == "True" and tuned[1] < default[1] / 3, (default, tuned)
    env = {**os.environ, "ADS_RELEVANCE_MALLOC_TUNING": "0"}
    opted_out = subprocess.run([sys.executable, "-c", _ALLOCATE, "1"], capture_output=True, text=True, env=env,
                               check=True)
    assert opted_out.stdout.split()[0] == "False", "ADS_RELEVANCE_MALLOC_TUNING=0 leaves glibc's defaults"
