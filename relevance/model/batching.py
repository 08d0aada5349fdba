"""Dynamic padding: tokenised pairs stay unpadded until a batch is cut, then each batch is padded to its
own longest row. Shared by training (random batches) and scoring (length-sorted batches)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

def collate(
    encoding: Mapping[str, Sequence[Sequence[int]]],
    indices: Sequence[int] | np.ndarray,
    pad_id: int,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Dynamic padding: the rows ``indices`` of an unpadded encoding, padded to their own max length.

    Returns ``input_ids``, ``attention_mask`` and (when the encoding has them) ``token_type_ids``.
    """
    rows = [encoding["input_ids"][int(i)] for i in indices]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = r
        mask[j, : len(r)] = 1
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if "token_type_ids" in encoding:
        types = np.zeros((len(rows), width), dtype=np.int64)
        for j, i in enumerate(indices):
            t = encoding["token_type_ids"][int(i)]
            types[j, : len(t)] = t
        out["token_type_ids"] = torch.from_numpy(types)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches over examples sorted by length (stable): for scoring, little padding."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
