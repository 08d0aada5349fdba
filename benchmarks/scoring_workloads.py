"""The scoring benchmark's second workload and its yardstick: long pairs from a trained model, and the
bf16 compute floor of this machine.

- **Long pairs** (``--workload long``): the test rows of real QA markets (XQuAD question + paragraph,
  ~126 tokens a pair) scored by the *trained* multilingual-e5-small models of a quality-benchmark run
  (default: shared LoRA, seed 0, of ``benchmarks/quality.py``). Registering the run measures each
  market's fp32/bf16 parity on its valid rows, so ``precision auto`` decides as in production, and the
  AUC check on the test rows is on rows the parity never saw.
- **The floor**: the best bf16 (and fp32) GEMM rate of this machine, measured on the encoder's own
  matrix shapes, and the FLOPs a pair costs (every linear layer, plus attention's two products, from
  the model config and the pairs' real token counts). floor pairs/s = GEMM rate / FLOPs per pair: no
  engine can beat it without skipping work, so "% of floor" says how much is left.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

QUALITY_RUN = Path("/tmp/ads-relevance-quality/runs/lora-seed0")  # benchmarks/quality.py's default workdir
LONG_MARKETS = ("de", "en")


def _gemm_operands(dtype_name: str, device: str, rows: int, d: int, ff: int) -> tuple[Any, list[tuple[Any, Any]]]:
    """(sync, [(x, w)] for ``rows × d → ff`` and ``rows × ff → d``): the encoder's two GEMM shapes, and a
    function that waits for queued GPU work (a no-op on a CPU)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    return sync, [(torch.randn(rows, k_in, dtype=dtype, device=device), torch.randn(k_out, k_in, dtype=dtype, device=device))
                  for k_in, k_out in ((d, ff), (ff, d))]


def gemm_rate(dtype_name: str, device: str = "cpu", rows: int = 4096, d: int = 384, ff: int = 1536,
              reps: int = 20) -> float:
    """Best-of-3 GFLOP/s of ``rows × d → ff`` and ``rows × ff → d`` products (the encoder's shapes)."""
    import torch

    sync, shapes = _gemm_operands(dtype_name, device, rows, d, ff)
    best = 0.0
    with torch.inference_mode():
        for x, w in shapes:
            torch.nn.functional.linear(x, w)
            for _ in range(3):
                sync()
                t = time.perf_counter()
                for _ in range(reps):
                    torch.nn.functional.linear(x, w)
                sync()
                best = max(best, 2 * rows * w.shape[0] * w.shape[1] * reps / (time.perf_counter() - t) / 1e9)
    return best


def sustained_gemm_rate(dtype_name: str, device: str = "cpu", rows: int = 4096, d: int = 384, ff: int = 1536,
                        seconds: float = 3.0) -> float:
    """GFLOP/s of the encoder's two GEMM shapes run back to back for ``seconds``: the rate sustained *now*.

    Why beside :func:`gemm_rate` (the best of short windows, measured once after every contender): this VM's
    bf16 GEMM rate moves within seconds and minutes. On the AMX Xeon of 2026-12-07 short windows read 522,
    2,584, 1,093, 790 and 771 GFLOP/s within 10 s, and 3 s loops read 2,142 before one 30 s scoring pass and
    800 after it. No single reading is the machine's floor, so ``scoring_speed.py`` holds each engine pass
    against the rate sustained right before and after it, in its own process: the same minute, not another."""
    import torch

    sync, shapes = _gemm_operands(dtype_name, device, rows, d, ff)
    flops = sum(2 * rows * w.shape[0] * w.shape[1] for _, w in shapes)  # one round: both shapes
    with torch.inference_mode():
        for x, w in shapes:  # warm-up: kernel selection, first-touch of the outputs
            torch.nn.functional.linear(x, w)
        sync()
        t, rounds = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            for x, w in shapes:
                torch.nn.functional.linear(x, w)
            sync()
            rounds += 1
        return flops * rounds / (time.perf_counter() - t) / 1e9


def flops_per_pair(config: dict[str, Any], tokens: float) -> float:
    """FLOPs of one forward of a BERT-style encoder on a pair of ``tokens`` tokens (linears + attention)."""
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    linear = 2 * tokens * layers * (4 * d * d + 2 * d * ff)
    return float(linear + attention_flops(config, tokens) + 2 * d * d)  # + the pooler; the 1-logit head is negligible


