"""Per-market prior offsets in the training loss: a market's base rate is not the representation's job.

Why (issue 15): markets differ in how many of their rows are relevant (a broad-match market labels
near misses relevant: 2/3 positive where a strict one has 1/3). Every method scores with one head,
whose single bias can match only one base rate. A market with parameters of its own (MTL-LoRA's
Λ_t and mixing, per-market LoRA) then has a cheap way to fit its base rate: move *all* its inputs to
one point where the shared head outputs that rate. That is the collapse seen in the issue: one
market's scores constant at its base rate (0.699 for a 2/3-positive market), the others fine.

The fix adds a fixed offset to each training logit, ``o_t = logit(p_t) − logit(p)`` (p_t the market's
share of positives in train, p the reference rate), so the head's shared bias serves every market
and no market gains by erasing its inputs. A constant per market does not change which of two rows
of that market ranks higher, so per-market AUC is unaffected by leaving it out at scoring time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# Rates are clipped so a one-class market gets a large but finite offset.
RATE_CLIP = (0.01, 0.99)


def logit(rate: float) -> float:
    """log(p / (1 − p)) of ``rate`` clipped to :data:`RATE_CLIP`."""
    p = min(max(float(rate), RATE_CLIP[0]), RATE_CLIP[1])
    return math.log(p / (1.0 - p))


def prior_offsets(markets: Sequence[str], labels: Sequence[float] | np.ndarray,
                  reference: float | None = None) -> tuple[dict[str, float], float]:
    """({market: o_t}, reference logit): o_t = logit(p_t) − reference, reference = logit(all rows' rate)."""
    frame_markets = np.asarray(markets)
    y = np.asarray(labels, dtype=np.float64)
    if len(frame_markets) != len(y):
        raise ValueError(f"markets ({len(frame_markets)}) and labels ({len(y)}) differ in length")
    if not len(y):
        raise ValueError("no training rows: cannot compute market priors")
    ref = logit(y.mean()) if reference is None else float(reference)
    return {str(m): logit(y[frame_markets == m].mean()) - ref for m in sorted(set(frame_markets.tolist()))}, ref


def per_example(markets: Sequence[str], offsets: Mapping[str, float]) -> np.ndarray:
    """The offset of every row, in row order (float32)."""
    return np.asarray([offsets[m] for m in markets], dtype=np.float32)
