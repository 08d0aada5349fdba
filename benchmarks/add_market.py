"""Add-market benchmark: launch a held-out language on a trained MTL-LoRA run, against retraining.

On the quality benchmark's data (``benchmarks/quality.py``: XQuAD languages and JSQuAD's jp), one
market is held out; MTL-LoRA trains on the others; ``add_markets`` then adds the held-out market,
training only its Λ_t and w_t (r² + n numbers per adapted layer) and, with ``--head``, its head
copy. Its test AUC and wall time are compared with (a) MTL-LoRA retrained on every market and (b)
shared LoRA on every market, both under the quality benchmark's budget (those two runs are the
quality benchmark's own seed runs when its work directory is shared, so they are reused, not
retrained). The add step sees as many examples of the new market as a joint run shows each market
(``max_steps / markets`` steps) unless ``--add-steps`` says otherwise. Paired cluster-bootstrap
intervals (by query) compare the same test rows.

    python benchmarks/add_market.py            # full: e5-small, 7 markets, hold out hi
    python benchmarks/add_market.py --quick    # smoke run (CI): 2 markets, a few steps, temp folder
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
from _env import environment  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = quality.build_parser(__doc__.split("\n\n")[0])  # the quality benchmark's data and budget options
    p.add_argument("--holdout", default="hi", help="the market launched with add-market")
    p.add_argument("--add-steps", type=int, default=None, help="steps of the add step (default: max_steps / markets)")
    p.add_argument("--head", action="store_true", help="also train the new market's own head copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provenance", default="", metavar="TEXT",
                   help="how reused runs were made (e.g. by an earlier quality run in the same --workdir): printed "
                        "under the report's header, since its wall time is then this invocation's alone")
    args = quality.finish_args(p, p.parse_args(argv), "add_market")
    if args.quick and args.holdout == p.get_default("holdout"):
        args.holdout = "jp"  # the quick run's markets are en, jp
    return args


def main(argv: list[str] | None = None) -> int:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)
    args = parse_args(argv)
    from data_contracts.markets import parse_markets
    import pandas as pd

    from relevance.evaluation.metrics import evaluate_run, metrics_path, paired_comparison
    from relevance.training.add_market import add_markets

    markets = [*parse_markets(args.markets), *quality.parse_twins(args.twins)]  # the quality benchmark's markets
    if args.holdout not in markets or len(markets) < 2:
        raise SystemExit(f"--holdout {args.holdout!r} must be one of --markets {markets}, with at least one other")
    rest = [m for m in markets if m != args.holdout]
    env, started = environment(), time.perf_counter()
    base = quality.base_model(args)
    data = quality.build_data(args, markets)
    runs = {}
    for name, method, on in (("mtl-lora (all markets)", "mtl-lora", markets), ("lora (all markets)", "lora", markets)):
        print(f"[{name}]", flush=True)
        config = quality.train_config(args, base, on, method, args.seed)
        runs[name] = quality.run_one(config, args.n_boot, args.keep_runs)
    print(f"[mtl-lora without {args.holdout}]", flush=True)
    partial = quality.train_config(args, base, rest, "mtl-lora", args.seed)
    partial = type(partial).from_dict({**partial.to_dict(), "out": str(Path(partial.out).with_name(
        f"mtl-lora-without-{args.holdout}-seed{args.seed}"))})
    runs["mtl-lora (others)"] = quality.run_one(partial, args.n_boot, args.keep_runs)
    steps = args.add_steps or math.ceil(args.max_steps / len(markets))
    grown = Path(partial.out).with_name(f"add-{args.holdout}-seed{args.seed}")
    print(f"[add {args.holdout}: {steps} steps]", flush=True)
    shutil.rmtree(grown, ignore_errors=True)
    tick = time.perf_counter()
    result = add_markets(partial.out, partial.data, [args.holdout], grown, head=args.head, max_steps=steps,
                         eval_every=steps, track=False, progress=False)
    add_wall = time.perf_counter() - tick
    evaluate_run(grown, n_boot=args.n_boot, seed=0)
    runs["add-market"] = {"run_dir": str(grown), "info": result.run_info,
                          "metrics": json.loads(metrics_path(grown).read_text())}
    def test_preds(run_dir: str | Path) -> pd.DataFrame:
        return pd.read_parquet(Path(run_dir) / "predictions" / "test.parquet")

    preds = {k: test_preds(v["run_dir"]) for k, v in runs.items() if k != "mtl-lora (others)"}
    only = {k: p[p["market"] == args.holdout] for k, p in preds.items()}
    rows = []
    for name in ("add-market", "mtl-lora (all markets)", "lora (all markets)"):
        m = runs[name]["metrics"]["markets"][args.holdout]
        info = runs[name]["info"]
        rows.append({"approach": name, "auc": m["auc"], "ci_low": m["ci_low"], "ci_high": m["ci_high"],
                     "train_time_s": info.get("train_time_s"), "trainable_params": info.get("trainable_params"),
                     "steps": steps if name == "add-market" else args.max_steps})
    deltas = {peer: paired_comparison(only[peer], only["add-market"], n_boot=args.n_boot)["markets"][args.holdout]
              for peer in ("mtl-lora (all markets)", "lora (all markets)")}
    # Merged models of old markets are bit-identical (tests/relevance/training/test_add_market.py); scores
    # predicted in mixed batches may differ in the last bits, because the padding of a batch differs.
    before = test_preds(partial.out).set_index("example_id")["score"]
    after = preds["add-market"].set_index("example_id")["score"].reindex(before.index)
    drift = float((after - before).abs().max())
    out = {"benchmark": "add_market", "holdout": args.holdout, "markets": markets, "add_steps": steps, "add_wall_s": round(add_wall, 1),
           "head": args.head, "rows": rows, "deltas": deltas, "old_markets_max_score_change": drift,
           "partial_run_train_time_s": runs["mtl-lora (others)"]["info"].get("train_time_s"),
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "squad"},
           "environment": env, "wall_time_s": round(time.perf_counter() - started, 1), "data": data["ingest"]["markets"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(render(out), encoding="utf-8")
    print(render(out))
    print(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


def render(r: dict) -> str:
    """The markdown table: held-out market's test AUC, cost, and paired deltas of add-market vs each peer."""
    env = r["environment"]
    lines = [f"# Add a market without retraining: {r['holdout']} held out", "",
             f"{env['date']}, commit {env['commit']}, {env['machine']['cpu']} (load {env['machine']['load_avg_1min_at_start']}); wall {r['wall_time_s']} s. "
             f"Markets {', '.join(r['markets'])}; add step {r['add_steps']} steps"
             f"{' with its own head copy' if r['head'] else ''}; precision {r['settings'].get('precision')}. "
             f"Test AUC of {r['holdout']} [95% cluster-bootstrap interval over queries].", "",
             *([f"How the runs were made: {r['settings']['provenance']}", ""] if r["settings"].get("provenance") else []),
             "| approach | test AUC | steps | train time (s) | trainable params |", "|---|---|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['approach']} | {row['auc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | "
                     f"{row['steps']} | {row['train_time_s']} | {row['trainable_params']:,} |")
    lines += ["", "| add-market − peer | Δ AUC [95% paired interval] |", "|---|---|"]
    for peer, d in r["deltas"].items():
        lines.append(f"| vs {peer} | {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |")
    lines += ["", f"The other markets' test scores in the grown run differ from the partial run's by at most "
              f"{r['old_markets_max_score_change']:.1e} (batch padding, and in bf16 its rounding; their merged models are "
              "bit-identical). "
              f"The partial run (without "
              f"{r['holdout']}) trained in {r['partial_run_train_time_s']} s; the whole add step (load, train, predict every market) took "
              f"{r['add_wall_s']} s of wall time. Train times are the training loop's own.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
