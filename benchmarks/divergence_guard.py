#!/usr/bin/env python3
"""The divergence guard (issue 15) on ``make demo``'s data and recipe: how often a run (MTL-LoRA; shared LoRA)
collapses part-way, and what going back to the best weights recovers.

For each method × learning rate × seed, the method trains with the guard off (``--max-rollbacks 0``: what the code did
before the guard, the best evaluation's weights ship). A run whose evaluation history shows a collapse (a
market whose valid scores were spread at the best evaluation scoring every row alike later;
``relevance.training.divergence.collapsed_markets``) trains again with the guard at its default. A run that
never collapses is the same run with the guard on (the guard acts only on a collapse; a test checks it bit for
bit), so it is not trained twice. Data: ``write_demo_data(rows_per_market=2000, seed=0, corrupt_fraction=0.02)``
ingested as the pipeline does; MiniLM-L6 from its PyPI package; 150 steps × 32, max length 64, evaluations
every 25 steps (the demo evaluates every 50; more evaluations find a collapse sooner).

    python benchmarks/divergence_guard.py --methods mtl-lora --lrs 0.001,0.002,0.003 --seeds 0-9
    python benchmarks/divergence_guard.py --methods lora --lrs 0.001 --seeds 0-3   # ~3.3 min a run on 2 cores
    python benchmarks/divergence_guard.py --grid mtl-lora:0.001,0.002:0-9 --grid lora:0.001:0-3
    python benchmarks/divergence_guard.py --quick                               # tiny model, smoke test

A run directory in ``--workdir`` whose ``train_config.json`` matches the one this benchmark would train (runtime
fields aside) and that finished is reused, so the search can be continued, or fed by lanes trained in parallel
with ``ads-relevance train`` and the same settings and thread count (``OMP_NUM_THREADS=1`` for ``--threads 1``:
with 2 threads a guard-on run that never rolled back still differed from its 1-thread guard-off run, test macro
0.870 against 0.826, which is the instability itself, not the guard). Results: ``benchmarks/results/divergence_guard.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _env import environment, model_label, output_path, ratio_label, train_or_reuse  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)
from collapse_search import base_model_for, parse_seeds, write_result  # noqa: E402
from per_market_lr import demo_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="mtl-lora,lora", help="comma-separated train methods")
    p.add_argument("--lrs", default="0.001,0.002,0.003", help="comma-separated learning rates (the demo's: 0.001)")
    p.add_argument("--seeds", default="0-9", help="'0-9' or '0,3,7'")
    p.add_argument("--grid", action="append", default=None, metavar="METHODS:LRS:SEEDS",
                   help="a block of cells, e.g. 'lora:0.001:0-3' (repeatable; replaces --methods/--lrs/--seeds)")
    p.add_argument("--b-lr-ratio", type=float, default=None,
                   help="LoRA+ ratio of the up-projections (default: train's, 12 / max(3, markets) = 2.4 for the demo); "
                        "runs get the suffix -bRATIO")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; a guard-on run must do the same sums as its guard-off run (another thread "
                        "count rounds differently and, on a run this close to an instability, trains differently)")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--base-model", default=None, help="encoder directory (default: MiniLM-L6 from its PyPI package)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ads-relevance-divergence"))
    p.add_argument("--out", type=Path, default=None, help="writes OUT.md and OUT.json")
    p.add_argument("--quick", action="store_true", help="tiny model, 300 rows a market, lr 0.03 (a tiny model collapses there, so the guard runs), 2 seeds, 16 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.lrs, args.seeds, args.max_steps, args.eval_every = "mtl-lora", "0.03", "0,1", 16, 4
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    args.out = output_path(args.out, "divergence_guard", args.quick)
    return args


def history(out: Path) -> list[dict]:
    steps = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    return json.loads((steps[-1] / "state.json").read_text())["progress"]["history"]


def collapses(hist: list[dict]) -> list[dict]:
    """Each evaluation of a guard-off run at which some market had collapsed as the loop's guard judges it:
    against its own peak spread so far and the best evaluation before it (the highest mean valid AUC)."""
    from relevance.training.divergence import collapsed_markets, peak_spreads

    found, best, best_value = [], {}, None
    for i, e in enumerate(hist):
        markets = collapsed_markets(best, e["score_std"], peak=peak_spreads(hist[: i + 1]))  # the loop's history
        if markets:
            found.append({"step": e["step"], "markets": markets})
        if best_value is None or e["valid_auc_mean"] > best_value:
            best, best_value = e["score_std"], e["valid_auc_mean"]
    return found


def test_aucs(out: Path) -> dict[str, float]:
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    preds = pd.read_parquet(out / "predictions" / "test.parquet")
    return {str(m): float(roc_auc_score(g["label"], g["score"])) for m, g in preds.groupby("market")}


def search_one(args: argparse.Namespace, ds: Path, base: str, method: str, lr: float, seed: int) -> dict:
    """One method × learning rate × seed: the guard-off run, and the guard-on run when it collapsed."""
    import pandas as pd

    from relevance.evaluation.metrics import paired_comparison
    from relevance.training.config import TrainConfig

    suffix = "" if args.b_lr_ratio is None else f"-b{args.b_lr_ratio:g}"

    def config(label: str, **kw) -> TrainConfig:
        return TrainConfig(data=str(ds), method=method, base_model=base, seed=seed, learning_rate=lr,
                           out=str(args.workdir / "runs" / f"{method}-{label}-s{seed}-lr{lr:g}{suffix}"), batch_size=32,
                           max_steps=args.max_steps, max_length=64, eval_every=args.eval_every,
                           b_lr_ratio=args.b_lr_ratio, track=False, progress=False, **kw)

    t0 = time.perf_counter()
    off = train_or_reuse(config("off", max_rollbacks=0))
    found = collapses(history(off))
    row = {"method": method, "lr": lr, "seed": seed, "collapses": found, "off": {
        "best_step": json.loads((off / "run_info.json").read_text())["best_step"], "test_auc": test_aucs(off)}}
    if found:
        on = train_or_reuse(config("guard"))
        info = json.loads((on / "run_info.json").read_text())
        cmp = paired_comparison(pd.read_parquet(off / "predictions" / "test.parquet"),
                                pd.read_parquet(on / "predictions" / "test.parquet"), n_boot=1000, seed=0)
        row["guard"] = {"best_step": info["best_step"], "rollbacks": info["rollbacks"], "test_auc": test_aucs(on),
                        "delta": {k: cmp["markets"][k] for k in cmp["macro"]["markets"]}, "delta_macro": cmp["macro"]}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def cells(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """(method, learning rate, seed) of every cell: the ``--grid`` blocks, else methods × lrs × seeds."""
    blocks = [g.split(":") for g in args.grid] if args.grid else [(args.methods, args.lrs, args.seeds)]
    for block in blocks:
        if len(block) != 3:
            raise SystemExit(f"--grid {':'.join(block)!r}: expected METHODS:LRS:SEEDS, e.g. 'lora:0.001:0-3'")
    return [(m, float(lr), s) for methods, lrs, seeds in blocks for m in methods.split(",") if m
            for lr in lrs.split(",") if lr for s in parse_seeds(seeds)]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    todo = cells(args)
    import torch

    torch.set_num_threads(args.threads)
    base = base_model_for(args)
    env, started, rows = environment(), time.perf_counter(), []
    ds = demo_dataset(args.workdir, args.quick)
    for method, lr, seed in todo:
        rows.append(search_one(args, ds, base, method, lr, seed))
        print(line(rows[-1]), flush=True)
    write_result(args, {"environment": env, "base_model": base, "runs": rows,
                        "wall_time_s": round(time.perf_counter() - started, 1)}, render)
    return 0


def macro(aucs: dict[str, float]) -> float:
    return sum(aucs.values()) / len(aucs)


def line(row: dict) -> str:
    text = f"{row['method']} lr {row['lr']:g} seed {row['seed']}: off macro {macro(row['off']['test_auc']):.3f} (best step " \
           f"{row['off']['best_step']})"
    if "guard" in row:
        g, where = row["guard"], _where(row["collapses"])
        text += (f"; collapsed {where}; guard macro {macro(g['test_auc']):.3f} (best step {g['best_step']}, "
                 f"{len(g['rollbacks'])} rollbacks)")
    return text


def _where(found: list[dict]) -> str:
    return "; ".join(f"{c['step']}: {', '.join(c['markets'])}" for c in found)


def _signed(d: dict) -> str:
    star = "✱" if d.get("significant") else ""
    return f"{d['diff']:+.3f}{star} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def summary(runs: list[dict]) -> list[str]:
    """Per method and learning rate: runs, runs with a collapse, mean test macro AUC with the guard off and on
    (a run without a collapse counts the same on both sides: it is the same run)."""
    lines = ["| method | lr | runs | runs with a collapse | mean test macro, guard off | guard on | over the "
             "collapsed runs: off → on |", "|---|---:|---:|---:|---:|---:|---|"]
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    for (method, lr), rs in groups.items():
        off = [macro(r["off"]["test_auc"]) for r in rs]
        on = [macro(r["guard"]["test_auc"]) if "guard" in r else o for r, o in zip(rs, off)]
        hit = [(o, n) for r, o, n in zip(rs, off, on) if "guard" in r]
        both = (f"{sum(o for o, _ in hit) / len(hit):.3f} → {sum(n for _, n in hit) / len(hit):.3f}" if hit else "—")
        lines.append(f"| {method} | {lr:g} | {len(rs)} | {len(hit)} | {sum(off) / len(off):.3f} | "
                     f"{sum(on) / len(on):.3f} | {both} |")
    return lines


def render(result: dict) -> str:
    runs, s, e = result["runs"], result["settings"], result["environment"]
    ratio = ratio_label(s.get("b_lr_ratio"))
    lines = ["# Divergence guard (issue 15)", "",
             f"`make demo`'s data, `{model_label(result['base_model'])}`, {s['max_steps']} steps × 32, max length 64, "
             f"evaluations every {s['eval_every']} steps; up-projections B at {ratio}. "
             f"Commit {e['commit']}, {e['date']}, {e['machine']['cpu']}; wall {result['wall_time_s']:.0f} s "
             "(runs already in the work folder with the same settings are reused, not retrained).", "",
             *summary(runs), "",
             "| method | lr | seed | collapsed (step: markets) | off: best step, test macro | guard: rollbacks, best step, "
             "test macro | Δ macro guard − off [95% paired interval] | Δ per market |",
             "|---|---:|---:|---|---|---|---|---|"]
    for r in runs:
        off = f"{r['off']['best_step']}, {macro(r['off']['test_auc']):.3f}"
        if "guard" not in r:
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['seed']} | — | {off} | (same run) | — | — |")
            continue
        g = r["guard"]
        where = _where(r["collapses"])
        backs = ", ".join(f"{b['step']}→{b['to_step']}" for b in g["rollbacks"])
        per = ", ".join(f"{m} {_signed(d)}" for m, d in g["delta"].items())
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seed']} | {where} | {off} | {backs}, {g['best_step']}, "
                     f"{macro(g['test_auc']):.3f} | {_signed(g['delta_macro'])} | {per} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