def attention_flops(config: dict[str, Any], tokens: float) -> float:
    """FLOPs of attention's two products (Q·Kᵀ and P·V) over all layers for a pair of ``tokens`` tokens."""
    return float(2 * config["num_hidden_layers"] * 2 * tokens * tokens * config["hidden_size"])


def floor(model_dir: str, token_counts: list[int], device: str = "cpu", rows: int = 4096,
          reps: int = 20, precisions: tuple[str, ...] = ("bf16", "fp32")) -> dict[str, Any]:
    """The compute floor of this machine for pairs of these token counts (module docstring); ``rows``: the
    GEMMs' row count (a GPU needs more than a CPU to be filled); a smoke run passes few rows and ``reps``
    (bf16 GEMMs emulated on a CPU without native bf16 run at ~10 GFLOP/s: a minute at the full size)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    per_pair = sum(flops_per_pair(config, n) for n in token_counts) / len(token_counts)
    rates = {p: gemm_rate(p, device, rows=rows, reps=reps) for p in precisions}
    return {"gflop_per_pair": per_pair / 1e9, "mean_tokens": sum(token_counts) / len(token_counts),
            "gemm_gflop_s": rates, "floor_pairs_per_s": {p: r * 1e9 / per_pair for p, r in rates.items()}}


# torch.profiler op names (substrings) → the groups a forward's time is reported in; the rest is "other".
OP_GROUPS = {
    "attention": ("scaled_dot_product", "flash_attention", "ads_relevance_cpu_bf16"),
    "gemm": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "gelu_norm_softmax": ("gelu", "layer_norm", "softmax", "tanh"),
    "casts_copies": ("aten::copy_", "aten::_to_copy", "aten::clone"),
}


def op_group(name: str) -> str:
    return next((g for g, keys in OP_GROUPS.items() if any(k in name for k in keys)), "other")


def event_group(event: Any) -> str:
    """An op's group, where an op inside an attention function's ``record_function`` range (the engine's
    CPU attention runs ``bmm``/``softmax``) counts as attention, not as a GEMM or softmax of the layers."""
    parent = event
    while parent is not None:
        if op_group(parent.name) == "attention":
            return "attention"
        parent = parent.cpu_parent
    return op_group(event.name)


def time_breakdown(model_dir: str, token_counts: list[int], batch_size: int, max_length: int,
                   batches: int = 4) -> dict[str, Any]:
    """Where the bf16 model's forward time goes on the CPU, and the GFLOP/s its GEMMs and attention reach.

    "% of the floor" says how much is left; this says where: torch.profiler's self time per op group
    (:data:`OP_GROUPS`) over ``batches`` forwards of the engine's own batches (its token budget, rows
    sorted by length, taken evenly across this workload's token counts), the model in the engine's bf16
    form (:func:`relevance.serving.pyfunc_model.bf16_copy`). Token ids are random: speed does not depend on them.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForSequenceClassification

    from relevance.serving.pyfunc_model import BATCH_GROWTH, bf16_copy, cpu_attention_max_keys, token_batches

    model = bf16_copy(AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval())
    all_batches = token_batches(token_counts, batch_size * BATCH_GROWTH, batch_size * max_length)
    picked = [all_batches[i] for i in sorted({round(k * (len(all_batches) - 1) / max(1, batches - 1))
                                              for k in range(batches)})]
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for idx in picked:
        lengths = torch.tensor([token_counts[i] for i in idx])
        ids = torch.randint(5, model.config.vocab_size, (len(idx), int(lengths.max())), generator=generator)
        inputs.append({"input_ids": ids, "attention_mask": (torch.arange(ids.shape[1]) < lengths[:, None]).long()})
    with torch.inference_mode():
        model(**inputs[0])  # warm-up: first-call allocations and kernel selection
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in inputs:
                model(**batch)
    seconds: dict[str, float] = {g: 0.0 for g in (*OP_GROUPS, "other")}
    for event in prof.events():
        seconds[event_group(event)] += event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    linear = sum(len(b["input_ids"]) * (flops_per_pair(config, b["input_ids"].shape[1])
                                        - attention_flops(config, b["input_ids"].shape[1])) for b in inputs)
    attention = sum(len(b["input_ids"]) * attention_flops(config, b["input_ids"].shape[1]) for b in inputs)
    return {"precision": "bf16", "batches": len(inputs), "pairs": sum(len(b["input_ids"]) for b in inputs),
            "attention_implementation": getattr(model.config, "_attn_implementation", None),
            "cpu_attention_max_keys": cpu_attention_max_keys(),  # longer batches run sdpa inside it
            "seconds": seconds, "shares": {g: s / total for g, s in seconds.items()},
            "gflop_s": {"gemm": linear / seconds["gemm"] / 1e9 if seconds["gemm"] else None,
                        "attention": attention / seconds["attention"] / 1e9 if seconds["attention"] else None}}


