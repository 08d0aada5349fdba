"""Tables of the quality benchmark: per-market AUC over seeds, paired deltas vs shared LoRA, cost.

Kept apart from :mod:`quality` (which trains) so the tables can be rebuilt from finished runs and
read without the training code. Differences are taken per seed on the same test examples (paired
cluster bootstrap over query_id, :func:`relevance.evaluation.metrics.paired_comparison`); across seeds we report the mean
difference and in how many seeds the 95% interval excludes 0 — seeds are too few for an interval.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from relevance.evaluation.metrics import paired_comparison

BASELINE = "lora"
MAIN = "mtl-lora"


def _preds(run: dict) -> pd.DataFrame:
    return pd.read_parquet(Path(run["run_dir"]) / "predictions" / "test.parquet")


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def summarise(runs: dict[int, dict[str, dict]], data: dict, settings: dict, env: dict,
              n_boot: int = 1000, fp32_runs: dict[int, dict[str, dict]] | None = None) -> dict[str, Any]:
    """One JSON-ready record of the benchmark: data, settings, environment, AUC, deltas and cost."""
    seeds = sorted(runs)
    methods = list(runs[seeds[0]])
    markets = sorted({m for s in seeds for r in runs[s].values() for m in r["metrics"]["markets"]})
    keys = [*markets, "macro"]
    auc: dict[str, dict[str, Any]] = {}
    deltas: dict[str, dict[str, Any]] = {}
    for method in methods:
        auc[method] = {}
        for key in keys:
            per_seed = []
            for s in seeds:
                met = runs[s][method]["metrics"]
                e = met["macro"] if key == "macro" else met["markets"].get(key, {})
                per_seed.append({"seed": s, **{k: e.get(k) for k in ("auc", "ci_low", "ci_high", "n", "n_pos")}})
            auc[method][key] = {"per_seed": per_seed, "mean": _mean([p["auc"] for p in per_seed])}
    for method in methods:
        if method == BASELINE:
            continue
        comps = {s: paired_comparison(_preds(runs[s][BASELINE]), _preds(runs[s][method]), n_boot=n_boot, seed=0)
                 for s in seeds}
        deltas[method] = {}
        for key in keys:
            per_seed = []
            for s in seeds:
                e = comps[s]["macro"] if key == "macro" else comps[s]["markets"].get(key, {})
                per_seed.append({"seed": s, **{k: e.get(k) for k in ("diff", "ci_low", "ci_high", "p_value",
                                                                      "significant")}})
            deltas[method][key] = {"per_seed": per_seed, "mean_diff": _mean([p["diff"] for p in per_seed]),
                                   "significant_seeds": sum(bool(p["significant"]) for p in per_seed),
                                   "significant_positive_seeds": sum(bool(p["significant"]) and p["diff"] > 0
                                                                     for p in per_seed),
                                   "n_seeds": len(seeds)}
    best = _vs_best_baseline(runs, seeds, methods, markets, auc, n_boot) if MAIN in methods else {}
    cost = {}
    for method in methods:
        infos = [runs[s][method]["info"] for s in seeds]
        cost[method] = {"trainable_params": infos[0].get("trainable_params"),
                        "train_time_s": _mean([i.get("train_time_s") for i in infos]),
                        "examples_per_s": _mean([i.get("examples_per_s") for i in infos]),
                        "models_to_serve": infos[0].get("models_to_serve")}
    rows = {m: {"questions": b["questions"], "articles": b["articles"], "source": b["source"],
                **data["ingest"]["markets"][m]["curated"]} for m, b in data["built"].items()}
    return {"benchmark": "quality", **env, "settings": settings, "data": rows, "markets": markets,
            "twins": sorted(settings.get("twin_markets") or {}), "methods": methods, "seeds": seeds, "auc": auc,
            "deltas": deltas, "vs_best_baseline": best, "cost": cost,
            "precision_check": precision_checks(runs, fp32_runs or {}, n_boot),
            "runs": {str(s): {m: r["run_dir"] for m, r in runs[s].items()} for s in seeds}}


def _vs_best_baseline(runs: dict, seeds: list[int], methods: list[str], markets: list[str], auc: dict,
                      n_boot: int) -> dict[str, Any]:
    """Per market, MTL-LoRA − the baseline with the highest mean test AUC there (picked on test, which
    favours the baseline), paired per seed on the same examples."""
    others = [m for m in methods if m != MAIN]
    best = {market: max(others, key=lambda m: auc[m][market]["mean"] if auc[m][market]["mean"] is not None else -1.0)
            for market in markets}
    comps = {(b, s): paired_comparison(_preds(runs[s][b]), _preds(runs[s][MAIN]), n_boot=n_boot, seed=0)
             for b in set(best.values()) for s in seeds}  # only the baselines some market picked
    out = {}
    for market, b in best.items():
        per_seed = [{"seed": s, **{k: comps[b, s]["markets"].get(market, {}).get(k)
                                   for k in ("diff", "ci_low", "ci_high", "significant")}} for s in seeds]
        out[market] = {"baseline": b, "per_seed": per_seed, "mean_diff": _mean([p["diff"] for p in per_seed])}
    return out


def precision_check(bf16_runs: dict[str, dict], fp32_runs: dict[str, dict], seed: int,
                    n_boot: int) -> dict[str, Any]:
    """bf16 − fp32 training of the same method and seed: paired test-AUC difference and the speed-up."""
    out = {}
    for method, fp32 in fp32_runs.items():
        bf16 = bf16_runs[method]
        comp = paired_comparison(_preds(fp32), _preds(bf16), n_boot=n_boot, seed=0)
        diffs = {m: e.get("diff") for m, e in comp["markets"].items()}
        out[method] = {"seed": seed, "macro": {k: comp["macro"].get(k) for k in ("diff", "ci_low", "ci_high")},
                       "max_abs_market_diff": max((abs(d) for d in diffs.values() if d is not None), default=None),
                       "markets": diffs,
                       "examples_per_s": {"bf16": bf16["info"].get("examples_per_s"),
                                          "fp32": fp32["info"].get("examples_per_s")},
                       "speedup": (bf16["info"].get("examples_per_s") or 0) / (fp32["info"].get("examples_per_s") or 1)}
    return out


def precision_checks(runs: dict[int, dict[str, dict]], fp32_runs: dict[int, dict[str, dict]],
                     n_boot: int) -> dict[str, Any]:
    """Per method, :func:`precision_check` for every seed trained in fp32 too, and the means over those seeds
    (one seed's macro difference is as noisy as the ±0.002 it is held to)."""
    out: dict[str, Any] = {}
    for seed in sorted(fp32_runs):
        for method, check in precision_check(runs[seed], fp32_runs[seed], seed, n_boot).items():
            out.setdefault(method, {"per_seed": []})["per_seed"].append(check)
    for entry in out.values():
        entry["mean_macro_diff"] = _mean([c["macro"]["diff"] for c in entry["per_seed"]])
        entry["mean_speedup"] = _mean([c["speedup"] for c in entry["per_seed"]])
    return out


def win_tie_loss(per_market: dict[str, dict], markets: list[str]) -> tuple[int, int, int]:
    """(wins, ties, losses) over markets × seeds: a win is a paired 95% interval above 0, a loss below."""
    w = t = lo = 0
    for market in markets:
        for p in per_market[market]["per_seed"]:
            if p.get("diff") is None:
                continue
            if p["significant"] and p["diff"] > 0:
                w += 1
            elif p["significant"]:
                lo += 1
            else:
                t += 1
    return w, t, lo


def _f(x: float | None, signed: bool = False) -> str:
    return "n/a" if x is None else (f"{x:+.3f}" if signed else f"{x:.3f}")


def main(argv: list[str] | None = None) -> int:
    """Re-render ``quality.md`` from ``quality.json`` (after a change to these tables; no training)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("json", type=Path, help="quality.json written by benchmarks/quality.py")
    args = p.parse_args(argv)
    md = args.json.with_suffix(".md")
    md.write_text(render_markdown(json.loads(args.json.read_text())), encoding="utf-8")
    print(f"wrote {md}")
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def render_markdown(result: dict[str, Any]) -> str:
    """The human-readable benchmark report (``quality.md``)."""
    s, methods, keys = result["settings"], result["methods"], [*result["markets"], "macro"]
    seeds = result["seeds"]
    v = result["versions"]
    out = [
        "# Quality benchmark: MTL-LoRA vs LoRA baselines on real multilingual relevance data", "",
        f"Run {result['date']} at commit `{result['commit']}` on {result['machine']['cpu']} "
        f"({result['machine']['cpus']} CPUs, 1-min load {_f(result['machine']['load_avg_1min_at_start'])} at start); "
        f"python {v['python']}, torch {v['torch']}, transformers {v['transformers']}. "
        f"Wall time {result.get('wall_time_s', 'n/a')} s. Produced by `python benchmarks/quality.py"
        f"{' --quick' if s.get('quick') else ''}`.", "",
        *([f"How the runs were made: {s['provenance']}", ""] if s.get("provenance") else []),
        "## Setup", "",
        f"- Encoder: `{Path(s['base_model']).name}` ({s['base_model']}); adapters r=8, α=16 on q/k/v/o, "
        "MTL-LoRA n=3, τ=0.1, dropout 0.05; classifier and pooler trained by every method.",
        f"- One budget for every method and seed: {s['max_steps']} steps × batch {s['batch_size']}, "
        f"max length {s['max_length']}, learning rate {s['learning_rate']} (linear warm-up 6 %, linear decay), "
        f"precision {s['precision']}, {s['torch_threads']} torch threads; seeds {', '.join(map(str, seeds))}.",
        f"- Data: per market a seeded subset of {s['max_questions']} questions, 3 rows each (positive, "
        "same-article negative, other-article negative); split by article "
        f"({s['split']} train/valid/test), so an XQuAD article is in the same split in every language.", "",
        *_twin_lines(s),
        _table(["market", "source", "articles", "questions", "train", "valid", "test"],
               [[m, Path(d["source"]).name, str(d["articles"]), str(d["questions"]), str(d.get("train", 0)),
                 str(d.get("valid", 0)), str(d.get("test", 0))] for m, d in sorted(result["data"].items())]), "",
        "## Test ROC-AUC by market (mean over seeds; per seed with 95% bootstrap interval)", "",
    ]
    out.append(_table(["market", *methods],
                      [[k, *(_f(result["auc"][m][k]["mean"]) for m in methods)] for k in keys]))
    out += ["", *_summary(result, keys)]
    out += ["", "<details><summary>Per seed</summary>", ""]
    out.append(_table(["market", "seed", *methods], [
        [k, str(sd), *(_interval(result["auc"][m][k]["per_seed"][i], "auc") for m in methods)]
        for k in keys for i, sd in enumerate(seeds)]))
    out += ["", "</details>", "", f"## Δ test ROC-AUC vs shared LoRA (`{BASELINE}`)", "",
            "Mean difference over seeds; then each seed's paired-bootstrap 95% interval (same examples, "
            "same resamples). ✱ marks an interval that excludes 0.", ""]
    others = [m for m in methods if m != BASELINE]
    out.append(_table(["market", *others], [
        [k, *(_delta_cell(result["deltas"][m][k]) for m in others)] for k in keys]))
    out += ["", *_wins(result)]
    out += ["", "## Cost", "", "Per run (mean over seeds). `separate` trains one model per market in one run, so its "
            "train time is the sum over markets.", "",
            _table(["method", "trainable params", "train time s (mean)", "train examples/s", "models to serve"], [
                [m, f"{c['trainable_params']:,}" if c["trainable_params"] else "n/a",
                 "n/a" if c["train_time_s"] is None else f"{c['train_time_s']:.0f}",
                 "n/a" if c["examples_per_s"] is None else f"{c['examples_per_s']:.1f}",
                 str(c.get("models_to_serve") or "n/a")]
                for m, c in result["cost"].items()]), ""]
    checks = result.get("precision_check") or {}
    if checks:
        out += ["## bf16 vs fp32 training", "",
                "The same method and seed trained in fp32 as well (precision is the only difference): paired "
                "test-AUC difference bf16 − fp32 with its 95% interval, and bf16's speed-up in train examples/s.", "",
                _table(["method", "seed", "macro Δ AUC (bf16 − fp32)", "largest market abs(Δ)", "bf16 ex/s",
                        "fp32 ex/s", "speed-up"],
                       [row for m, e in checks.items() for row in _precision_rows(m, e)]), ""]
    return "\n".join(out)


def _precision_rows(method: str, entry: dict[str, Any]) -> list[list[str]]:
    """One row per seed of a method's precision check, and a mean row when there are several seeds (a JSON
    written before the check took several seeds holds the one seed's check itself)."""
    rows = [[method, str(c["seed"]), f"{_f(c['macro']['diff'], True)} [{_f(c['macro']['ci_low'], True)}, "
             f"{_f(c['macro']['ci_high'], True)}]", _f(c["max_abs_market_diff"]),
             *(f"{c['examples_per_s'][p]:.1f}" for p in ("bf16", "fp32")), f"{c['speedup']:.2f}x"]
            for c in entry.get("per_seed", [entry])]
    if len(rows) > 1:
        rows.append([method, "mean", _f(entry["mean_macro_diff"], True), "", "", "", f"{entry['mean_speedup']:.2f}x"])
    return rows


def _wins(result: dict[str, Any]) -> list[str]:
    """Win/tie/loss counts for language markets and policy twins apart, the best-baseline table, and
    how many significant results chance alone would give."""
    twins = result.get("twins") or []
    groups = [("language markets", [m for m in result["markets"] if m not in twins])]
    if twins:
        groups.append(("policy twins", twins))
    n_seeds = len(result["seeds"])
    lines = ["## Win / tie / loss", "",
             "Counted over markets × seeds: a win is a paired 95% interval above 0, a loss below, a tie otherwise.", ""]
    rows = []
    for method, by_key in result["deltas"].items():
        rows.append([f"`{method}` vs `{BASELINE}`",
                     *("%d / %d / %d" % win_tie_loss(by_key, ms) for _, ms in groups)])
    best = result.get("vs_best_baseline") or {}
    if best:
        rows.append([f"`{MAIN}` vs the best baseline of each market",
                     *("%d / %d / %d" % win_tie_loss(best, ms) for _, ms in groups)])
    lines.append(_table(["comparison", *(f"{name} ({len(ms)} × {n_seeds} seeds)" for name, ms in groups)], rows))
    k = len(result["markets"])
    lines += ["", f"By chance alone (no real difference, independent tests at 95%), about {0.05 * k * n_seeds:.1f} "
              f"of the {k} × {n_seeds} market-seed intervals of one comparison would exclude 0, and about "
              f"{k * 0.05 ** n_seeds:.3f} markets would do so in every seed.", ""]
    if best:
        lines += [f"### `{MAIN}` vs the best baseline of each market", "",
                  "The baseline with the highest mean test AUC in that market (chosen on test, which favours it).", "",
                  _table(["market", "best baseline", "Δ mean; per seed [95% paired interval]"],
                         [[m, f"`{e['baseline']}`", _delta_cell(e)] for m, e in best.items()])]
    return lines


POLICY_WORDS = {"strict": "only the question's own paragraph is relevant",
                "topical": "a paragraph of the same article is relevant too, the own paragraph in another "
                           "language is not (topical, local language only)",
                "exact-any": "the own paragraph in any language is relevant, a same-article paragraph is not "
                             "(exact, any language)"}


def _twin_lines(s: dict[str, Any]) -> list[str]:
    """The policy twins, described as what they are: a simulation of market policies on real text."""
    twins = s.get("twin_markets") or {}
    if not twins:
        return [""]
    lines = [f"- Policy twins, a simulation of per-market relevance policies on real text: each twin takes its "
             f"language's questions and adds a fourth row per question, its own paragraph in `{s.get('foreign')}`; "
             "the language market itself stays strict. Twin policies cross (they order same-article and "
             "foreign-language rows oppositely), so no single ranking serves both."]
    lines += [f"  - `{code}`: {lang}'s questions; {POLICY_WORDS.get(policy, policy)}." for code, (lang, policy)
              in sorted(twins.items())]
    return [*lines, ""]


def _summary(result: dict[str, Any], keys: list[str]) -> list[str]:
    """Per method, computed from the deltas: where the difference to shared LoRA holds in every seed."""
    lines = ["In words (computed from the Δ table below: a market counts when its 95% interval excludes 0 "
             "in every seed):", ""]
    for method, by_key in result["deltas"].items():
        n = len(result["seeds"])
        up = [k for k in keys if by_key[k]["significant_positive_seeds"] == n]
        down = [k for k in keys if by_key[k]["significant_seeds"] == n and by_key[k]["significant_positive_seeds"] == 0]
        some = [k for k in keys if 0 < by_key[k]["significant_seeds"] < n]
        lines.append(f"- `{method}` vs `{BASELINE}`: macro Δ {_f(by_key['macro']['mean_diff'], True)}; "
                     f"better in every seed: {', '.join(up) or 'none'}; worse in every seed: "
                     f"{', '.join(down) or 'none'}; significant in some seeds only: {', '.join(some) or 'none'}.")
    return lines


def _interval(e: dict, key: str) -> str:
    if e.get(key) is None:
        return "n/a"
    return f"{e[key]:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def _delta_cell(d: dict) -> str:
    parts = [f"{p['diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]{'✱' if p['significant'] else ''}"
             for p in d["per_seed"] if p.get("diff") is not None]
    return f"**{_f(d['mean_diff'], True)}**: " + "; ".join(parts) if parts else "n/a"


if __name__ == "__main__":
    raise SystemExit(main())
