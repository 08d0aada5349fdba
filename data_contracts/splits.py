"""Stable train/valid/test assignment by query.

A split is a pure function of ``(query_id, seed, fractions)``: a keyed BLAKE2b hash of the query id
mapped to [0, 1). No RNG state, no row order, no machine dependence, so the same query lands in the
same split on every run and every machine, and never in two splits. ``query_id`` comes from the data
when present; otherwise it is derived from the *normalised* query (NFKC, case-folded, whitespace
collapsed), so "Nike  Shoes" and "nike shoes" are the same query.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

SPLITS = ("train", "valid", "test")


def normalise_query(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def derive_query_id(query: str) -> str:
    """A short stable id of the normalised query (``q-`` + 16 hex digits of BLAKE2b)."""
    return "q-" + hashlib.blake2b(normalise_query(query).encode("utf-8"), digest_size=8).hexdigest()


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` → (0.8, 0.1, 0.1); three non-negative numbers summing to 1."""
    try:
        parts = [float(p) for p in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise ValueError(f"split fractions {text!r} are not numbers: expected e.g. '0.8,0.1,0.1'") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions {text!r} must be three non-negative numbers (train,valid,test) summing to 1"
        )
    return parts[0], parts[1], parts[2]


def split_of(query_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """The split of one query id."""
    digest = hashlib.blake2b(query_id.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < fractions[0]:
        return "train"
    return "valid" if u < fractions[0] + fractions[1] else "test"


def assign_splits(query_ids: Sequence[str], seed: int, fractions: tuple[float, float, float]) -> list[str]:
    return [split_of(q, seed, fractions) for q in query_ids]
