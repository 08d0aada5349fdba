#!/usr/bin/env python3
"""Search for the MTL-LoRA market collapse (issue 15) in cheap settings, and report it when it appears.

On multilingual-e5 with crossing market policies, one seed in four gave one market a near-constant
score (std 0.001, AUC 0.60) under MTL-LoRA and per-market LoRA while shared LoRA served it well. This
benchmark trains the per-market methods on small planted multi-market settings (demo data: de and fr
label accessory and refurbished ads oppositely; MiniLM-L6 from its PyPI package) over many seeds, and
lists every market whose test scores are degenerate: near-zero spread (std < 0.01) or an AUC whose 95%
cluster-bootstrap interval contains 0.5.

    python benchmarks/collapse_search.py                  # 2 settings × 3 methods × 6 seeds (~35 min on 2 CPUs)
    python benchmarks/collapse_search.py --seeds 0-19 --methods mtl-lora
    python benchmarks/collapse_search.py --eval-every 20   # evaluations the divergence guard can act on
    python benchmarks/collapse_search.py --quick          # tiny in-code model, a few steps (smoke test)

Results: ``benchmarks/results/collapse_search.{md,json}`` (a quick run writes to a temp folder). Finished runs
in ``--workdir`` with the same settings are reused, so a search can be continued or widened.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _env import environment, model_label, output_path, ratio_label, train_or_reuse  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {  # name → (markets, rows of the largest market)
    "demo-conflict": ("de,fr,us", 1500),
    "demo-five": ("us,gb,de,fr,jp", 1500),
}
SPREAD_FLOOR = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {list(SETTINGS)}")
    p.add_argument("--methods", default="mtl-lora,per-market-lora,lora",
                   help="comma-separated; shared LoRA (lora) is the reference: how often does it look degenerate?")
    p.add_argument("--seeds", default="0-5", help="'0-5' or '0,3,7'")
    p.add_argument("--max-steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=None,
                   help="valid evaluations every N steps (default: once, at the end; the divergence guard needs more)")
    p.add_argument("--b-lr-ratio", type=float, default=None,
                   help="LoRA+ ratio of B's learning rate (train --b-lr-ratio; default: train's); runs get the suffix -bRATIO")
    p.add_argument("--max-rollbacks", type=int, default=None,
                   help="divergence guard's limit (train --max-rollbacks; 0 = off; default: train's)")
    p.add_argument("--base-model", default=None, help="encoder directory (default: MiniLM-L6 from its PyPI package)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ads-relevance-collapse"))
    p.add_argument("--out", type=Path, default=None, help="writes OUT.md and OUT.json")
    p.add_argument("--quick", action="store_true", help="tiny model, one setting, 2 seeds, 4 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.settings, args.seeds, args.max_steps, args.methods = "demo-conflict", "0,1", 4, "mtl-lora"
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    args.eval_every = args.eval_every or args.max_steps
    args.out = output_path(args.out, "collapse_search", args.quick)
    return args


def run_name(args: argparse.Namespace, method: str, seed: int) -> str:
    """``METHOD-seedS``, suffixed by any evaluation cadence, guard limit or LoRA+ ratio other than the defaults."""
    suffix = "" if args.eval_every == args.max_steps else f"-eval{args.eval_every}"
    suffix += "" if args.max_rollbacks is None else f"-rb{args.max_rollbacks}"
    suffix += "" if args.b_lr_ratio is None else f"-b{args.b_lr_ratio:g}"
    return f"{method}-seed{seed}{suffix}"


def parse_seeds(text: str) -> list[int]:
    if "-" in text and "," not in text:
        lo, hi = (int(v) for v in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(v) for v in text.split(",") if v.strip()]


def dataset(work: Path, setting: str, quick: bool) -> Path:
    """Demo data of the setting's markets, ingested (built once, reused)."""
    from data_contracts.splits import parse_fractions
    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest

    markets, rows = SETTINGS[setting]
    ds = work / setting / "ds"
    if not (ds / "ingest_summary.json").is_file():
        raw = work / setting / "raw"
        write_demo_data(raw, markets=markets, rows_per_market=300 if quick else rows, seed=0, overwrite=True)
        ingest(str(raw), str(ds), parse_fractions("0.7,0.15,0.15"), seed=0, progress=False)
    return ds


def market_spread(run_dir: Path) -> dict[str, dict]:
    """Per market on test: AUC with its interval, score std, and whether it is degenerate."""
    import pandas as pd

    from relevance.evaluation.metrics import auc_table

    preds = pd.read_parquet(run_dir / "predictions" / "test.parquet")
    table = auc_table(preds, n_boot=300)["markets"]
    out = {}
    for market, frame in preds.groupby("market"):
        e, std = table[str(market)], float(frame["score"].std())
        noise = e.get("auc") is not None and e["ci_low"] <= 0.5 <= e["ci_high"]
        out[str(market)] = {"auc": e.get("auc"), "ci_low": e.get("ci_low"), "ci_high": e.get("ci_high"),
                            "score_std": std, "degenerate": bool(std < SPREAD_FLOOR or noise)}
    return out


