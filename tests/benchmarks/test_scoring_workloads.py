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


def test_op_groups_name_the_kernels_a_bert_forward_runs() -> None:
    assert scoring_workloads.op_group("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert scoring_workloads.op_group("aten::addmm") == "gemm"
    assert scoring_workloads.op_group("aten::native_layer_norm") == "gelu_norm_softmax"
    assert scoring_workloads.op_group("aten::copy_") == "casts_copies"
    assert scoring_workloads.op_group("aten::embedding") == "other"


def test_ops_inside_the_engines_attention_count_as_attention() -> None:
    """The engine's CPU attention runs bmm/softmax inside a ``record_function`` range named for it."""
    from types import SimpleNamespace

    from relevance.serving.pyfunc_model import CPU_ATTENTION

    layer = SimpleNamespace(name="aten::linear", cpu_parent=None)
    attention = SimpleNamespace(name=CPU_ATTENTION, cpu_parent=layer)
    softmax = SimpleNamespace(name="aten::_softmax", cpu_parent=SimpleNamespace(name="aten::softmax", cpu_parent=attention))
    assert scoring_workloads.event_group(attention) == "attention"
    assert scoring_workloads.event_group(SimpleNamespace(name="aten::bmm", cpu_parent=attention)) == "attention"
    assert scoring_workloads.event_group(softmax) == "attention"
    assert scoring_workloads.event_group(SimpleNamespace(name="aten::addmm", cpu_parent=layer)) == "gemm"


def test_time_breakdown_accounts_for_the_whole_bf16_forward(tmp_path) -> None:
    from relevance.model.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", hidden=64, layers=2, heads=2)
    counts = [9, 30, 12, 64, 64, 40, 17, 50] * 8  # 64 pairs: batches of 8 rows within 8 × 64 tokens
    report = scoring_workloads.time_breakdown(str(model_dir), counts, batch_size=8, max_length=64, batches=3)
    assert report["batches"] == 3 and 3 <= report["pairs"] <= 3 * 8 * 4
    assert abs(sum(report["shares"].values()) - 1) < 1e-9
    assert abs(sum(report["seconds"].values()) - report["seconds"]["gemm"] / report["shares"]["gemm"]) < 1e-6
    # a BERT forward spends time in its GEMMs and its attention, and both reach a plausible rate
    assert report["shares"]["gemm"] > 0 and report["shares"]["attention"] > 0
    assert all(0 < rate < 1e6 for rate in report["gflop_s"].values())


def test_attention_flops_are_the_quadratic_part_of_a_pair() -> None:
    config = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12}
    # doubling the tokens doubles the linear FLOPs and quadruples attention's
    linear = lambda n: scoring_workloads.flops_per_pair(config, n) - scoring_workloads.attention_flops(config, n)  # noqa: E731
    assert abs(linear(200) - 2 * linear(100)) < 2 * 384 * 384 + 1  # the pooler is per pair, not per token
    assert scoring_workloads.attention_flops(config, 200) == 4 * scoring_workloads.attention_flops(config, 100)


def test_sustained_gemm_rate_counts_every_round_of_both_shapes_over_the_whole_time(monkeypatch) -> None:
    clock = iter(np.arange(0.0, 100.0, 0.1))  # each reading of the clock is 0.1 s after the one before
    monkeypatch.setattr(scoring_workloads.time, "perf_counter", lambda: float(next(clock)))
    rows, d, ff = 8, 4, 16
    rate = scoring_workloads.sustained_gemm_rate("fp32", rows=rows, d=d, ff=ff, seconds=0.25)
    # start 0.0; checks at 0.1 and 0.2 run a round each, 0.3 ends the loop; the end is read at 0.4
    assert np.isclose(rate, 2 * (2 * rows * d * ff + 2 * rows * ff * d) / 0.4 / 1e9)
