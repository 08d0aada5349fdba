"""The long scoring workload's tiling: whole copies with unique ids, so throughput is measured, AUC unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scoring_workloads  # noqa: E402


def test_tile_repeats_whole_copies_with_unique_ids_and_keeps_auc() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)
    rows = pd.DataFrame({"example_id": [f"e{i}" for i in range(40)], "label": rng.integers(0, 2, 40),
                         "score": rng.random(40)})
    tiled = scoring_workloads.tile(rows, 3)
    assert len(tiled) == 120 and tiled["example_id"].is_unique
    assert tiled["example_id"].iloc[:40].tolist() == rows["example_id"].tolist()  # the first copy keeps its ids
    assert tiled["example_id"].iloc[40] == "e0~1"
    assert roc_auc_score(tiled["label"], tiled["score"]) == roc_auc_score(rows["label"], rows["score"])
    assert scoring_workloads.tile(rows, 1).equals(rows)
