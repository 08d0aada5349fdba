"""Numeric precision: ``auto`` means bf16 where the hardware computes it natively, fp32 elsewhere.

Why: on a CPU with AMX (``amx_bf16``), an AMD CPU with AVX512-BF16 (Zen 4 and later) or a CUDA GPU
with bf16 units, bf16 matrix products run at 2× the fp32 rate or more with scores that agree to ~1e-4;
elsewhere bf16 is *slower* than fp32. The flag alone does not decide it on Intel: on a Xeon (family 6,
model 207) whose VM exposes ``avx512_bf16`` but not AMX, torch 2.13's bf16 GEMM ran at 56 GFLOP/s per
thread against fp32's 113, and a multilingual-e5-small training step (8 × 128 tokens, forward +
backward, 1 thread) took 4.9 s under bf16 autocast against 3.4 s in fp32; the same CPU with AMX exposed
ran bf16 GEMMs at 160-190 GFLOP/s per thread. On an AMD EPYC (family 25, model 17: Zen 4), whose
``vdpbf16ps`` runs at full width, the encoder's GEMM shapes ran at 201-210 GFLOP/s per thread in bf16
against 81-85 in fp32 (2.4×). So ``auto`` asks the hardware for AMX, or for AVX512-BF16 on AMD, and
``fp32`` / ``bf16`` force a choice.
Serving adds a second condition: a registered model scores in bf16 under ``auto`` only when its
measured fp32/bf16 parity holds (:mod:`relevance.serving.parity`).

``ADS_RELEVANCE_NATIVE_BF16=0|1`` overrides the CPU detection (a CPU that hides its flags from
``/proc/cpuinfo``, or a test that wants the other branch).
Light to import (torch is imported when a device is asked about): the training config validates with it.
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = frozenset({"amx_bf16"})  # native bf16 on any vendor
AMD_BF16_FLAGS = frozenset({"avx512_bf16"})  # native on AMD (Zen 4+); measured slower than fp32 on an Intel VM
OVERRIDE_ENV = "ADS_RELEVANCE_NATIVE_BF16"


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of :data:`PRECISIONS`; a ValueError naming it otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: expected one of {list(PRECISIONS)}")
    return precision


@lru_cache(maxsize=1)
def _cpu_info() -> tuple[str, frozenset[str]]:
    """The CPU vendor id and feature flags the Linux kernel reports (empty elsewhere or when unreadable)."""
    if platform.system() != "Linux":
        return "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", frozenset()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if "flags" in fields and "vendor_id" in fields:
            break
    return fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split())


def cpu_computes_bf16(vendor: str, flags: frozenset[str]) -> bool:
    """Whether a CPU with this vendor id and these flags runs bf16 GEMMs faster than fp32 (module doc)."""
    return bool(flags & CPU_BF16_FLAGS) or (vendor == "AuthenticAMD" and bool(flags & AMD_BF16_FLAGS))


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 matrix products faster than fp32 (CUDA bf16; a CPU with AMX, or AMD's AVX512-BF16)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    override = os.environ.get(OVERRIDE_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise ValueError(f"{OVERRIDE_ENV}={override!r} is invalid: expected 0 or 1 (or unset to detect)")
        return override == "1"
    return cpu_computes_bf16(*_cpu_info())


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` (auto / fp32 / bf16) means on ``device``."""
    if check_precision(precision) == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast on ``device`` when ``precision`` resolves to bf16 there; a no-op context otherwise."""
    import torch

    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


HEAD_NAMES = ("classifier", "score")  # where transformers' *ForSequenceClassification keep their head


def classification_head(model: Any) -> Any:
    """The module that turns the pooled state into the logit (``classifier`` or ``score``), or None."""
    import torch

    return next((m for n in HEAD_NAMES if isinstance(m := getattr(model, n, None), torch.nn.Module)), None)


@contextmanager
def fp32_head(model: Any) -> Iterator[None]:
    """Run ``model``'s classification head in fp32 (outside autocast) while the context is open.

    Why: under bf16 autocast the logit itself is a bf16 number, 8 significant bits, so close pairs
    tie (an untrained tiny model's 40 scores collapse to a dozen values) and AUC loses resolution.
    The head is a few thousand multiply-adds per pair: fp32 there costs nothing measurable.
    """
    import torch

    head = classification_head(model)
    if head is None:
        yield
        return
    original = head.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        device = next(head.parameters()).device.type
        args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        with torch.autocast(device, enabled=False):
            return original(*args, **kwargs)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # back to the class's forward
