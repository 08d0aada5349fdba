"""Collect every benchmark's result file into one page, ``benchmarks/RESULTS.md``.

Why: each benchmark writes its own JSON (and the quality one a Markdown report); a reader wants one
page with every figure we quote, each next to the file it came from. Tables are rendered by the
benchmarks' own formatters, so this page and the scripts' printed output never disagree. A result
file that is absent is listed as not run, never filled in.

    python benchmarks/collect.py                                   # benchmarks/results -> RESULTS.md
    python benchmarks/collect.py --results DIR --out DIR/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _ingest(data: dict) -> str:
    lines = [f"{'rows':>10} {'seconds':>9} {'rows/s':>10} {'peak RSS MB':>12}"]
    for r in data["results"]:
        lines.append(f"{r['rows']:>10,} {r['seconds']:>9.1f} {r['rows_per_s']:>10,.0f} {r['peak_rss_mb']:>12.0f}")
    lines.append(f"peak memory ratio largest/smallest input: {data['peak_memory_ratio']:.2f}x; "
                 f"{data.get('date', '?')} on {data.get('cpus', '?')} CPUs")
    return "\n".join(lines)


def _adapter(data: dict) -> str:
    from adapter_speed import _table

    return _table(data)


def _scoring(data: dict) -> str:
    from scoring_speed import format_table

    return format_table(data)


def _gpu_scoring(data: dict) -> str:
    from gpu_speed import format_table

    return format_table(data)


_SPEED_HERE = (
    ("Ingest speed", "ingest_speed.json", _ingest, "benchmarks/ingest_speed.py"),
    ("Adapter speed (default threads)", "adapter_speed.json", _adapter, "benchmarks/adapter_speed.py"),
    ("Adapter speed (1 thread)", "adapter_speed_1thread.json", _adapter, "benchmarks/adapter_speed.py --threads 1"),
    ("Adapter speed, the training workload (e5-small, auto precision, 7 markets, 16 x 128)", "adapter_speed_real.json",
     _adapter, "benchmarks/adapter_speed.py --real"),
    ("Adapter speed, the training workload in fp32 (auto's peer where auto means bf16)", "adapter_speed_real_fp32.json",
     _adapter, "benchmarks/adapter_speed.py --real --precision fp32"),
    ("Adapter speed on GPU", "adapter_speed_gpu.json", _adapter, "benchmarks/gpu.sh"),
    ("Scoring speed, short ads (MiniLM-L6)", "scoring_speed.json", _scoring, "benchmarks/scoring_speed.py"),
    ("Scoring speed, long pairs (trained e5-small)", "scoring_speed_long.json", _scoring,
     "benchmarks/scoring_speed.py --workload long"),
    ("Scoring speed on GPU, long pairs", "scoring_speed_gpu.json", _scoring, "benchmarks/gpu.sh"),
    ("Adapter speed on an H200, e5-small's architecture with random weights (16 x 128)",
     "gpu_h200/adapter_speed_gpu_16.json", _adapter, "benchmarks/gpu_speed.sh"),
    ("Adapter speed on an H200, e5-small's architecture with random weights (128 x 128)",
     "gpu_h200/adapter_speed_gpu_128.json", _adapter, "benchmarks/gpu_speed.sh"),
    ("Scoring speed on an H200, long pairs, e5-small's architecture with random weights",
     "gpu_h200/gpu_speed.json", _gpu_scoring, "benchmarks/gpu_speed.sh"),
)
# The CPU benchmarks rerun on other machines: the same section, its file named NAME_<suffix>.json. The
# machines differ in what bf16 costs (bf16 GEMMs ran 9x fp32's rate with AMX, 4.6x on the Zen 5, 0.11x on
# the Zen 3, where auto means fp32), so the ratios they give do too: all are kept.
OTHER_MACHINES = (
    ("zen5", "an AMD EPYC (Zen 5: AVX512-BF16, no AMX)",
     ("adapter_speed_real.json", "adapter_speed_real_fp32.json", "scoring_speed.json", "scoring_speed_long.json",
      "ingest_speed.json")),
    ("zen3", "an AMD EPYC (Zen 3: AVX2, no native bf16, so auto = fp32)",
     ("adapter_speed_real.json", "scoring_speed.json", "ingest_speed.json")),
)
SPEED = (*_SPEED_HERE, *((f"{title}, on {machine}", name.replace(".json", f"_{suffix}.json"), render, command)
                         for suffix, machine, names in OTHER_MACHINES
                         for title, name, render, command in _SPEED_HERE if name in names))
QUALITY = (("Quality (CPU)", "quality.md"), ("Quality on GPU", "quality_gpu.md"),
           ("Training precision: auto (bf16) against fp32, seeds 0-1 (issue 16)", "quality_precision.md"),
           ("Training precision on an AMD EPYC (2026-12-03; CPU family not recorded), before cpu_dropout.py (issue 16)",
            "quality_precision_zen4.md"),
           ("Training precision on an AMD EPYC (Zen 5: AVX512-BF16, no AMX), seed 0 (issue 16)",
            "quality_precision_zen5.md"),
           ("LoRA+ (B at 4x the learning rate, every method) on the quality benchmark, seed 0, bf16, Zen 5 (issue 15)",
            "quality_lora_plus_zen5.md"),
           ("LoRA+ at 4x with MTL-LoRA's task matrices at 3x, quality benchmark, seed 0, bf16, Zen 5 (issue 15)",
            "quality_lora_plus_tlr3_zen5.md"),
           ("LoRA+ at 2x (every method) on the quality benchmark, seed 0, bf16, Zen 5 (issue 15)",
            "quality_lora_plus2_zen5.md"),
           ("LoRA+ at the default 12 / max(3, T) (1.33x for these 9 markets), seeds 0-2, bf16, Zen 5 (issue 15)",
            "quality_lora_plus_rule_zen5.md"),
           ("Today's defaults, MTL-LoRA and shared LoRA, seeds 0-1, bf16, AMX Xeon, at fe4583e (the head start's peer)",
            "quality_defaults_amx.md"),
           ("The head start (--head-start 1024, every method) on the quality benchmark, seeds 0-1, bf16, AMX Xeon (issue 15)",
            "quality_head_start.md"),
           ("MTL-LoRA's pull toward shared LoRA (--task-decay 1), seeds 0-1, bf16, AMX Xeon (issue 15)",
            "quality_task_decay1.md"),
           ("The pull at --task-decay 3, same seeds and machine (issue 15)", "quality_task_decay3.md"),
           ("The pull at --task-decay 10, same seeds and machine (issue 15)", "quality_task_decay10.md"),
           ("The pull at --task-decay 10 toward the markets' mean (--task-decay-target mean), same seeds and machine "
            "(issue 15)", "quality_task_decay10_mean.md"),
           ("The pull at --task-decay 10 on the Lambda_t alone (--task-decay-only lam), same seeds and machine (issue 15)",
            "quality_task_decay10_lam.md"),
           ("LoRA+ on the demo's data: MTL-LoRA and per-market LoRA vs shared LoRA at the default (2.4x), 4 seeds (issue 15)",
            "lora_plus_demo.md"),
           ("The same at one rate (--b-lr-ratio 1), same seeds and CPU (issue 15)", "lora_plus_demo_one_rate.md"),
           ("LoRA+ at the default (4x for 3 markets): per-market LoRA vs shared LoRA, nested policies, seeds 0-1 (issue 15)",
            "lora_plus_nested_pml.md"),
           ("The same at one rate (--b-lr-ratio 1), same seeds and CPU (issue 15)", "lora_plus_nested_pml_one_rate.md"),
           ("Per-market LoRA with a 0.5 shared start at LoRA+'s default, nested policy data, seeds 0-3 (issue 15)",
            "lora_plus_nested_pml_shared_start.md"),
           ("Per-market LoRA with a 0.5 shared start at LoRA+'s default, demo data, seeds 0-3 (issue 15)",
            "lora_plus_demo_pml_shared_start.md"),
           ("Collapse search (MTL-LoRA, issue 15)", "collapse_search.md"),
           ("Collapse search before the fix (issue 15)", "collapse_search_before_fix.md"),
           ("Collapse search on the demo's conflict data, evaluated every 20 steps, whole-model rollback (issue 15)",
            "collapse_search_demo_conflict_eval20.md"),
           ("The same for per-market LoRA with the per-market rollback (issue 15)",
            "collapse_search_demo_conflict_eval20_pml_per_market_rollback.md"),
           ("Divergence guard on the demo recipe: MTL-LoRA at lr 1e-3 and 2e-3, shared LoRA (issue 15)", "divergence_guard.md"),
           ("Divergence guard on the demo recipe: MTL-LoRA at lr 3e-3 (issue 15)", "divergence_guard_lr3e-3.md"),
           ("Divergence guard on the demo recipe: shared LoRA at one rate, B 1x (issue 15)", "divergence_guard_lora_one_rate.md"),
           ("The demo with and without the head start, seed 0 (issue 15)", "demo_head_start.md"),
           ("Policy markets, nested (issue 15)", "policy_nested.md"),
           ("Policy markets, crossing (issue 15)", "policy_crossing.md"),
           ("Policy markets, crossing, with MTL-LoRA's pull on the Lambda_t (--task-decay 10 --task-decay-only lam), "
            "seeds 0-3, bf16, AMX Xeon (issue 15)", "policy_crossing_task_decay.md"),
           ("Policy markets, nested, with and without MTL-LoRA's pull on the Lambda_t, seeds 0-3, bf16, AMX Xeon "
            "(issue 15)", "policy_nested_task_decay.md"),
           ("MTL-LoRA with and without the pull on the Lambda_t on the demo's data, seeds 0-7, bf16, AMX Xeon (issue 15)",
            "task_decay_demo.md"),
           ("Per-market LoRA with and without its pull toward the markets' mean (--task-decay 50), "
            "nested policy data, seeds 0-3, bf16, AMX Xeon (issue 15)", "per_market_pull_nested.md"),
           ("Per-market LoRA with its pull toward the markets' mean, crossing policy data, seeds 0-3, bf16, AMX Xeon "
            "(issue 15)", "per_market_pull_crossing.md"),
           ("Per-market LoRA with and without its pull toward the markets' mean, demo data, seeds 0-7, bf16, AMX Xeon "
            "(issue 15)", "per_market_pull_demo.md"),
           ("Quality benchmark, per-market LoRA without its pull, seeds 0-1, bf16, AMX Xeon (issue 15)",
            "quality_per_market.md"),
           ("Quality benchmark, per-market LoRA with its pull toward the markets' mean (--task-decay 50), seeds 0-1, "
            "bf16, AMX Xeon (issue 15)", "quality_per_market_pull.md"),
           ("Per-market LoRA with its shared adapter (the default: departures pulled toward it, --task-decay 200), "
            "nested policy data, seeds 0-3, bf16, AMX Xeon (issue 15)", "per_market_shared_nested.md"),
           ("Per-market LoRA with its shared adapter, crossing policy data, seeds 0-3, bf16, AMX Xeon (issue 15)",
            "per_market_shared_crossing.md"),
           ("Per-market LoRA with its shared adapter, demo data, seeds 0-7, bf16, AMX Xeon (issue 15)",
            "per_market_shared_demo.md"),
           ("Quality benchmark, per-market LoRA with its shared adapter (the default), seeds 0-1, bf16, AMX Xeon "
            "(issue 15)", "quality_per_market_shared.md"),
           ("Add a market without retraining (issue 14)", "add_market.md"),
           ("MTL-LoRA's knobs n and τ on planted data (issue 13)", "mtl_knobs.md"),
           ("Per-market LoRA's learning-rate multiple on the demo data (issue 15)", "per_market_lr_demo.md"),
           ("Per-market LoRA on the nested policy data (issue 15)", "per_market_lr_nested.md"),
           ("Per-market LoRA's LoRA+ ratio (2x vs 4x) and MTL-LoRA on the nested policy data, fp32 (issue 15)",
            "per_market_lr_nested_b_ratio_fp32.md"),
           ("Evaluation cadence and the divergence guard on the nested policy data (issue 15)",
            "eval_cadence_nested.md"),
           ("Per-market LoRA's shared start on the demo data (issue 15)", "per_market_lr_shared_start_demo.md"),
           ("Per-market LoRA's shared start on the nested policy data (issue 15)",
            "per_market_lr_shared_start_nested.md"),
           ("Per-market LoRA's shared start on the crossing policy data (issue 15)",
            "per_market_lr_shared_start_crossing.md"))


def _demote(md: str) -> str:
    """Headings one level down, so an embedded report nests under this page's section."""
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", md, flags=re.M)


def collect(results: Path, out: Path) -> str:
    parts = ["# Benchmark results", "",
             f"Collected from `{results}` by `benchmarks/collect.py` (`make bench` reruns everything). "
             "Figures were measured on the machine each section names; ratios are against the peer "
             "measured in the same run.", ""]
    missing = []
    for title, name, render, command in SPEED:
        path = results / name
        if not path.is_file():
            missing.append(f"{title} (`{name}`, from `{command}`)")
            continue
        parts += [f"## {title}", "", f"From `{name}` (`{command}`):", "", "```", render(json.loads(path.read_text())),
                  "```", ""]
    for title, name in QUALITY:
        path = results / name
        if not path.is_file():
            missing.append(f"{title} (`{name}`)")
            continue
        body = path.read_text(encoding="utf-8").split("\n", 1)[1]  # drop the report's own title
        parts += [f"## {title}", "", f"From `{name}`:", "", _demote(body).strip(), ""]
    if missing:
        parts += ["## Not run", "", *(f"- {m}" for m in missing), ""]
    text = "\n".join(parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / "results", help="folder of result files")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        p.error(f"--results {args.results} is not a folder")
    collect(args.results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
