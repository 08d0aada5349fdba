"""Ingest throughput and peak memory at two input sizes: memory must not grow with the input.

Generates demo data of N rows (5% bad rows planted), then ingests it in a *fresh* process per size so
that peak RSS (``ru_maxrss``) belongs to that ingest alone. Prints a table and writes JSON.

    python benchmarks/ingest_speed.py                 # 0.5M and 2M rows (~3 minutes on 2 cores)
    python benchmarks/ingest_speed.py --quick         # 20k and 80k rows (smoke run)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import output_path  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the
    parent (here the data generator, ~1 GB at 2M rows), VmHWM starts fresh with the new image."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(raw: str, out: str) -> None:
    from relevance.data.ingest import ingest

    t0 = time.perf_counter()
    summary = ingest(raw, out, progress=False)
    seconds = time.perf_counter() - t0
    peak_mb = peak_rss_mb()
    print(json.dumps({"rows": summary["totals"]["rows_in"], "seconds": seconds, "peak_rss_mb": peak_mb}))


def measure(n_rows: int, tmp: Path) -> dict:
    from relevance.data.demo_data import SIZE_WEIGHTS, write_demo_data

    raw = tmp / f"raw-{n_rows}"
    t0 = time.perf_counter()
    write_demo_data(raw, rows_per_market=round(n_rows / sum(SIZE_WEIGHTS)), seed=1, corrupt_fraction=0.05)
    gen_s = time.perf_counter() - t0
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(raw), str(tmp / f"ds-{n_rows}")],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["rows_per_s"] = result["rows"] / result["seconds"]
    result["generate_s"] = gen_s
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run with small inputs")
    ap.add_argument("--sizes", default=None, help="comma-separated row counts (default 500000,2000000)")
    ap.add_argument("--out", default=None, help="JSON results path (default: benchmarks/results/ingest_speed.json; a --quick run: a temp folder)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = output_path(args.out, 'ingest_speed.json', args.quick)
    if args.worker:
        return worker(*args.worker)
    sizes = [int(s) for s in (args.sizes or ("20000,80000" if args.quick else "500000,2000000")).split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(n, Path(tmp)) for n in sizes]
    print(f"{'rows':>10} {'seconds':>9} {'rows/s':>10} {'peak RSS MB':>12}")
    for r in results:
        print(f"{r['rows']:>10,} {r['seconds']:>9.1f} {r['rows_per_s']:>10,.0f} {r['peak_rss_mb']:>12.0f}")
    growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"peak memory ratio {results[-1]['rows']:,} vs {results[0]['rows']:,} rows: {growth:.2f}x "
          f"(input {results[-1]['rows'] / results[0]['rows']:.1f}x)")
    payload = {"benchmark": "ingest_speed", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
               "cpus": __import__("os").cpu_count(), "quick": args.quick, "results": results, "peak_memory_ratio": growth}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
