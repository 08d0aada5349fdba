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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def _keyed(seed: int):
    """The keyed BLAKE2b state of ``seed``; ``copy()`` + ``update`` equals a fresh keyed hash, cheaper."""
    return hashlib.blake2b(digest_size=8, key=str(seed).encode())


def _digests(query_ids: Sequence[str], seed: int) -> bytes:
    """The 8-byte keyed hashes of the ids, concatenated: the only place the hash is taken."""
    keyed = _keyed(seed)

    def digest(query_id: str) -> bytes:
        h = keyed.copy()
        h.update(query_id.encode("utf-8"))
        return h.digest()

    return b"".join([digest(q) for q in query_ids])


def split_of(query_id: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """The split of one query id."""
    return SPLITS[int(split_codes([query_id], seed, fractions)[0])]


def split_codes(query_ids: Sequence[str], seed: int, fractions: tuple[float, float, float]) -> np.ndarray:
    """Index into :data:`SPLITS` of each query id (int8): the hash per id, the thresholds vectorised.
    Callers pass distinct ids (ingest hashes each distinct id of a batch once)."""
    # Each id's point in [0, 1): its hash as a big-endian integer / 2**64, converted in one numpy pass (the same
    # rounding as Python's int / float; a third of the time of converting id by id).
    u = np.frombuffer(_digests(query_ids, seed), dtype=">u8") / 2.0**64
    return np.where(u < fractions[0], 0, np.where(u < fractions[0] + fractions[1], 1, 2)).astype(np.int8)


def assign_splits(query_ids: Sequence[str], seed: int, fractions: tuple[float, float, float]) -> list[str]:
    return [SPLITS[i] for i in split_codes(query_ids, seed, fractions)]


def query_ids_and_splits(query_id: pa.Array | pa.ChunkedArray, query: pa.Array | pa.ChunkedArray, seed: int,
                         fractions: tuple[float, float, float]) -> tuple[pa.Array, np.ndarray]:
    """Columnar form of the rule above for a batch: the data's ``query_id`` where it is non-blank, else
    :func:`derive_query_id` of ``query``; then each row's split code (index into :data:`SPLITS`).

    Why columnar: hashing is per distinct value, and a batch repeats queries (demo data: ~3 rows per
    distinct query), so each distinct query and each distinct id is hashed once per batch.
    """
    from data_contracts.query_ad_arrow import blank_regex  # the contract's notion of blank, as str.strip()

    qid = _flat(query_id).cast(pa.string())
    need = pc.fill_null(pc.match_substring_regex(qid, blank_regex()), True)
    if pc.any(need).as_py():
        todo = pc.filter(_flat(query), need)
        distinct = pc.unique(todo)
        derived = pa.array([derive_query_id(q) for q in distinct.to_pylist()], pa.string())
        qid = pc.replace_with_mask(qid, need, derived.take(pc.index_in(todo, distinct)))
    distinct = pc.unique(qid)
    codes = split_codes(distinct.to_pylist(), seed, fractions)
    return qid, codes[pc.index_in(qid, distinct).to_numpy(zero_copy_only=False)]


def _flat(a: pa.Array | pa.ChunkedArray) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
