#!/usr/bin/env python3
"""Tables for the policy-market runs of ``../shared/tools/nested_policy.sh`` and ``crossing_policy.sh``.

Each script trains ``mtl-lora`` and ``lora`` into ``WORK/run-<method>/`` for one seed (``SEED=N``).
This collects several such work folders (one per seed, and per code version: ``--label before=DIR,…``)
and writes per-market and macro test AUC of both methods with the paired difference MTL-LoRA − shared
LoRA and its 95% cluster-bootstrap interval (over ``query_id``), per seed, plus the mean over seeds and
how many seeds each market is better / worse / inside the noise.

    python benchmarks/policy_tables.py --kind nested --runs before:0=/work/n-s0 --runs before:1=/work/n-s1 \
        --out benchmarks/results/policy_nested
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _env import environment  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
METHODS = ("mtl-lora", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True, choices=("nested", "crossing"))
    p.add_argument("--runs", action="append", default=[], metavar="LABEL:SEED=WORK",
                   help="a script's work folder, e.g. before:0=/work/exp/nested-s0 (repeatable)")
    p.add_argument("--previous", type=Path, default=None, metavar="OUT.json",
                   help="keep the seeds of an earlier result (their work folders may be gone); --runs adds "
                        "seeds or replaces the same label and seed")
    p.add_argument("--note", action="append", default=[], help="a line for the header (e.g. the commit of a label)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    return p.parse_args(argv)


def one_seed(work: Path, n_boot: int) -> dict:
    """Per-market AUC of both methods and the paired difference, for one work folder."""
    import pandas as pd

    from relevance.evaluation.metrics import auc_table, paired_comparison

    preds = {m: pd.read_parquet(work / f"run-{m}" / "predictions" / "test.parquet") for m in METHODS}
    aucs = {m: auc_table(p, n_boot=n_boot) for m, p in preds.items()}
    diff = paired_comparison(preds["lora"], preds["mtl-lora"], n_boot=n_boot)
    rows = {}
    for market in sorted(diff["markets"]):
        d = diff["markets"][market]
        rows[market] = {"mtl-lora": aucs["mtl-lora"]["markets"][market]["auc"],
                        "lora": aucs["lora"]["markets"][market]["auc"],
                        "diff": d["diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                        "mtl_score_std": float(preds["mtl-lora"].loc[preds["mtl-lora"]["market"] == market, "score"].std())}
    m = diff["macro"]
    rows["macro"] = {"mtl-lora": m["auc_b"], "lora": m["auc_a"], "diff": m["diff"], "ci_low": m["ci_low"],
                     "ci_high": m["ci_high"]}
    return {"markets": rows, "mixing": mixing_probe(work / "run-mtl-lora")}


def mixing_probe(run: Path) -> dict:
    """What MTL-LoRA's per-market parameters became (the mechanism of issue 15), from the saved adapter.

    Per market: the mean over adapted layers of max_i p_t,i (1/n = uniform, 1 = one B_i owned) and of
    ‖Λ_t − I‖_F; and for the first two markets (the policy twins) the share of layers where both
    put most weight on the same B_i.
    """
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    tau = float(meta.get("config", meta).get("temperature", 0.1))
    task_map = meta.get("task_map") or {}
    layers = sorted({k.rsplit(".mix_logits.", 1)[0] for k in tensors if ".mix_logits." in k})
    if not layers or len(task_map) < 2:
        return {}
    p = torch.stack([torch.softmax(torch.stack([tensors[f"{layer}.mix_logits.{t}"].float() for t in range(len(task_map))])
                                   / tau, -1) for layer in layers])  # (layers, T, n)
    lam = torch.stack([torch.stack([(tensors[f"{layer}.lam.{t}"].float() - torch.eye(tensors[f"{layer}.lam.{t}"].shape[0])).norm()
                                    for t in range(len(task_map))]) for layer in layers])  # (layers, T)
    top = p.argmax(-1)
    names = sorted(task_map, key=task_map.get)
    return {"max_p": {m: round(float(p[:, i].max(-1).values.mean()), 3) for i, m in enumerate(names)},
            "lambda_dev": {m: round(float(lam[:, i].mean()), 3) for i, m in enumerate(names)},
            "twins_share_top_b": f"{int((top[:, 0] == top[:, 1]).sum())}/{len(layers)}", "twins": names[:2]}


def _verdict(r: dict) -> str:
    return "better" if r["ci_low"] > 0 else ("worse" if r["ci_high"] < 0 else "n.s.")


def render(result: dict) -> str:
    kind = result["kind"]
    lines = [f"# Policy markets on real text: {kind}", "",
             f"`../shared/tools/{kind}_policy.sh` (XQuAD, multilingual-e5-small, 200 steps × 16, lr 5e-4, bf16), "
             "test ROC-AUC per seed; Δ = MTL-LoRA − shared LoRA with its paired 95% cluster-bootstrap interval "
             "(✱ excludes 0). Low score std flags a collapsed market.", *[f"- {n}" for n in result["notes"]], ""]
    for label, seeds in result["runs"].items():
        lines += [f"## {label}", "", "| seed | market | mtl-lora | lora | Δ [95% CI] | mtl score std |",
                  "|---:|---|---:|---:|---|---:|"]
        for seed, one in sorted(seeds.items(), key=lambda kv: int(kv[0])):
            for market, r in one["markets"].items():
                star = "✱" if _verdict(r) != "n.s." else ""
                std = f"{r['mtl_score_std']:.3f}" if "mtl_score_std" in r else ""
                lines.append(f"| {seed} | {market} | {r['mtl-lora']:.3f} | {r['lora']:.3f} | {r['diff']:+.3f} "
                             f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]{star} | {std} |")
        markets = list(next(iter(seeds.values()))["markets"])
        lines += ["", "Mean over seeds, and per market how many seeds MTL-LoRA is better / n.s. / worse:", "",
                  "| market | mtl-lora | lora | mean Δ | better / n.s. / worse |", "|---|---:|---:|---:|---|"]
        for market in markets:
            rs = [one["markets"][market] for one in seeds.values()]
            mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("mtl-lora", "lora", "diff")}
            counts = [sum(_verdict(r) == v for r in rs) for v in ("better", "n.s.", "worse")]
            lines.append(f"| {market} | {mean['mtl-lora']:.3f} | {mean['lora']:.3f} | {mean['diff']:+.3f} | "
                         f"{counts[0]} / {counts[1]} / {counts[2]} |")
        lines += ["", "MTL-LoRA's per-market parameters after training (mean over the adapted layers): max_i p_t,i "
                  "(1/n uniform, 1 one-hot), ‖Λ_t − I‖_F, and in how many layers the first two markets put most "
                  "weight on the same B_i:", "", "| seed | max p per market | ‖Λ_t − I‖ per market | same top B_i |",
                  "|---:|---|---|---|"]
        for seed, one in sorted(seeds.items(), key=lambda kv: int(kv[0])):
            mix = one.get("mixing") or {}
            if mix:
                fmt = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
                lines.append(f"| {seed} | {fmt(mix['max_p'])} | {fmt(mix['lambda_dev'])} | "
                             f"{mix['twins_share_top_b']} ({' & '.join(mix['twins'])}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = json.loads(args.previous.read_text()) if args.previous else {}
    if previous and previous.get("kind") != args.kind:
        raise SystemExit(f"--previous {args.previous} holds {previous.get('kind')!r} runs, not {args.kind!r}")
    if not (args.runs or previous):
        raise SystemExit("nothing to tabulate: give --runs LABEL:SEED=WORK and/or --previous OUT.json")
    runs: dict[str, dict[str, dict]] = {label: dict(seeds) for label, seeds in previous.get("runs", {}).items()}
    for spec in args.runs:
        head, _, work = spec.partition("=")
        label, _, seed = head.partition(":")
        if not (label and seed.isdigit() and work):
            raise SystemExit(f"--runs {spec!r} is invalid: expected LABEL:SEED=WORK, e.g. before:0=/work/nested-s0")
        runs.setdefault(label, {})[seed] = one_seed(Path(work), args.n_boot)
    runs = {label: dict(sorted(seeds.items(), key=lambda kv: int(kv[0])))  # "before" first, then as they came
            for label, seeds in sorted(runs.items(), key=lambda kv: kv[0] != "before")}
    notes = [*previous.get("notes", []), *(n for n in args.note if n not in previous.get("notes", []))]
    result = {"kind": args.kind, "notes": notes, "environment": environment(), "runs": runs,
              "work": [*previous.get("work", []), *args.runs],
              "earlier_environments": [*previous.get("earlier_environments", []),
                                       *([previous["environment"]] if previous else [])]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(result), encoding="utf-8")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