def base_model_for(args: argparse.Namespace) -> str:
    """``--base-model`` if given; else a tiny in-code model for ``--quick``, MiniLM-L6 from its PyPI package."""
    if args.base_model:
        return args.base_model
    if args.quick:
        from relevance.model.tiny import build_tiny_model

        return str(build_tiny_model(args.workdir / "tiny"))
    from relevance.pipeline_plan import demo_base_model

    return demo_base_model()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    from relevance.training.config import TrainConfig

    base = base_model_for(args)
    env, started, rows = environment(), time.perf_counter(), []
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}: choose from {list(SETTINGS)}")
    for setting in settings:
        ds = dataset(args.workdir, setting, args.quick)
        for method in [m for m in args.methods.split(",") if m]:
            for seed in parse_seeds(args.seeds):
                out = args.workdir / setting / "runs" / run_name(args, method, seed)
                t0 = time.perf_counter()
                train_or_reuse(TrainConfig(data=str(ds), method=method, base_model=base, out=str(out), seed=seed,
                                           max_steps=args.max_steps, batch_size=args.batch_size,
                                           max_length=args.max_length, learning_rate=args.learning_rate,
                                           eval_every=args.eval_every, track=False, progress=False,
                                           max_rollbacks=args.max_rollbacks, b_lr_ratio=args.b_lr_ratio))
                info = json.loads((out / "run_info.json").read_text())
                spread = market_spread(out)
                bad = sorted(m for m, v in spread.items() if v["degenerate"])
                rows.append({"setting": setting, "method": method, "seed": seed, "markets": spread,
                             "degenerate": bad, "best_step": info.get("best_step"),
                             "rollbacks": info.get("rollbacks", []),
                             "seconds": round(info.get("train_time_s") or time.perf_counter() - t0, 1)})
                print(f"{setting} {method} seed {seed}: " + ", ".join(
                    f"{m} {v['auc']:.3f} (std {v['score_std']:.3f})" for m, v in spread.items())
                    + (f"  DEGENERATE: {bad}" if bad else "")
                    + (f"  rollbacks at {[rb['step'] for rb in rows[-1]['rollbacks']]}" if rows[-1]["rollbacks"] else ""),
                    flush=True)
    write_result(args, {"environment": env, "base_model": base, "runs": rows,
                        "wall_time_s": round(time.perf_counter() - started, 1)}, render)
    return 0


def write_result(args: argparse.Namespace, result: dict, render) -> None:
    """``result`` plus the run's settings to ``--out``.json, its ``render``-ed table to ``--out``.md and stdout."""
    result = {**result, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(result), encoding="utf-8")
    print(render(result))


def summary_table(runs: list[dict]) -> list[str]:
    """Per setting and method: runs, degenerate market × seed cells, and the mean test AUC over markets
    and seeds (so a method that never collapses but learns less is visible too)."""
    lines = ["| setting | method | runs | degenerate cells | runs with one | mean test AUC |", "|---|---|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    for (setting, method), rs in groups.items():
        cells = [v for r in rs for v in r["markets"].values()]
        aucs = [v["auc"] for v in cells if v["auc"] is not None]
        mean = f"{sum(aucs) / len(aucs):.3f}" if aucs else "—"
        lines.append(f"| {setting} | {method} | {len(rs)} | {sum(len(r['degenerate']) for r in rs)} of {len(cells)} | "
                     f"{sum(1 for r in rs if r['degenerate'])} | {mean} |")
    return lines


def guard_label(settings: dict) -> str:
    """How the table names the divergence guard's setting: it needs an evaluation before the last to act."""
    limit = settings.get("max_rollbacks")
    if limit == 0:
        return "off"
    if (settings.get("eval_every") or settings["max_steps"]) >= settings["max_steps"]:
        return "idle (one evaluation, nothing to go back to)"
    return "train's default limit" if limit is None else f"at most {limit} rollbacks"


def render(result: dict) -> str:
    runs = result["runs"]
    hits = [r for r in runs if r["degenerate"]]
    s = result["settings"]
    lines = ["# Collapse search (issue 15)", "",
             f"{len(runs)} runs (setting × method × seed) on `{model_label(result['base_model'])}`, {s['max_steps']} "
             f"steps × {s['batch_size']}, lr {s['learning_rate']}, max length {s['max_length']}; commit "
             f"{result['environment']['commit']}, {result['environment']['date']}, wall {result['wall_time_s']:.0f} s "
             f"(training {sum(r.get('seconds') or 0 for r in runs):.0f} s summed over the runs; a run reused from the "
             "work folder counts the time it took when it was trained).",
             f"Valid evaluation every {s.get('eval_every') or s['max_steps']} steps (the best one's weights ship); "
             f"divergence guard: {guard_label(s)}; B's learning rate: "
             f"{ratio_label(s.get('b_lr_ratio'))}.",
             "A market is degenerate when its test score std < 0.01 or its AUC interval contains 0.5. Rollbacks: "
             "a→b (markets) went back from step a to step b because those markets collapsed; \"alone\": only their "
             "own adapters went back, the other markets kept their weights.", "",
             f"**Degenerate markets found: {sum(len(r['degenerate']) for r in runs)} in {len(hits)} of {len(runs)} runs.**",
             "", *summary_table(runs), "",
             "| setting | method | seed | per-market test AUC (score std) | degenerate | best step | rollbacks |",
             "|---|---|---:|---|---|---:|---|"]
    for r in runs:
        cells = ", ".join(f"{m} {v['auc']:.3f} ({v['score_std']:.3f})" for m, v in r["markets"].items())
        rollbacks = ", ".join(f"{rb['step']}→{rb['to_step']} ({', '.join(rb['markets'])}"
                              f"{' alone' if rb.get('scope') == 'markets' else ''})" for rb in r.get("rollbacks", []))
        lines.append(f"| {r['setting']} | {r['method']} | {r['seed']} | {cells} | {', '.join(r['degenerate']) or '—'} | "
                     f"{r.get('best_step', '—')} | {rollbacks or '—'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
