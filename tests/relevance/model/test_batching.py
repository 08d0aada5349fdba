"""Tests for relevance.model.batching: dynamic padding and length-sorted scoring batches."""

from __future__ import annotations

import numpy as np

from relevance.model.batching import collate, length_sorted_batches


def test_collate_pads_to_longest_in_batch() -> None:
    enc = {"input_ids": [[2, 5, 3], [2, 5, 6, 7, 3], [2, 3]], "token_type_ids": [[0, 0, 0], [0, 0, 1, 1, 1], [0, 0]]}
    batch = collate(enc, [0, 2], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    batch = collate(enc, np.array([1, 0]), pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]


def test_length_sorted_batches_cover_everything_once() -> None:
    lengths = [5, 1, 4, 4, 9, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
