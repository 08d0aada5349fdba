"""Training batches: the multi-market sampler (reading splits: ``relevance.data.curated``; padding:
``relevance.model.batching``).

Why the sampler looks the way it does:

- **Multi-market mixing.** Market sizes are very unequal, so each epoch draws a per-market quota
  ``q_t = N · p_t`` with ``p_t ∝ n_t^(1/T)`` (``T = 1``: proportional, every example exactly once per
  epoch; larger ``T`` flattens towards uniform, so small markets are seen more often). The drawn
  examples are shuffled *together*, so a batch mixes markets (MTL-LoRA routes per example).
- **Length grouping.** Within chunks of ``group_size`` batches, examples are sorted by length and cut
  into batches, and the batch order is shuffled: each padded batch wastes little compute while the
  randomness across batches is kept.
- **One market per batch** (``single_market=True``, the ``separate`` method): batches are cut
  within each market's draw and then shuffled together, so every optimizer step belongs to exactly
  one market. A market's parameters then see full batches of its own rows spread over the whole
  learning-rate schedule: the same updates as fine-tuning it alone, with the same examples per
  market as a mixed run.
- **Exact resume.** Epoch ``e``'s batch list is a pure function of ``(seed, e)`` (its own
  ``numpy`` generator), so the sampler's whole state is ``(epoch, position)``: a resumed run replays
  exactly the batches an uninterrupted one would have seen.
- **DDP.** Every rank builds the same batch list and takes batches ``rank, rank + W, …``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def market_probabilities(counts: Mapping[str, int], temperature: float = 1.0) -> dict[str, float]:
    """``p_t ∝ n_t^(1/T)`` over markets (sorted codes); ``T = 1`` is proportional to size."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"sampling temperature={temperature!r} is invalid: expected a positive number (1 = proportional)")
    codes = sorted(counts)
    if not codes or any(counts[c] < 1 for c in codes):
        raise ValueError(f"market counts {dict(counts)} are invalid: every market needs >= 1 example")
    w = np.array([float(counts[c]) for c in codes]) ** (1.0 / float(temperature))
    return dict(zip(codes, (w / w.sum()).tolist()))


def _quotas(counts: Mapping[str, int], temperature: float) -> dict[str, int]:
    """Examples per market per epoch: exactly ``n_t`` when proportional, else largest-remainder ``N·p_t``."""
    codes = sorted(counts)
    if temperature == 1.0:
        return {c: int(counts[c]) for c in codes}
    total = sum(counts.values())
    p = market_probabilities(counts, temperature)
    raw = np.array([total * p[c] for c in codes])
    q = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - q), kind="stable")[: total - int(q.sum())]:
        q[i] += 1
    return {c: max(1, int(n)) for c, n in zip(codes, q)}


class MultiMarketSampler:
    """Deterministic, resumable stream of index batches mixing markets (see module docstring)."""

    def __init__(
        self,
        markets: Sequence[str],
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        temperature: float = 1.0,
        group_size: int = 50,
        rank: int = 0,
        world_size: int = 1,
        single_market: bool = False,
    ) -> None:
        if len(markets) != len(lengths) or not len(markets):
            raise ValueError(f"need one market and one length per example, got {len(markets)} and {len(lengths)}")
        if batch_size < 1 or group_size < 1:
            raise ValueError(f"batch_size={batch_size} and group_size={group_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is out of range for world_size={world_size}")
        codes = np.asarray(markets, dtype=object)
        self.by_market = {str(m): np.flatnonzero(codes == m) for m in sorted(set(map(str, markets)))}
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.group_size = int(batch_size), int(seed), int(group_size)
        self.temperature = float(temperature)
        self.rank, self.world_size = int(rank), int(world_size)
        self.single_market = bool(single_market)
        self.quotas = _quotas({m: len(ix) for m, ix in self.by_market.items()}, self.temperature)
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{sum(self.quotas.values())} examples per epoch make fewer batches of {batch_size} "
                f"than there are ranks ({world_size}): lower batch_size or use fewer processes"
            )

    @property
    def probabilities(self) -> dict[str, float]:
        """The sampling probability of each market (share of an epoch's examples)."""
        total = sum(self.quotas.values())
        return {m: q / total for m, q in self.quotas.items()}

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank takes per epoch (a remainder that does not fill every rank is dropped)."""
        if self.single_market:
            n_batches = sum(-(-q // self.batch_size) for q in self.quotas.values())
        else:
            n_batches = -(-sum(self.quotas.values()) // self.batch_size)
        return n_batches // self.world_size

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' batches of ``epoch`` in order: a pure function of ``(seed, epoch)``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        drawn = []
        for m, ix in self.by_market.items():
            reps = -(-self.quotas[m] // len(ix))
            drawn.append(np.concatenate([rng.permutation(ix) for _ in range(reps)])[: self.quotas[m]])
        pools = [rng.permutation(d) for d in drawn] if self.single_market else [rng.permutation(np.concatenate(drawn))]
        batches = [b for pool in pools for b in self._length_grouped(pool)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def _length_grouped(self, pool: np.ndarray) -> list[np.ndarray]:
        """``pool`` cut into batches, sorted by length within chunks of ``group_size`` batches."""
        chunk = self.batch_size * self.group_size
        batches: list[np.ndarray] = []
        for start in range(0, len(pool), chunk):
            part = pool[start: start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches.extend(part[i: i + self.batch_size] for i in range(0, len(part), self.batch_size))
        return batches

    def _rank_batches(self) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != self.epoch:
            every = self.epoch_batches(self.epoch)
            self._cache = (self.epoch, every[self.rank:: self.world_size][: self.batches_per_epoch])
        return self._cache[1]

    def next_batch(self) -> np.ndarray:
        """The next batch of example indices for this rank; advances the state."""
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._rank_batches()[self.position]
        self.position += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "temperature": self.temperature, "batch_size": self.batch_size,
                "group_size": self.group_size, "world_size": self.world_size,
                "quotas": dict(self.quotas), **({"single_market": True} if self.single_market else {})}

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state: position in the stream plus what must match to resume it."""
        return {"epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; a sampler over other data or settings is an error naming them."""
        mine = self._identity()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"sampler state does not match this sampler ({detail})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