def token_counts(model_dir: str, raw: Path, markets: tuple[str, ...], max_length: int) -> list[int]:
    """Tokens per pair as the engine encodes them (query clipped to half, ad truncated)."""
    import pandas as pd
    from transformers import AutoTokenizer

    from relevance.serving.pyfunc_model import encode, pair_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    counts: list[int] = []
    for m in markets:
        queries, ads = pair_texts(pd.read_parquet(raw / f"market={m}"), m, False)
        counts += [len(ids) for ids in encode(tok, queries, ads, max_length)["input_ids"]]
    return counts


def tile(rows, copies: int):
    """``rows`` repeated ``copies`` times, each copy's ``example_id`` made unique (``ID~k``; the first keeps
    its id). Scores and AUC are unchanged by whole copies; it lets a benchmark amortise per-run costs."""
    import pandas as pd

    parts = [rows] + [rows.assign(example_id=rows["example_id"].astype(str) + f"~{k}") for k in range(1, copies)]
    return pd.concat(parts, ignore_index=True)


def setup_long(work: Path, run_dir: Path, markets: tuple[str, ...], pairs: int | None = None) -> dict:
    """Test rows of ``markets`` as raw pairs, and ``run_dir`` registered (with parity) as their champions.

    ``pairs``: at least this many pairs in all, by repeating every market's test rows as whole copies (a few
    hundred test rows are too few to measure throughput: loading each market's model would dominate)."""
    import pandas as pd

    from relevance.data.curated import read_split
    from relevance.training.runs import read_training_run

    run = read_training_run(run_dir)
    data = run.train_config.get("data")
    if not data or not Path(data).exists():
        raise SystemExit(f"run {run_dir} records data {data!r}, which does not exist: run benchmarks/quality.py "
                         "first (its workdir holds the data and the trained runs), or pass --trained-run")
    raw, labels = work / "raw", []
    tests = {m: read_split(data, "test", [m]) for m in markets}
    available = sum(len(r) for r in tests.values())
    copies = max(1, -(-pairs // available)) if pairs and available else 1
    for m in markets:
        rows = tile(tests[m], copies)
        (raw / f"market={m}").mkdir(parents=True)
        rows.drop(columns=["label", "query_id", "split"], errors="ignore").to_parquet(
            raw / f"market={m}" / "part-0.parquet", index=False)
        labels.append(rows[["example_id", "market", "label"]])
    cfg: dict = {"workdir": str(work), "raw": str(raw), "max_length": run.max_length, "base_model": run.base_model,
                 "markets": list(markets)}
    register_champions(work, run_dir, markets, cfg)
    pd.concat(labels).to_parquet(work / "labels.parquet", index=False)
    return cfg


def register_champions(work: Path, run_dir: Path, markets: tuple[str, ...] | None, cfg: dict) -> dict:
    """Register ``run_dir`` in a SQLite store under ``work`` as the champion of ``markets`` (default: all of
    the run's) and download each: fills cfg's ``uri``, ``pyfunc``, ``merged`` and ``parity`` (version tags)."""
    from relevance.serving import registry

    uri = cfg["uri"] = f"sqlite:///{work / 'mlflow.db'}"
    client = registry.client_for(uri)
    for key in ("merged", "pyfunc", "parity"):
        cfg[key] = {}
    for r in registry.register(run_dir, markets=None if markets is None else list(markets), tracking_uri=uri):
        client.set_registered_model_alias(r["name"], "champion", r["version"])
        mv = client.get_model_version(r["name"], str(r["version"]))
        cfg["parity"][r["market"]] = {k: v for k, v in mv.tags.items() if k.startswith("bf16_")}
        local = registry.download_model(client, client.get_model_version_download_uri(r["name"], r["version"]),
                                        work / "models" / r["market"])
        cfg["pyfunc"][r["market"]] = str(local)
        cfg["merged"][r["market"]] = str(next(p.parent for p in (local / "artifacts").rglob("config.json")))
    return cfg
