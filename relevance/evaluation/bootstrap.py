"""The vectorised cluster bootstrap behind :mod:`relevance.evaluation.metrics` (its docstring says why).

Internal to ``relevance.evaluation``: clusters and their class strata, the resample draws
(:func:`_cluster_draws`, which tests replay in a slow reference loop), weighted histograms over
distinct scores, ROC-AUC / average precision per resample, percentile intervals, bootstrap
p-values and Holm's step-down procedure.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_CHUNK_ELEMENTS = 4_000_000  # bound on resamples × rows held at once (~32 MB per float64 matrix)


@dataclass(frozen=True)
class Clusters:
    """Rows grouped into resampling clusters, and the clusters grouped by class composition.

    ``of_row[i]`` is the cluster of row ``i``; ``strata`` holds the cluster indices with both
    classes, with only positives and with only negatives (in that order; a stratum may be empty).
    """

    of_row: np.ndarray
    strata: tuple[np.ndarray, np.ndarray, np.ndarray]

    @property
    def n(self) -> int:
        return int(sum(len(s) for s in self.strata))


def make_clusters(of_row: np.ndarray, y: np.ndarray) -> Clusters:
    """Clusters from dense cluster ids (0..C-1, each used) and 0/1 labels, stratified by composition."""
    of_row = np.asarray(of_row, dtype=np.int64)
    width = int(of_row.max()) + 1 if len(of_row) else 0
    pos = np.bincount(of_row, weights=np.asarray(y, dtype=float), minlength=width)
    size = np.bincount(of_row, minlength=width)
    if (size == 0).any():
        raise ValueError(f"cluster ids must be dense: id {int(np.argmin(size))} has no row")
    mixed, only_pos, only_neg = (pos > 0) & (pos < size), pos == size, pos == 0
    return Clusters(of_row, (np.flatnonzero(mixed), np.flatnonzero(only_pos), np.flatnonzero(only_neg)))


def rng_for(seed: int, key: str) -> np.random.Generator:
    """The generator of one market (or the pooled rows): independent of which other markets exist."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def _cluster_draws(clusters: Clusters, n_boot: int, rng: np.random.Generator,
                   n_rows: int) -> Iterator[np.ndarray]:
    """Yield (c × n_clusters) matrices of drawn cluster indices, ``n_boot`` resamples in total.

    Each stratum is drawn with replacement to its own size (columns: the both-classes draws, then
    the positive-only, then the negative-only), so every resample holds both classes. Exposed
    (privately) so tests can replay exactly the same draws in a slow reference loop.
    """
    size = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n_rows, clusters.n, 1)))
    done = 0
    while done < n_boot:
        c = min(size, n_boot - done)
        parts = [s[rng.integers(0, len(s), size=(c, len(s)))] for s in clusters.strata if len(s)]
        yield np.concatenate(parts, axis=1)
        done += c


def _hist(codes: np.ndarray, width: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Row-wise (weighted) counts of a (c × k) matrix of codes in [0, width): a (c × width) matrix.

    ``weights`` (c × k) are integer multiplicities, so the float sums are exact counts.
    """
    c = codes.shape[0]
    flat = (np.arange(c)[:, None] * width + codes).ravel()
    w = None if weights is None else weights.ravel()
    return np.bincount(flat, weights=w, minlength=c * width).reshape(c, width)


def _stats(hp: np.ndarray, hn: np.ndarray, want_ap: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """ROC-AUC and average precision per row of positive / negative counts over ascending scores.

    Class totals are per row: a cluster resample's class counts vary from resample to resample.
    """
    n_pos = hp.sum(axis=1)
    n_neg = hn.sum(axis=1)
    below = np.cumsum(hn, axis=1) - hn
    auc = (hp * (below + 0.5 * hn)).sum(axis=1) / (n_pos * n_neg)
    if not want_ap:
        return auc, None
    hp_desc = hp[:, ::-1]
    tp = np.cumsum(hp_desc, axis=1)
    predicted = tp + np.cumsum(hn[:, ::-1], axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(tp.shape), where=predicted > 0)
    return auc, (hp_desc * precision).sum(axis=1) / n_pos


def _codes(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Map scores to indices of the sorted distinct scores (ties share an index)."""
    uniq, inv = np.unique(np.asarray(scores, dtype=float), return_inverse=True)
    return inv.reshape(-1), len(uniq)


def point_stats(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(ROC-AUC, average precision) of labels ``y`` and scores ``s``; both classes must be present."""
    codes, width = _codes(s)
    pos = np.asarray(y) == 1
    auc, ap = _stats(_hist(codes[pos][None, :], width), _hist(codes[~pos][None, :], width))
    return float(auc[0]), float(ap[0])  # type: ignore[index]


def bootstrap_stats(y: np.ndarray, score_sets: Sequence[np.ndarray], clusters: Clusters, n_boot: int,
                    rng: np.random.Generator, want_ap: bool = True) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per-resample ROC-AUC (and AP) of each score set over the same rows, all on the same draws.

    A resample's drawn cluster multiplicities become per-row weights, and weighted histograms over
    the distinct scores give every resample of a chunk at once.
    """
    pos = np.asarray(y) == 1
    coded = [_codes(s) for s in score_sets]
    parts: list[list[tuple[np.ndarray, np.ndarray | None]]] = [[] for _ in score_sets]
    for draws in _cluster_draws(clusters, n_boot, rng, len(pos)):
        weights = _hist(draws, clusters.n)[:, clusters.of_row]  # (c × rows) multiplicities
        wp, wn = weights[:, pos], weights[:, ~pos]
        for k, (codes, width) in enumerate(coded):
            cp = np.broadcast_to(codes[pos], wp.shape)
            cn = np.broadcast_to(codes[~pos], wn.shape)
            parts[k].append(_stats(_hist(cp, width, wp), _hist(cn, width, wn), want_ap))
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for chunks in parts:
        auc = np.concatenate([a for a, _ in chunks])
        ap = np.concatenate([p for _, p in chunks]) if want_ap else None  # type: ignore[misc]
        out.append((auc, ap))
    return out


def interval(boot: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution."""
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def p_value(boot: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is 0", floored at 1/len(boot).

    ``min(1, 2·min(share ≤ 0, share ≥ 0))``; the floor because ``n_boot`` resamples cannot show a
    p-value below one resample's share.
    """
    share = min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0)))
    return max(1.0 / len(boot), min(1.0, 2.0 * share))


def holm(p_values: Mapping[str, float], alpha: float) -> dict[str, bool]:
    """Holm–Bonferroni step-down: which hypotheses are rejected at family-wise error rate ``alpha``.

    Sorted by p-value (ties by name, so the result is deterministic), the i-th smallest (from 0)
    is rejected while p ≤ alpha / (m − i); the first failure stops the procedure.
    """
    rejected = dict.fromkeys(p_values, False)
    order = sorted(p_values, key=lambda k: (p_values[k], k))
    m = len(order)
    for i, key in enumerate(order):
        if p_values[key] > alpha / (m - i):
            break
        rejected[key] = True
    return rejected
