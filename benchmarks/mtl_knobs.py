"""MTL-LoRA's own knobs (issue 13): how n (up-projections B_i) and τ (mixing temperature) move the result.

On the planted demo data (``relevance.data.demo_data``: de and fr label accessory and refurbished ads
oppositely, us agrees with neither conflict) with a tiny in-code BERT, MTL-LoRA trains with the
default knobs and with one knob changed at a time, beside shared LoRA under the same budget and seeds.
Per market and seed: test AUC difference to shared LoRA with a paired cluster-bootstrap interval.
It is cheap (a few minutes on 2 CPUs), so it can justify defaults; it says nothing about real text
(``benchmarks/quality.py`` and the policy tables do).

    python benchmarks/mtl_knobs.py            # 5 variants × 3 seeds → benchmarks/results/mtl_knobs.{md,json}
    python benchmarks/mtl_knobs.py --quick    # 2 variants, 1 seed, a few steps (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from _env import environment, output_path  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name → TrainConfig fields of MTL-LoRA; "lora" is the shared-LoRA reference.
VARIANTS = {
    "default (n=3, τ=0.1)": {},
    "n=1": {"n_up": 1},
    "n=6": {"n_up": 6},
    "τ=1": {"mtl_temperature": 1.0},
    "τ=0.02": {"mtl_temperature": 0.02},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--markets", default="de,fr,us")
    p.add_argument("--rows", type=int, default=3000, help="demo rows per market")
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ads-relevance-mtl-knobs"))
    p.add_argument("--out", type=Path, default=None, help="writes OUT.md and OUT.json")
    p.add_argument("--quick", action="store_true", help="2 variants, 1 seed, 6 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.rows, args.max_steps = "0", 300, 6
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    args.out = output_path(args.out, "mtl_knobs", args.quick)
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import pandas as pd
    import torch

    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest
    from relevance.evaluation.metrics import paired_comparison
    from relevance.model.tiny import build_tiny_model
    from relevance.training.loop import TrainConfig, train

    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other core alone
    env, started = environment(), time.perf_counter()
    variants = dict(list(VARIANTS.items())[:2]) if args.quick else VARIANTS
    seeds = [int(s) for s in args.seeds.split(",")]
    root = args.workdir
    shutil.rmtree(root, ignore_errors=True)  # every run of this benchmark starts from nothing
    write_demo_data(root / "raw", args.markets, rows_per_market=args.rows, seed=0)
    ingest(str(root / "raw"), root / "ds", progress=False)
    model = build_tiny_model(root / "tiny", hidden=64, layers=1, heads=4, seed=0)

    def run(name: str, method: str, seed: int, **extra) -> Path:
        out = root / "runs" / f"{name}-seed{seed}"
        train(TrainConfig(data=str(root / "ds"), method=method, base_model=str(model), out=str(out),
                          max_steps=args.max_steps, eval_every=args.max_steps, batch_size=64, learning_rate=5e-3,
                          sampling="temperature", sampling_temperature=10.0, seed=seed, track=False,
                          progress=False, **extra))
        return out

    results: dict[str, dict] = {}
    for seed in seeds:
        base = pd.read_parquet(run("lora", "lora", seed) / "predictions" / "test.parquet")
        for i, (name, extra) in enumerate(variants.items()):
            print(f"[seed {seed}] mtl-lora {name}", flush=True)
            preds = pd.read_parquet(run(f"mtl{i}", "mtl-lora", seed, **extra) / "predictions" / "test.parquet")
            comp = paired_comparison(base, preds, n_boot=1000, seed=0)
            results.setdefault(name, {})[seed] = {
                m: {k: e[k] for k in ("auc_a", "auc_b", "diff", "ci_low", "ci_high", "significant")}
                for m, e in {**comp["markets"], "macro": comp["macro"]}.items()}
    out = {"benchmark": "mtl_knobs", "variants": variants, "seeds": seeds,
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "environment": env, "results": results, "wall_time_s": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(render(out), encoding="utf-8")
    print(render(out))
    return 0


def render(r: dict) -> str:
    env = r["environment"]
    keys = list(next(iter(next(iter(r["results"].values())).values())))
    lines = ["# MTL-LoRA's knobs on planted data: n and τ", "",
             f"{env['date']}, commit {env['commit']}, {env['machine']['cpu']} (load "
             f"{env['machine']['load_avg_1min_at_start']} at start); wall {r['wall_time_s']} s. Demo data "
             f"{r['settings']['markets']} ({r['settings']['rows']} rows each; de and fr conflict), tiny BERT, "
             f"{r['settings']['max_steps']} steps × 64, seeds {', '.join(map(str, r['seeds']))}. Cell: MTL-LoRA − "
             "shared LoRA test AUC, mean over seeds, and per seed (✱: paired 95% interval excludes 0).", "",
             "| variant | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, by_seed in r["results"].items():
        cells = []
        for k in keys:
            per = [by_seed[s][k] for s in sorted(by_seed, key=int)]
            mean = statistics.fmean(p["diff"] for p in per)
            cells.append(f"**{mean:+.3f}** (" + ", ".join(f"{p['diff']:+.3f}{'✱' if p['significant'] else ''}"
                                                        for p in per) + ")")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    sys.exit(main())
